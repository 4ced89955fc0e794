"""When this package's adapter type is registered with PEFT: as soon as both are imported.

`import peft_prompt_clip` imports neither torch nor PEFT (the command line starts at once, and each name of the
package loads on first use), yet PEFT must know the adapter type before `PeftModel.from_pretrained`, `get_peft_model`
or transformers' adapter loading look it up. So importing the package registers the type at once if PEFT is already
imported, and otherwise installs [`install`]'s import hook, which registers it right after PEFT's import, or, when one
of this package's modules is what imported PEFT, right after that module's import (registering imports the tuner,
which needs the package's modules whole). Once registered, the hook removes itself.

Limits: in a program where one thread imports PEFT while another is importing this package's modules, the type is
registered when the second import ends; an import hook ahead of this one that loads `peft` itself leaves the
registration to the first use of a name of the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_PACKAGE = __name__.rpartition(".")[0]
_lock = threading.RLock()
_state = {"running": 0, "peft": False, "done": False, "busy": False}


def register_when_ready() -> None:
    """Register once PEFT is imported and no import of this package's modules is under way (also tried when a name
    of the package is first used).

    A failure (an import of this package's modules that another thread holds half done, or a PEFT release this
    package does not fit) is a warning, not an error of the import that triggered it, which may be `import peft` by
    another library: the next import of PEFT or of a module of this package tries again, and PEFT's lookup of the
    adapter type then fails with `KeyError: 'PEFT_PROMPT_CLIP'`.
    """
    with _lock:  # not held while importing: another thread's import may hold a module this one needs
        if _state["done"] or _state["busy"] or _state["running"] or not _state["peft"]:
            return
        _state["busy"] = True
    try:
        importlib.import_module(f"{_PACKAGE}.model").register()
        _state["done"] = True
    except Exception as exc:  # noqa: BLE001 - reported, and tried again: see above
        warnings.warn(f"peft_prompt_clip could not register its adapter type with PEFT yet: {exc!r}", stacklevel=2)
    finally:
        _state["busy"] = False
    if _state["done"] and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


class _Loader(importlib.abc.Loader):
    """A module's own loader, followed by an attempt to register."""

    def __init__(self, loader: importlib.abc.Loader, ours: bool) -> None:
        self._loader, self._ours = loader, ours

    def __getattr__(self, name: str) -> Any:  # the rest of the loader's API (resources, source) is the loader's own
        if name.startswith("__") or name in ("_loader", "_ours"):  # copy and pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _lock:
            _state["running"] += self._ours
        loaded = False
        try:
            self._loader.exec_module(module)
            loaded = True
        finally:
            with _lock:
                _state["running"] -= self._ours
                _state["peft"] = _state["peft"] or (not self._ours and loaded)
        register_when_ready()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `peft` and this package's modules as the other finders do, with a loader that registers after them."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        ours = name.startswith(f"{_PACKAGE}.")
        if name != "peft" and not ours:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, ours)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Register now if PEFT is imported, else when it is (called by the package's `__init__`)."""
    _state["peft"] = "peft" in sys.modules
    if not _state["peft"] and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    register_when_ready()
