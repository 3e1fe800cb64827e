"""A live model from a checkpoint: the architecture its metadata names, its weights and masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsify.console import log
from sparsify.core.patterns import build_pattern
from sparsify.errors import CheckpointError
from sparsify.io.checkpoint import Checkpoint, load_checkpoint
from sparsify.io.rundir import RunDir


@dataclass
class LoadedRun:
    """The latest checkpoint of a run, rebuilt as a live model with its masks."""

    checkpoint: Checkpoint
    model: nn.Module
    masks: dict[str, torch.Tensor]
    pattern: object


def build_model_for(meta: dict) -> nn.Module:
    """An untrained model with the architecture recorded in checkpoint metadata."""
    from sparsify.models.build import build_model

    return build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                       weights=None, log=log)


def load_run(run: RunDir, *, path: Path | None = None) -> LoadedRun:
    """Load (and verify) the latest checkpoint of `run`, or `path`."""
    path = path or run.require_latest()
    ckpt = load_checkpoint(path, expected_sha256=run.recorded_sha256(path))
    return rebuild(ckpt)


def rebuild(ckpt: Checkpoint) -> LoadedRun:
    """Model + masks from a (validated) checkpoint."""
    pattern = build_pattern(ckpt.meta["pattern"]) if ckpt.masks else None
    model = build_model_for(ckpt.meta)
    try:
        model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{ckpt.path} does not fit model {ckpt.meta['arch']!r}: {first}") from None
    return LoadedRun(ckpt, model, dict(ckpt.masks), pattern)
