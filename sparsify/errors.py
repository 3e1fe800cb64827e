"""Errors the library raises; the CLI turns them into one line on stderr and an exit code."""

from __future__ import annotations

import os
import reprlib


class SparsifyError(Exception):
    """A problem the user can fix: the message names the bad value and how to fix it.

    Raised in a DataLoader worker, it reaches the main process as the same class built from torch's
    "Caught ... in DataLoader worker process N. Original Traceback ..." text; the message is taken
    back out of that text, so the user still reads one line.
    """

    exit_code = 1

    def __init__(self, message: str = "", *args) -> None:
        if isinstance(message, str):
            message = original_message(message, type(self))
        super().__init__(message, *args)


def original_message(text: str, kind: type) -> str:
    """The message of an exception re-raised by a DataLoader (worker or pin-memory thread), else `text`.

    torch re-raises it as `kind("Caught <Kind> in DataLoader worker process 0.\nOriginal Traceback
    ...\n<module>.<Kind>: <message>\n")`; the message is what follows the last `<module>.<Kind>: `.
    """
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    lines = text.rstrip("\n").splitlines()
    for index in range(len(lines) - 1, 0, -1):
        if lines[index].startswith(f"{name}: "):
            return "\n".join([lines[index][len(name) + 2:], *lines[index + 1:]])
    return lines[-1]


def first_line(exc: BaseException) -> str:
    """The first line of an exception message (or its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


PREVIEW = 80  # characters of a value that an error line shows


def shown(value: object) -> str:
    """`repr(value)` for an error line, cut after PREVIEW characters ('…' marks the cut).

    The repr is built with bounded sizes (`reprlib`), so a value of megabytes (or one nested list
    standing for billions of items) costs no more than a short one.
    """
    return clipped(_PREVIEWER.repr(value))


def clipped(text: str) -> str:
    """`text` cut after PREVIEW characters ('…' marks the cut)."""
    return text if len(text) <= PREVIEW else text[:PREVIEW] + "…"


def _previewer() -> reprlib.Repr:
    limits = reprlib.Repr()
    limits.maxlevel = 4
    limits.maxlist = limits.maxtuple = limits.maxset = limits.maxfrozenset = limits.maxdict = 20
    limits.maxstring = limits.maxlong = limits.maxother = 4 * PREVIEW  # long enough that the shown part is exact
    return limits


_PREVIEWER = _previewer()


def path_problem(path: str | os.PathLike) -> str:
    """Why `path` cannot be read as a file: 'does not exist', 'is a folder, not a file', ..."""
    if os.path.isdir(path):
        return "is a folder, not a file"
    if os.path.lexists(path) and not os.path.exists(path):
        return "is a broken symbolic link"
    if os.path.exists(path) and not os.path.isfile(path):
        return "is not a regular file"
    return "does not exist"


class ConfigError(SparsifyError):
    """The YAML config or a --set override is invalid."""


class ModelError(SparsifyError):
    """A model or its weights cannot be built or loaded."""


class DataError(SparsifyError):
    """A dataset folder or file is missing or malformed."""


class CheckpointError(SparsifyError):
    """A checkpoint is missing, truncated, altered or inconsistent."""


class WriteFailed(SparsifyError):
    """A file could not be written (no space, a file-size limit, permissions); the old file is kept."""


class TrainStateDamaged(CheckpointError):
    """The train-state file cannot be read; the train stage sets it aside and starts from its beginning."""


class RunLockedError(SparsifyError):
    """Another sparsify command holds the run folder."""


class MaskDivergenceError(SparsifyError):
    """Ranks hold different masks for the same layer."""


class TargetReached(SparsifyError):
    """Every eligible layer is at its target; `prune` exits 3 so shell loops stop."""

    exit_code = 3


class TrainingDiverged(SparsifyError):
    """The training loss (or, under fp16, the gradients at the smallest loss scale) stopped being finite."""

    def __init__(self, message: str, *, epoch: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step
