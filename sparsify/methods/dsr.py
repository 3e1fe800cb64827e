"""Dynamic sparse reparameterization (Mostafa & Wang 2019), as in the paper's own code.

Every `period` optimizer steps (the period doubles at the `double_at` epochs; nothing happens
from `stop_epoch` on) one reparameterization runs over all eligible weights:

1. prune: every kept weight with |w| < H (one global threshold) is zeroed and its mask entry
   cleared; a tensor never loses its last kept weight;
2. reallocate: the K pruned parameters are given back to the tensors in proportion to their
   surviving kept weights R_t (largest-remainder rounding, so the shares sum to K exactly;
   a tensor that lacks room passes its excess on), at random positions that were not kept
   before this step (so never where a weight was just pruned), with the new weights at 0.0;
3. adjust H for the next step: halved when K > (1 + delta) N_p, doubled when K < (1 - delta) N_p.

The kept count of the sparse tensors is therefore the same after every step. Before the first
step, weights without a mask are thinned at random to the target with exact counts. All
randomness comes from a CPU torch.Generator seeded by (seed, step), so every rank computes the
same masks; when torch.distributed is initialised, rank 0's masks and H are broadcast as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.methods.base import Method, MethodOptions
from sparsify.registry import METHODS
from sparsify.training.callbacks import TrainCallback

_SEED_STRIDE = 1 << 32  # (seed, step) -> one generator seed without collisions between runs


@dataclass(frozen=True)
class DsrSettings:
    """The `sparsity.dsr` keys plus the target they aim at."""

    target: float = 0.9
    prune_count: int | None = None
    prune_fraction: float = 0.15
    tolerance: float = 0.1
    threshold: float = 1e-3
    period: int = 100
    double_at: tuple[int, ...] = (25, 80, 140)
    stop_epoch: int = 190
    budget: str = "eligible"


@dataclass
class StepReport:
    """What one reparameterization did."""

    pruned: dict[str, int]
    grown: dict[str, int]
    threshold_used: float
    threshold_next: float

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned.values())


# ---------------------------------------------------------------- counting


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to integer `weights` (largest remainder, ties to the first)."""
    weight_sum = sum(weights)
    if weight_sum <= 0:
        raise SparsifyError("cannot share parameters among tensors that all have weight 0")
    quotas = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def allocate(total: int, weights: list[int], capacity: list[int]) -> list[int]:
    """Shares of `total` proportional to `weights`, each at most its capacity, summing to `total`."""
    if total > sum(capacity):
        raise SparsifyError(f"cannot place {total} parameters in {sum(capacity)} free positions")
    shares = [0] * len(weights)
    left = total
    open_ = [i for i, room in enumerate(capacity) if room > 0]
    while left > 0:
        basis = [weights[i] for i in open_]
        if sum(basis) == 0:  # only tensors without survivors have room: share by room instead
            basis = [capacity[i] - shares[i] for i in open_]
        for i, quota in zip(open_, apportion(left, basis)):
            give = min(quota, capacity[i] - shares[i])
            shares[i] += give
            left -= give
        open_ = [i for i in open_ if shares[i] < capacity[i]]
    return shares


def kept_counts(sizes: dict[str, int], *, target: float, budget: str, total_params: int) -> dict[str, int]:
    """Weights each tensor keeps: floor(target x size) zeros per tensor, or one budget over all parameters."""
    if budget == "eligible":
        return {name: size - math.floor(target * size) for name, size in sizes.items()}
    sparse = sum(sizes.values())
    zeros = math.floor(target * total_params)
    if zeros > sparse:
        raise SparsifyError(
            f"sparsity.target {target} of all {total_params} parameters needs {zeros} zeros but the eligible "
            f"weights hold only {sparse}; lower the target or use sparsity.dsr.budget: eligible"
        )
    names = list(sizes)
    shares = allocate(sparse - zeros, [sizes[n] for n in names], [sizes[n] for n in names])
    return dict(zip(names, shares))


def target_pruned(settings: DsrSettings, kept_total: int) -> int:
    """N_p: `prune_count`, else `prune_fraction` of the kept weights (at least 1)."""
    if settings.prune_count is not None:
        return settings.prune_count
    return max(1, round(settings.prune_fraction * kept_total))


def period_at(epoch: int, settings: DsrSettings) -> int | None:
    """Steps between reparameterizations during `epoch` (None from `stop_epoch` on)."""
    if epoch >= settings.stop_epoch:
        return None
    doublings = sum(1 for start in settings.double_at if epoch >= start)
    return settings.period * 2**doublings


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one reparameterization step (the same on every rank)."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + step) % (1 << 63))


# ---------------------------------------------------------------- masks


