"""Progress bars of long work (training, evaluation, checking and reading images): `tqdm` bars, on by default; off
with `TQDM_DISABLE=1` (tqdm's own switch) or [`disable_progress_bars`] (the command line's `-q`), as transformers'
and huggingface_hub's own bars are switched off."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

_enabled = True
_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar("phase", default=None)


def disable_progress_bars() -> None:
    """Show no progress bars from this package."""
    global _enabled
    _enabled = False


def enable_progress_bars() -> None:
    """Show progress bars (the default), unless `TQDM_DISABLE` is set."""
    global _enabled
    _enabled = True


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A `tqdm` bar over `iterable` (or one updated by hand, with `total`); `kwargs` are tqdm's. Left out, `disable`
    is tqdm's default (which `TQDM_DISABLE` sets). Only the first process of a machine shows bars under
    `accelerate launch`."""
    if not _enabled or os.environ.get("LOCAL_RANK", "0") != "0":
        kwargs["disable"] = True
    if _phase.get() and kwargs.get("desc"):
        kwargs["desc"] = f"{_phase.get()}: {kwargs['desc']}"
    return tqdm(iterable, **kwargs)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Name the bars shown inside (`"CoOp, 16 shots: training"`), for work of several parts."""
    token = _phase.set(name)
    try:
        yield
    finally:
        _phase.reset(token)
