"""Files that are either complete or absent: atomic file writes, staged output folders.

Every writer in memtrain goes through these, so a killed or failed run never leaves a
half-written file or folder where a later command (or a resume) would trust it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from memtrain.core.errors import MemtrainError
from memtrain.core.report import to_jsonable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data so that `path` is either absent, the old file, or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text written atomically (UTF-8), as atomic_write_bytes."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON (numpy/torch values converted, NaN -> null), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n")
    return path


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move a completed folder into place, replacing an older one only now."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """`with staged_dir(out) as tmp:` write into a hidden sibling; it becomes `out` only when the
    block finishes, and is deleted if it raises (the previous `out`, if any, is kept then)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless overwrite (an empty one holds nothing
    to lose)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise MemtrainError(f"output path '{path}' exists and is a file: choose a folder name")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MemtrainError(f"output dir '{path}' already exists: choose another or pass --overwrite")
    return path


class StagedOutput:
    """A command's output folder, written in a hidden sibling: `commit()` renames it into place,
    `abort()` deletes it, and an old output is replaced only once the new one is complete.
    Unlike `staged_dir`, opening and committing are separate calls, so a multi-process command
    can open on the main process and commit after the others have finished."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = check_output_dir(path, overwrite).absolute()
        self.overwrite = overwrite
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"

    def open(self) -> Path:
        """Create the staged folder, holding the output's lock: a second run pointed at the same
        output folder is refused in one line instead of interleaving with this one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.parent / f".{self.path.name}.lock"
        while True:  # the lock file is removed on release: make sure we hold the one on disk
            self._lock = open(self._lock_path, "a")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                self._lock = None
                raise MemtrainError(f"output dir '{self.path}' is being written by another run: wait for it to "
                                    "finish or choose another --output_dir") from None
            if self._lock_path.exists() and os.stat(self._lock_path).st_ino == os.fstat(self._lock.fileno()).st_ino:
                break
            self._lock.close()
        # holding the lock, any other staged folder is a killed run's leftover
        for stale in self.path.parent.iterdir():
            if stale.name.startswith(f".{self.path.name}.partial-"):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        try:
            check_output_dir(self.path, self.overwrite)  # someone may have written there meanwhile
            return replace_dir(self.tmp, self.path)
        finally:
            self._release()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock_path.unlink(missing_ok=True)  # while still holding it: no one can be locking it
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.commit() if exc_type is None else self.abort()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if needed) for the block, waiting for it: several
    processes that would build the same cached folder build it once, the others then reuse it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
