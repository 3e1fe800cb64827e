"""Durable writes: a temporary file in the same folder, fsync, rename, and the umask's mode; a crash
leaves the old file or the new one, never half of one. Appends take back a line they could not finish.

A write that fails (no space, a file-size limit, permissions) removes its temporary file, leaves
the old file as it was and raises `WriteFailed`, one line naming the file, the reason and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from contextlib import suppress
from pathlib import Path
from typing import Sequence

from sparsify.errors import WriteFailed

HASH_PIECE = 16 << 20  # the hashing thread looks for a stop request between pieces of this size

_REASONS = {  # errno -> (what went wrong, what the user can do)
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EFBIG: ("file too large for the limit (RLIMIT_FSIZE)", "raise the file-size limit (ulimit -f)"),
    errno.EACCES: ("permission denied", "make {folder} writable for this user"),
    errno.EPERM: ("permission denied", "make {folder} writable for this user"),
    errno.EROFS: ("read-only file system", "put the run folder (runs_dir) on a writable disk"),
}


def write_failure(path: Path, exc: OSError) -> WriteFailed:
    """The one-line error for a write of `path` that failed with `exc`."""
    reason, fix = _REASONS.get(exc.errno, (exc.strerror or str(exc), "check the disk"))
    fix = fix.format(folder=Path(path).parent)
    return WriteFailed(f"could not write {path}: {reason}; nothing was changed: {fix} and run the command again")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def temporary_writer(name: str) -> int | None:
    """The pid in a temporary file's name (.NAME.PID.tmp, as the writes here make them); None for other names."""
    found = _TEMPORARY_NAME.match(name)
    return int(found.group(1)) if found else None


_TEMPORARY_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system that cannot sync folders
            raise
    finally:
        os.close(dir_fd)


def _byte_views(chunks: Sequence) -> list[memoryview]:
    return [memoryview(chunk).cast("B") for chunk in chunks if memoryview(chunk).nbytes]


def _write_all(fd: int, views: list[memoryview]) -> None:
    for view in views:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


class _Hasher:
    """sha256 of `views` in a second thread (hashlib releases the GIL on large buffers)."""

    def __init__(self, views: list[memoryview]) -> None:
        self.digest = hashlib.sha256()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(views,), daemon=True)
        self.thread.start()

    def _run(self, views: list[memoryview]) -> None:
        for view in views:
            for start in range(0, len(view), HASH_PIECE):
                if self.stop.is_set():
                    return
                self.digest.update(view[start:start + HASH_PIECE])

    def hexdigest(self) -> str:
        self.thread.join()
        return self.digest.hexdigest()

    def cancel(self) -> None:
        self.stop.set()
        self.thread.join()


def atomic_write(path: Path, chunks: Sequence, *, sha256: bool = False) -> str | None:
    """Write the concatenated buffers `chunks` to `path` atomically; their sha256 when asked.

    The hash is taken in a second thread from the same buffers while they are written and synced.
    """
    path = Path(path)
    tmp = _temporary_path(path)
    views = _byte_views(chunks)
    hasher = _Hasher(views) if sha256 else None
    try:
        with suppress(FileNotFoundError):
            tmp.unlink()  # left by a crashed process that had our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
        try:
            _write_all(fd, views)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        if hasher:
            hasher.cancel()
        with suppress(OSError):
            tmp.unlink()
        raise write_failure(path, exc) from None
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise WriteFailed(f"{path} was written but its folder could not be synced ({exc.strerror}); "
                          "check the disk before you go on") from None
    return hasher.hexdigest() if hasher else None


def staging_path(path: Path, folder: Path) -> Path:
    """Where `path` is written in `folder` before `move_into_place` shows it (a temporary name: the next command
    under the run lock removes it when this process was killed in between)."""
    return Path(folder) / _temporary_path(Path(path)).name


def move_into_place(staged: Path, path: Path) -> None:
    """Rename the finished file `staged` to `path` (same disk: no space needed) and sync the folder."""
    try:
        os.replace(staged, path)
        _fsync_dir(Path(path).parent)
    except OSError as exc:
        raise write_failure(path, exc) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one."""
    atomic_write(path, [data])


def append_lines(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Append the lines `data` to the line file `path` (created if missing), after a newline when its last line
    lacks one (a hand edit) so the two lines are not glued; if that fails, the file is left as it was."""
    path = Path(path)
    existed = path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        _write_all(fd, _byte_views([data]))
        if sync:
            os.fsync(fd)
    except OSError as exc:
        with suppress(OSError):  # take back the part that was written (shrinking is allowed under a limit)
            os.ftruncate(fd, size)
            if not existed:
                path.unlink()
        raise write_failure(path, exc) from None
    finally:
        os.close(fd)
