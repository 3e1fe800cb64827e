"""Files a command writes where the user says (`export -o`, `report -o`, `report --plot`): never over the
checkpoint being read or a file a run folder keeps, and one line, before any work, when the folder is a
file or cannot be written.

A run folder keeps checkpoints/ and the files in RUN_FILES at its root; a folder is a run folder when it
holds history.jsonl, or when the command is working on it. Paths are compared after resolving symbolic
links, so a link to a checkpoint is refused like the checkpoint itself.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Iterable

from sparsify.errors import SparsifyError
from sparsify.io.files import temporary_writer, write_failure

RUN_FILES = frozenset({"history.jsonl", "metrics.csv", "config.yaml", "train-state.safetensors", ".lock",
                       "sensitivity.json", "bench.json"})


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _is_run_folder(folder: Path, roots: set[Path]) -> bool:
    return folder in roots or (folder / "history.jsonl").is_file()


def run_file_problem(output: Path, *, inputs: Iterable[Path] = (), runs: Iterable[Path] = ()) -> str | None:
    """Why `output` must not be written ('is the checkpoint being read', ...), or None when it may be."""
    real = _real(output)
    for source in inputs:
        if real == _real(source):
            return f"is the checkpoint being read ({source}); name another file"
    roots = {_real(root) for root in runs}
    for folder in real.parents:
        if folder.name == "checkpoints" and _is_run_folder(folder.parent, roots):
            return (f"is inside the run's checkpoints/ folder ({folder}), which holds the stages' checkpoints "
                    "only; name a file outside it")
    if real.name in RUN_FILES and _is_run_folder(real.parent, roots):
        return f"is the run's own {real.name} (in {real.parent}); name another file"
    return None


def refuse_run_files(output: Path, *, flag: str, inputs: Iterable[Path] = (), runs: Iterable[Path] = ()) -> None:
    """SparsifyError when `output` is an input checkpoint, inside a run's checkpoints/ or one of its RUN_FILES."""
    problem = run_file_problem(output, inputs=inputs, runs=runs)
    if problem:
        raise SparsifyError(f"{flag} {output} {problem} (nothing was written)")


def first_existing(folder: Path) -> Path:
    """`folder`, or the nearest of its parents that exists (possibly as a file)."""
    folder = Path(folder)
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be made in `folder` (created with its parents if needed), or None."""
    found = first_existing(Path(folder))
    if not found.is_dir():
        return f"{found} is a file, not a folder"
    if not os.access(found, os.W_OK | os.X_OK):
        return f"{found} is read-only for this user (make it writable: chmod u+w {found})"
    return None


def refuse_unwritable(folder: Path, *, flag: str, given: Path, fix: str = "give a path in a folder you can write to"
                      ) -> None:
    """SparsifyError, before any work, when the folder `flag given` writes into cannot be made or written."""
    problem = folder_problem(folder)
    if problem:
        raise SparsifyError(f"{flag} {given} cannot be written: {problem}; nothing was written: {fix}")


def make_folder(folder: Path) -> None:
    """Create `folder` with its parents; WriteFailed naming it and the reason when that fails."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(Path(folder), exc) from None


def _pid_is_gone(pid: int) -> bool:
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (.NAME.PID.tmp) that writers killed mid-write left in `folder`: only
    those of processes that no longer exist. The paths removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        writer = temporary_writer(path.name)
        if writer is not None and path.is_file() and _pid_is_gone(writer):
            with suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