def random_weight_mask(shape: tuple[int, ...], keep: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of `shape` with exactly `keep` True entries at random positions."""
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[:keep]] = True
    return flat.reshape(shape)


def thin_masks(weights: dict[str, torch.Tensor], keep: dict[str, int], *, seed: int) -> dict[str, torch.Tensor]:
    """Initial random masks with exactly `keep[name]` kept entries per tensor."""
    generator = step_generator(seed, 0)
    return {name: random_weight_mask(tuple(weights[name].shape), keep[name], generator) for name in keep}


def prune_below(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                threshold: float) -> dict[str, torch.Tensor]:
    """Kept entries with |w| < threshold, per tensor; a tensor keeps at least its largest weight."""
    pruned = {}
    for name, mask in masks.items():
        magnitude = weights[name].detach().abs().to("cpu", torch.float32)
        below = mask & (magnitude < threshold)
        kept = int(mask.sum())
        if kept and int(below.sum()) == kept:
            largest = torch.where(mask, magnitude, torch.tensor(-1.0)).flatten().argmax()
            below.view(-1)[largest] = False
        pruned[name] = below
    return pruned


def cap_pruned(weights: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor], room: int) -> dict[str, torch.Tensor]:
    """Keep only the `room` smallest pruned weights when fewer free positions exist than prunes."""
    total = sum(int(p.sum()) for p in pruned.values())
    if total <= room:
        return pruned
    names = list(pruned)
    values = torch.cat([weights[n].detach().abs().to("cpu", torch.float32)[pruned[n]] for n in names])
    owners = torch.cat([torch.full((int(pruned[n].sum()),), i) for i, n in enumerate(names)])
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.sort(values, stable=True).indices[:room]] = True
    capped = {}
    for i, name in enumerate(names):
        flat = torch.zeros(pruned[name].numel(), dtype=torch.bool)
        flat[pruned[name].flatten().nonzero().flatten()[chosen[owners == i]]] = True
        capped[name] = flat.reshape(pruned[name].shape)
    return capped


def adjust_threshold(threshold: float, *, pruned: int, target: int, tolerance: float) -> float:
    """H for the next step: halved when too many were pruned, doubled when too few."""
    if pruned > (1 + tolerance) * target:
        return threshold / 2
    if pruned < (1 - tolerance) * target:
        return threshold * 2
    return threshold


def grow_random(before: dict[str, torch.Tensor], counts: dict[str, int],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per tensor, `counts[name]` random positions among those not kept before this step."""
    grown = {}
    for name, mask in before.items():
        free = (~mask).flatten().nonzero().flatten()
        chosen = free[torch.randperm(free.numel(), generator=generator)[: counts[name]]]
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[chosen] = True
        grown[name] = flat.reshape(mask.shape)
    return grown


def reparameterize(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], *, threshold: float,
                   target: int, tolerance: float, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], StepReport]:
    """One step: prune below H, regrow the same count in proportion to survivors, adjust H."""
    names = list(masks)
    room = sum(int((~masks[n]).sum()) for n in names)
    pruned = cap_pruned(weights, prune_below(weights, masks, threshold), room)
    counts = {n: int(pruned[n].sum()) for n in names}
    survivors = [int(masks[n].sum()) - counts[n] for n in names]
    capacity = [int((~masks[n]).sum()) for n in names]
    shares = dict(zip(names, allocate(sum(counts.values()), survivors, capacity)))
    grown = grow_random(masks, shares, generator)
    new_masks = {n: (masks[n] & ~pruned[n]) | grown[n] for n in names}
    following = adjust_threshold(threshold, pruned=sum(counts.values()), target=target, tolerance=tolerance)
    return new_masks, StepReport(counts, shares, threshold, following)


# ---------------------------------------------------------------- ranks


