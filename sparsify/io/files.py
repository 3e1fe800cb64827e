"""Atomic writes: a temporary file in the same folder, fsync, rename, and the umask's mode; a crash
leaves the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_file_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the process umask (safetensors' writer gives 0600)."""
    try:
        with open("/proc/self/status") as f:  # Linux: read the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _sha256_of_file(path: Path, out: list) -> None:
    with open(path, "rb") as f:
        out.append(hashlib.file_digest(f, "sha256").hexdigest())
