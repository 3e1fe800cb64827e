"""Criteria: a score per group (low scores are pruned first), computed in float64.

A criterion is one `Criterion` subclass registered with `@CRITERIA.register(name)`. Each built-in
one is a mean over the group's elements, so a short tail block is neither favoured nor penalised
for its size. Besides the weight, a criterion may use `ScoreInputs`: the layer's name, the run
seed and round (`random`), and the Taylor saliency |w * dL/dw| (`taylor`, `needs_gradients`).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.registry import CRITERIA



@dataclass(frozen=True)
class ScoreInputs:
    """What a criterion may use besides the weight itself."""

    layer: str = ""
    seed: int = 0
    round: int = 0
    taylor: torch.Tensor | None = None  # weight-shaped mean over batches of |w * dL/dw|
    channel_scale: torch.Tensor | None = None  # |gamma| per output channel of the BatchNorm after the layer


class Criterion:
    """How a group is scored (class attributes describe it; `score` is called on the class)."""

    name: ClassVar[str]
    needs_groups: ClassVar[bool] = False  # meaningless on groups of one weight (the pattern's supports_variance)
    needs_gradients: ClassVar[bool] = False  # `prune` first accumulates |w * dL/dw| over training batches
    needs_channel_scales: ClassVar[bool] = False  # `prune` first reads |gamma| of the BatchNorm after each layer

    @staticmethod
    def score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
        """Scores of `weight`'s groups (shape: the pattern's mask shape), float64."""
        raise NotImplementedError


def criterion(name: str, *, needs_groups: bool = False, needs_gradients: bool = False,
              needs_channel_scales: bool = False):
    """Register a score function as a Criterion class named `name` (the function becomes its `score`)."""

    def register(function):
        cls = type(f"{name.title()}Criterion", (Criterion,), {
            "name": name, "needs_groups": needs_groups, "needs_gradients": needs_gradients,
            "needs_channel_scales": needs_channel_scales,
            "score": staticmethod(function), "__doc__": function.__doc__})
        CRITERIA.register(name)(cls)
        return function

    return register


def _group_mean(values: torch.Tensor, pattern) -> torch.Tensor:
    return pattern.group_sum(values) / pattern.group_sizes(tuple(values.shape))


@criterion("variance", needs_groups=True)
def variance_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Population variance of each group (the first recipe's default)."""
    if not pattern.supports_variance:
        raise SparsifyError(
            f"criterion 'variance' needs groups of several weights; with pattern {pattern.name!r} "
            "use criterion l1 or l2 (or taylor, random)"
        )
    w = weight.detach().double()
    mean = _group_mean(w, pattern)
    mean_sq = _group_mean(w * w, pattern)
    return (mean_sq - mean * mean).clamp_min_(0.0)


@criterion("l1")
def l1_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Mean absolute value of each group."""
    return _group_mean(weight.detach().double().abs(), pattern)


@criterion("l2")
def l2_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Root mean square of each group."""
    w = weight.detach().double()
    return _group_mean(w * w, pattern).sqrt()


@criterion("taylor", needs_gradients=True)
def taylor_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Mean over the group of |w * dL/dw| (first-order Taylor estimate of the loss change)."""
    if inputs.taylor is None:
        raise SparsifyError(
            f"criterion 'taylor' needs gradients for {inputs.layer or 'this layer'}; `sparsify prune` computes "
            "them over sparsity.criterion_batches training batches (pass ScoreInputs(taylor=...) when scoring directly)"
        )
    if tuple(inputs.taylor.shape) != tuple(weight.shape):
        raise SparsifyError(f"taylor saliency of {inputs.layer} has shape {tuple(inputs.taylor.shape)}, "
                            f"its weight {tuple(weight.shape)}; compute it with accumulate_taylor on this model")
    return _group_mean(inputs.taylor.detach().double().cpu(), pattern)


@criterion("bn_scale", needs_channel_scales=True)
def bn_scale_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Mean over the group of |gamma| of the BatchNorm after the layer, per output channel (network
    slimming); a layer with no BatchNorm after it scores as l2 (root mean square of the group)."""
    if inputs.channel_scale is None:
        return l2_score(weight, pattern, inputs)
    scale = inputs.channel_scale.detach().double().cpu().abs()
    if scale.shape != (weight.shape[0],):
        raise SparsifyError(f"bn_scale of {inputs.layer or 'this layer'} has {tuple(scale.shape)} entries and the "
                            f"layer {weight.shape[0]} output channels; the BatchNorm must follow this layer")
    rows = scale.reshape(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
    return _group_mean(rows, pattern)


@criterion("random")
def random_score(weight: torch.Tensor, pattern, inputs: ScoreInputs) -> torch.Tensor:
    """Uniform random scores, the same for the same run seed, round and layer (a baseline)."""
    generator = torch.Generator().manual_seed(mix_seed(inputs.seed, inputs.round, inputs.layer))
    shape = tuple(pattern.mask_shape(tuple(weight.shape)))
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def mix_seed(seed: int, round_: int, layer: str) -> int:
    """A 63-bit seed from the run seed, the round and the layer name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{round_}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def score_groups(name: str, weight: torch.Tensor, pattern, inputs: ScoreInputs | None = None) -> torch.Tensor:
    """Scores of `weight`'s groups under criterion `name` (shape: the pattern's mask shape)."""
    return CRITERIA.get(name).score(weight, pattern, inputs or ScoreInputs())


def accumulate_taylor(
    model: nn.Module, batches: Iterable, *, names: list[str], limit: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Mean over `limit` batches of |w * dL/dw| for the named weights, on CPU in float64.

    The model runs in eval mode (BatchNorm uses and keeps its running statistics, dropout is
    off), so nothing in the model changes; gradients are left cleared. Pruned weights are
    already 0.0, so the loss and its gradients are those of the masked model.
    """
    params = dict(model.named_parameters())
    sums = {name: torch.zeros(params[name].shape, dtype=torch.float64) for name in names}
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    seen = 0
    try:
        for images, target in itertools.islice(batches, limit):
            model.zero_grad(set_to_none=True)
            output = model(images.to(device))
            logits = output if isinstance(output, torch.Tensor) else output.logits
            loss_fn(logits, target.to(device)).backward()
            for name in names:
                grad = params[name].grad
                if grad is not None:
                    sums[name] += (params[name].detach() * grad).abs().double().cpu()
            seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise SparsifyError("criterion 'taylor' got no training batch; check data.* (the training set is empty)")
    return {name: total / seen for name, total in sums.items()}
