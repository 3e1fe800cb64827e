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


def model_metadata_problem(meta: dict) -> str | None:
    """What keeps the metadata from naming a model to build ('has no arch', ...), or None."""
    arch = meta.get("arch")
    if not isinstance(arch, str) or not arch:
        return f"has no model arch in its metadata (found {arch!r}; a checkpoint sparsify writes names one)"
    for key in ("num_classes", "in_channels"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"has {key} {value!r} in its metadata; a model needs a whole number of at least 1"
    return None


def build_model_for(meta: dict, *, source: Path | str = "the checkpoint") -> nn.Module:
    """An untrained model with the architecture recorded in checkpoint metadata; CheckpointError when the
    metadata does not name one."""
    from sparsify.models.build import build_model

    problem = model_metadata_problem(meta)
    if problem:
        raise CheckpointError(f"{source} {problem}; it was not written by sparsify or was altered: use a "
                              "checkpoint from the run's checkpoints/ folder")
    return build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                       weights=None, log=log)


def fit_problem(state: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """The first tensor of `state` that `model.load_state_dict(state, strict=True)` would refuse (missing,
    unexpected, or of another shape), in the model's order; None when every tensor fits."""
    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in wanted.items():
        if name not in state:
            return f"{name} is missing (the model has it, shape {shape})"
        if tuple(state[name].shape) != shape:
            return f"{name} has shape {tuple(state[name].shape)}, the model's is {shape}"
    extra = [name for name in state if name not in wanted]
    return f"{extra[0]} is not a tensor of the model" if extra else None


def require_fit(ckpt: Checkpoint, model: nn.Module | None = None) -> None:
    """CheckpointError naming the first tensor that does not fit the model the metadata names (built on the
    meta device when `model` is not given)."""
    from sparsify.models.tvmodels import build_for_shapes

    model = model if model is not None else build_for_shapes(lambda: build_model_for(ckpt.meta, source=ckpt.path))
    problem = fit_problem(ckpt.state, model)
    if problem:
        raise CheckpointError(f"{ckpt.path} does not fit model {ckpt.meta['arch']!r}: {problem}; it was altered "
                              "or written for another model: use a checkpoint from the run's checkpoints/ folder")


def load_run(run: RunDir, *, path: Path | None = None) -> LoadedRun:
    """Load (and verify) the latest checkpoint of `run`, or `path`."""
    path = path or run.require_latest()
    ckpt = load_checkpoint(path, expected_sha256=run.recorded_sha256(path))
    return rebuild(ckpt)


def rebuild(ckpt: Checkpoint) -> LoadedRun:
    """Model + masks from a (validated) checkpoint."""
    pattern = build_pattern(ckpt.meta["pattern"]) if ckpt.masks else None
    model = build_model_for(ckpt.meta, source=ckpt.path)
    require_fit(ckpt, model)
    try:
        model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{ckpt.path} does not fit model {ckpt.meta['arch']!r}: {first}") from None
    return LoadedRun(ckpt, model, dict(ckpt.masks), pattern)
