"""Writing files so that nothing is lost on a crash: atomic replacement (temporary file, fsync, rename) and a lock
that keeps two processes saving into the same folder from interleaving their files."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".peft-prompt-clip.lock"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path` in one step. If the
    block fails (disk full, crash), `path` keeps its previous content and the temporary file is removed; one left by
    a process killed while writing is removed by the next write. Writers of one folder take turns (its lock)."""
    with locked(path.parent):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # no live writer holds one: we hold the lock
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextmanager
def locked(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold the folder's lock: exclusive for a writer, shared for readers, across processes. A reader of a folder that
    no saver of this library has written to (no lock file) takes no lock."""
    path = Path(folder) / LOCK_NAME
    if shared and not path.exists():
        yield
        return
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r" if shared else "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_adapter(model: Any, folder: str | Path) -> None:
    """`model.save_pretrained(folder)`, crash-safe and exclusive: the files are written to a temporary folder, synced,
    then moved into place under the folder's lock, so a failed save leaves the previous adapter whole and two
    processes saving to one folder never mix their files."""
    folder = Path(folder)
    with locked(folder):
        for stale in folder.glob(".save-*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".save-"))
        try:
            model.save_pretrained(staging)
            names = sorted(os.listdir(staging))
            for name in names:
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            # the weights first, the config last: a crash in between leaves the previous config, whose shapes the
            # loader checks against the weights, so a mixed pair is refused rather than used
            for name in sorted(names, key=lambda n: n == "adapter_config.json"):
                os.replace(staging / name, folder / name)
            _fsync_dir(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
