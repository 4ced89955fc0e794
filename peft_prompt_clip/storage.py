"""Writing files so that nothing is lost on a crash: atomic replacement (temporary file, fsync, rename) and a lock
that keeps two processes saving into the same folder from interleaving their files."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".peft-prompt-clip.lock"


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = 0o022
    return 0o666 & ~mask


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
            os.chmod(tmp, file_mode())  # mkstemp makes 0600: every file of an adapter folder gets the same mode
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically; a link at `path` is replaced, never written through."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")


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
    fd = _open_regular(path, os.O_RDONLY if shared else os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_regular(path: Path, flags: int) -> int:
    """Open `path` only if it is a regular file: never through a link, never blocking on a FIFO or a device."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise OSError(f"{path} is not a regular file ({exc.strerror}); remove it and try again.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file; remove it and try again.")
    return fd


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
            _record_weights_digest(staging)
            names = sorted(os.listdir(staging))
            for name in names:
                os.chmod(staging / name, file_mode())
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            # the weights first, the config last: a crash in between leaves the previous config, whose digest of its
            # own weights the loader checks, so a mixed pair is refused rather than used
            for name in sorted(names, key=lambda n: n == "adapter_config.json"):
                os.replace(staging / name, folder / name)
            _fsync_dir(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _record_weights_digest(folder: Path) -> None:
    """Write the digest of the staged weights into the staged config (see `PromptEmbeddingConfig.weights_sha256`)."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["weights_sha256"] = file_sha256(folder / "adapter_model.safetensors")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
