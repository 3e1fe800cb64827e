"""Errors the library raises; the CLI turns them into one line on stderr and an exit code."""

from __future__ import annotations


class SparsifyError(Exception):
    """A problem the user can fix: the message names the bad value and how to fix it."""

    exit_code = 1


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
