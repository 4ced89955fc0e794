"""Writing files so that nothing is lost on a crash: atomic replacement (temporary file, fsync, rename) and a lock
that keeps two processes saving into the same folder from interleaving their files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

LOCK_NAME = ".peft-prompt-clip.lock"
#: The lock a training run holds on its output folder for the whole run (apart from `LOCK_NAME`, which each save takes)
RUN_LOCK_NAME = ".peft-prompt-clip.run.lock"
_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = 0o022
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder to sync it; its renames are durable by themselves
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    """What a file of `mode` is, in words, where it is not a regular file, a folder or a link."""
    return _SPECIAL.get(stat.S_IFMT(mode), "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def check_output(
    output: str | Path, reads: Iterable[tuple[str, Any]], folder: bool = False, name: str = "--output"
) -> Path:
    """
    `output`, checked before a command does any work: a folder output (`folder`) is a folder or new; a file output is
    a regular file, a link (replaced, never written through) or new, never a folder or a special file (a FIFO, a
    device, a socket); and neither is, or is inside, what the command reads (`reads`: `(flag, path)` pairs; a folder
    read is written nowhere inside, a file read is not written; paths that do not exist here, such as Hub ids, are
    skipped).

    Raises:
        `ValueError`: one line naming the output (as `name` calls it), and the input it would write into.
    """
    path = Path(output)
    what = "folder" if folder else "file"
    if not str(output).strip():
        raise ValueError(f"{name} {str(output)!r} is empty; give a {what}.")
    if os.path.lexists(path):
        mode = os.stat(path).st_mode if folder else os.lstat(path).st_mode
        if folder and not stat.S_ISDIR(mode):
            kind = "a file" if stat.S_ISREG(mode) else _kind(mode)
            raise ValueError(f"{name} {output} is {kind}, not a folder; give a new folder or one it wrote.")
        if not folder and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            kind = "a folder" if stat.S_ISDIR(mode) else _kind(mode)
            raise ValueError(f"{name} {output} is {kind}, not a regular file; give a file path.")
    above = next(p for p in path.absolute().parents if os.path.lexists(p))  # where the missing folders would go
    if not above.is_dir():
        kind = "a file" if above.is_file() else _kind(os.stat(above).st_mode) if above.exists() else "a dangling link"
        raise ValueError(f"{name} {output} is inside {above}, which is {kind}, not a folder; give a path in a folder.")
    target = path.resolve() if folder else path.parent.resolve() / path.name  # a file's link is replaced, not followed
    for flag, given in reads:
        if given is None or not os.path.exists(given):
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents:
            raise ValueError(
                f"{name} {output} would write into {flag} {given}, which this command reads; give an output "
                "outside it."
            )
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path` in one step. If the
    block fails (disk full, crash), `path` keeps its previous content and the temporary file is removed; one left by
    a process killed while writing is removed by the next write. Writers of one folder take turns (its lock). A
    special file at `path` (a FIFO, a device) is refused, never replaced."""
    if os.path.lexists(path) and not (stat.S_ISREG(mode := os.lstat(path).st_mode) or stat.S_ISLNK(mode)):
        raise OSError(f"{path} is {_kind(mode)}, not a regular file: refusing to replace it; write elsewhere.")
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


#: The largest JSON file this package reads beside an adapter (a training log lists every image a run used: about
#: 100 bytes each, so 64 MiB holds half a million)
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: str | Path) -> Any:
    """The JSON in the regular file `path`, or None where there is none: missing, not a regular file (a FIFO is not
    waited on, a link to a device not read), over [`MAX_JSON_BYTES`], unreadable, not UTF-8, not JSON, or nested too
    deep to parse."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_JSON_BYTES:
            return None
        try:
            return json.loads(f.read(MAX_JSON_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically; a link at `path` is replaced, never written through."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically (see [`write_text`])."""
    write_text(path, json.dumps(data, indent=2))


def _check_lock_file(path: Path) -> None:
    """A lock file is a regular file (or none yet): a FIFO or a device under its name is refused, not waited on."""
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise OSError(f"{path} is not a regular file; remove it and try again.")


@contextmanager
def locked(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold the folder's lock across processes (`filelock`: fcntl on POSIX, msvcrt on Windows), so that writers take
    turns and a reader never sees a save half done. Readers take the same lock as writers, and none where no saver of
    this library has written (no lock file) or where the folder is read-only to them (then no saver of theirs can
    write there either). The lock file must be a regular file: a FIFO or a device under that name is refused, not
    waited on."""
    path = Path(folder) / LOCK_NAME
    _check_lock_file(path)
    if shared and not path.exists():
        yield
        return
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    # the lock file stays after release, so that a reader finds it and waits for any later save
    lock = FileLock(str(path), mode=file_mode(), preserve_lock_file=True)
    try:
        lock.acquire()
    except OSError as exc:
        if not shared or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield  # a folder read-only to us (permissions, a read-only mount)
        return
    try:
        yield
    finally:
        lock.release()


@contextmanager
def run_lock(folder: Path, main: bool = True) -> Iterator[None]:
    """Hold `folder` for one training run: a second run into it, in this or another process, is refused at once
    (`BlockingIOError`) rather than mixing its files with this one's. Of several processes of one run, the `main` one
    holds it and the others nothing (a refused main process stops them all: the launcher ends the run's other
    processes when one fails). Re-entrant in a process: a command holds it for its whole run, and its trainer takes
    it again."""
    if not main:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK_NAME
    _check_lock_file(path)
    lock = FileLock(str(path), mode=file_mode(), timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise BlockingIOError(
            f"{folder} is the output of another training run in progress; wait for it to end, or give another output."
        ) from None
    try:
        yield
    finally:
        lock.release()


def save_adapter(model: Any, folder: str | Path) -> None:
    """The model's active adapter saved as `save_pretrained` does, into `folder` itself whatever the adapter's name;
    crash-safe and exclusive: the files are written to a temporary folder, synced, then moved into place under the
    folder's lock, so a failed save leaves the previous adapter whole and two processes saving to one folder never
    mix their files. Results of the adapter it replaces (`eval_results.json`) are removed."""
    folder = Path(folder)
    name = model.active_adapter
    with locked(folder):
        for stale in folder.glob(".save-*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        root = Path(tempfile.mkdtemp(dir=folder, prefix=".save-"))
        try:
            model.save_pretrained(root, selected_adapters=[name])
            staging = root if name == "default" else root / name  # PEFT saves other adapters into a subfolder
            _record_weights_digest(staging)
            names = sorted(n for n in os.listdir(staging) if (staging / n).is_file())
            for file in names:
                os.chmod(staging / file, file_mode())
                with open(staging / file, "rb") as f:
                    os.fsync(f.fileno())
            # the weights first, the config last: a crash in between leaves the previous config, whose digest of its
            # own weights the loader checks, so a mixed pair is refused rather than used
            for file in sorted(names, key=lambda n: n == "adapter_config.json"):
                os.replace(staging / file, folder / file)
            for stale in ("eval_results.json", "eval_results.html"):  # they described the adapter just replaced
                (folder / stale).unlink(missing_ok=True)
            _fsync_dir(folder)
        finally:
            shutil.rmtree(root, ignore_errors=True)


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