def broadcast_from_main(masks: dict[str, torch.Tensor], threshold: float, *, device: torch.device) -> tuple[dict, float]:
    """Rank 0's masks and threshold on every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return masks, threshold
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    names = list(masks)
    flat = torch.cat([masks[n].flatten() for n in names] + [torch.zeros(0, dtype=torch.bool)]).to(device, torch.uint8)
    value = torch.tensor([threshold], dtype=torch.float64, device=device)
    dist.broadcast(flat, src=0)
    dist.broadcast(value, src=0)
    flat, out, start = flat.to("cpu", torch.bool), {}, 0
    for name in names:
        size = masks[name].numel()
        out[name] = flat[start:start + size].reshape(masks[name].shape)
        start += size
    return out, float(value.item())


# ---------------------------------------------------------------- the train callback


@dataclass
class DsrCallback(TrainCallback):
    """Runs dsr inside `train_epochs`: initial thinning at the start, reparameterization after steps."""

    settings: DsrSettings
    names: list[str]
    seed: int
    threshold: float
    iteration: int = 0  # optimizer steps since dsr training began (across train stages)
    epochs_before: int = 0  # epochs trained in earlier stages
    epochs_seen: int = 0  # epochs of this stage that ran steps
    target: int = 0  # N_p, fixed at the start of training
    steps: list = field(default_factory=list)  # StepReport of every reparameterization of this stage

    def on_train_start(self, model: nn.Module, enforcer) -> None:
        """Thin weights that have no mask yet to the target, then fix N_p."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in enforcer.masks]
        if missing:
            sizes = {n: params[n].numel() for n in self.names}
            total = sum(p.numel() for p in model.parameters())
            keep = kept_counts(sizes, target=self.settings.target, budget=self.settings.budget, total_params=total)
            thinned = thin_masks(params, {n: keep[n] for n in missing}, seed=self.seed)
            for name in missing:
                enforcer.set_mask(name, thinned[name])
            enforcer.apply_()
        kept = sum(int(enforcer.masks[n].sum()) for n in self.names)
        self.target = target_pruned(self.settings, kept)

    def after_step(self, step: int, epoch: int, model: nn.Module, enforcer) -> None:
        """Reparameterize when this step closes a period of the current epoch's schedule."""
        self.iteration += 1
        self.epochs_seen = max(self.epochs_seen, epoch + 1)
        period = period_at(self.epochs_before + epoch, self.settings)
        if period is None or self.iteration % period:
            return
        params = dict(model.named_parameters())
        masks = {n: enforcer.masks[n] for n in self.names}
        new_masks, report = reparameterize(
            {n: params[n] for n in self.names}, masks, threshold=self.threshold, target=self.target,
            tolerance=self.settings.tolerance, generator=step_generator(self.seed, self.iteration))
        new_masks, self.threshold = broadcast_from_main(new_masks, report.threshold_next,
                                                        device=params[self.names[0]].device)
        for name in self.names:
            enforcer.set_mask(name, new_masks[name])
        enforcer.apply_()  # pruned weights to 0.0; grown positions were masked, so they start at 0.0
        self.steps.append(report)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "iteration": self.iteration, "epochs_before": self.epochs_before,
                "epochs_seen": self.epochs_seen, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        for key in ("iteration", "epochs_before", "epochs_seen", "target"):
            setattr(self, key, int(state[key]))

    def stage_meta(self) -> dict:
        """What the next train stage continues from (saved in the checkpoint's `method_state`)."""
        return {"dsr": {"threshold": self.threshold, "iteration": self.iteration,
                        "epochs": self.epochs_before + self.epochs_seen, "target_pruned": self.target,
                        "reparameterizations": len(self.steps),
                        "last_pruned": self.steps[-1].total_pruned if self.steps else None}}


def settings_from(sparsity) -> DsrSettings:
    """DsrSettings from the config's `sparsity:` section."""
    d = sparsity.dsr
    return DsrSettings(target=sparsity.target, prune_count=d.prune_count, prune_fraction=d.prune_fraction,
                       tolerance=d.tolerance, threshold=d.threshold, period=d.period,
                       double_at=tuple(d.double_at), stop_epoch=d.stop_epoch, budget=d.budget)


def make_callbacks(context) -> list:
    """The dsr callback of a train stage, continuing the state the parent checkpoint recorded."""
    if not context.eligible:
        raise SparsifyError("method dsr found no eligible layer; check sparsity.exclude and include_linear")
    settings = settings_from(context.sparsity)
    previous = (context.parent_meta.get("method_state") or {}).get("dsr") or {}
    return [DsrCallback(settings, list(context.eligible), context.seed,
                        threshold=float(previous.get("threshold", settings.threshold)),
                        iteration=int(previous.get("iteration", 0)), epochs_before=int(previous.get("epochs", 0)))]


class DsrOptions(MethodOptions):
    """Dynamic sparse reparameterization (`method: dsr`); defaults are the paper's WRN-28-2 / CIFAR-10 values."""

    prune_count: Optional[int] = Field(default=None, ge=1)  # N_p: weights to prune per step; null: prune_fraction
    prune_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)  # N_p as a share of the kept weights
    tolerance: float = Field(default=0.1, ge=0.0, lt=1.0)  # delta: H moves when pruned is off N_p by more
    threshold: float = Field(default=0.001, gt=0.0)  # H at the start: prune kept weights with |w| < H
    period: int = Field(default=100, ge=1)  # optimizer steps between reparameterizations at first
    double_at: list[int] = Field(default_factory=lambda: [25, 80, 140])  # epochs where the period doubles
    stop_epoch: int = Field(default=190, ge=0)  # no reparameterization from this epoch on
    budget: Literal["eligible", "all"] = "eligible"  # target counts eligible weights, or all parameters (dst)


@METHODS.register("dsr")
class Dsr(Method):
    name = "dsr"
    Options = DsrOptions
    summary = ("dynamic sparse reparameterization (Mostafa & Wang 2019): prune below a global threshold "
               "and regrow at random positions every `period` steps")
    prune_rounds = False
    patterns = ("unstructured",)
    callbacks = staticmethod(make_callbacks)
