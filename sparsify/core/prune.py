"""One prune round: score the kept groups, pick the lowest under step/target/constraints.

Counting rules (scope `layer`), per eligible layer with G groups of which `kept` are kept:
- target count T = floor(target * G), `target` being the layer's own (PruneSettings.target_of); with `balanced`, every output row may lose at most
  floor(target * cols) groups, so T = rows * floor(target * cols);
- a round zeros ceil(step * kept) groups (`step_basis: remaining`) or ceil(step * T)
  (`step_basis: target`), at least one, and never more than T minus the zeros already there;
- a group whose removal would break a constraint is skipped for the next-best one; keep_rows does not
  apply to a grid of one column (pattern channel: a row is one group).
Scope `global` (pattern unstructured): the same counts over all eligible layers together, with one
ranking of the criterion's raw scores (see `prune_round_global`). Pattern channel's scope global is a
share of multiply-adds instead, ranked by the prune round (rounds/channelglobal.py).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparsify.core.criteria import ScoreInputs, score_groups
from sparsify.errors import SparsifyError
from sparsify.registry import CRITERIA

_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class PruneSettings:
    """What one round needs to know, taken from the `sparsity:` section."""

    pattern: object
    criterion: str = "variance"
    target: float = 0.5
    step: float = 0.2
    step_basis: str = "remaining"
    keep_rows: bool = True
    keep_cols: bool = True
    balanced: bool = False
    scope: str = "layer"  # layer | global (one ranking over every layer: prune_round_global)
    layer_targets: dict[str, float] | None = None  # per-layer targets (core/allocation.py); others use `target`

    def target_of(self, name: str) -> float:
        """The target of layer `name`: its per-layer target if it has one, else `target`."""
        return (self.layer_targets or {}).get(name, self.target)


@dataclass(frozen=True)
class LayerInfo:
    """A conv or Linear weight and why it may not be pruned (None = eligible)."""

    name: str
    shape: tuple[int, ...]
    reason: str | None


@dataclass(frozen=True)
class LayerRound:
    """What one round did to one layer."""

    name: str
    groups: int
    zeros_before: int
    zeros_after: int
    target_zeros: int
    planned: int
    note: str = ""


def find_layers(
    model: nn.Module, pattern, *, include_linear: bool, exclude: list[str]
) -> list[LayerInfo]:
    """Every conv and Linear weight of `model`, each with its eligibility."""
    layers = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        shape = tuple(module.weight.shape)
        reason = _config_reason(name, module, include_linear, exclude)
        layers.append(LayerInfo(name, shape, reason or pattern.ineligible_reason(module, shape)))
    return layers


def _config_reason(name: str, module: nn.Module, include_linear: bool, exclude: list[str]):
    for glob in exclude:
        if fnmatch.fnmatchcase(name, glob):
            return f"excluded by {glob!r}"
    if isinstance(module, nn.Linear) and not include_linear:
        return "Linear layer (set sparsity.include_linear: true to prune it)"
    return None


def target_zero_count(grid_shape: tuple[int, int], target: float, balanced: bool) -> int:
    rows, cols = grid_shape
    if balanced:
        return rows * math.floor(target * cols + _EPS)
    return math.floor(target * rows * cols + _EPS)


def planned_count(kept: int, zeros: int, target_zeros: int, step: float, basis: str) -> int:
    base = kept if basis == "remaining" else target_zeros
    want = max(1, math.ceil(step * base - _EPS))
    return max(0, min(want, target_zeros - zeros))


def select_zeros(
    scores: np.ndarray, kept: np.ndarray, count: int, *, row_cap: int, col_cap: int
) -> np.ndarray:
    """Mask grid with `count` more zeros: lowest scores first, skipping cap-breaking groups.

    `row_cap`/`col_cap` bound the zeros per row/column. Returns the new kept grid.
    """
    rows, cols = kept.shape
    flat_kept = np.flatnonzero(kept)
    order = flat_kept[np.argsort(scores.ravel()[flat_kept], kind="stable")]
    row_zeros = cols - kept.sum(1)
    col_zeros = rows - kept.sum(0)
    new = kept.copy().ravel()
    first = order[:count]
    r_add = np.bincount(first // cols, minlength=rows)
    c_add = np.bincount(first % cols, minlength=cols)
    if (row_zeros + r_add <= row_cap).all() and (col_zeros + c_add <= col_cap).all():
        new[first] = False  # no constraint binds: the plain lowest-k
        return new.reshape(rows, cols)
    row_zeros, col_zeros = row_zeros.tolist(), col_zeros.tolist()
    taken = 0
    for index in order.tolist():
        if taken == count:
            break
        r, c = divmod(index, cols)
        if row_zeros[r] < row_cap and col_zeros[c] < col_cap:
            new[index] = False
            row_zeros[r] += 1
            col_zeros[c] += 1
            taken += 1
    return new.reshape(rows, cols)


def prune_layer(name: str, weight: torch.Tensor, mask: torch.Tensor, settings: PruneSettings,
                *, inputs: ScoreInputs | None = None):
    """New group mask for one layer and a LayerRound describing the change."""
    pattern = settings.pattern
    if pattern.one_round:
        return select_layer(name, weight, mask, settings, inputs=inputs)
    grid = pattern.grid(mask).cpu().numpy()
    rows, cols = grid.shape
    zeros = int(grid.size - grid.sum())
    layer_target = settings.target_of(name)
    target = target_zero_count(grid.shape, layer_target, settings.balanced)
    count = planned_count(grid.size - zeros, zeros, target, settings.step, settings.step_basis)
    if count == 0:
        return mask, LayerRound(name, grid.size, zeros, zeros, target, 0)
    scores = pattern.grid(score_groups(settings.criterion, weight, pattern, inputs)).cpu().numpy()
    row_cap = cols - 1 if settings.keep_rows and cols > 1 else cols  # a row of one group (channel): no cap
    if settings.balanced:
        row_cap = min(row_cap, math.floor(layer_target * cols + _EPS))
    col_cap = rows - 1 if settings.keep_cols else rows
    new_grid = select_zeros(scores, grid, count, row_cap=row_cap, col_cap=col_cap)
    after = int(new_grid.size - new_grid.sum())
    note = ""
    if after - zeros < count:
        note = f"constraints allowed {after - zeros} of {count} groups ({_active(settings)})"
    new_mask = torch.from_numpy(new_grid).reshape(mask.shape)
    return new_mask, LayerRound(name, grid.size, zeros, after, target, count, note)


def select_layer(name: str, weight: torch.Tensor, mask: torch.Tensor, settings: PruneSettings,
                 *, inputs: ScoreInputs | None = None):
    """Patterns reached in one round (nm): the pattern keeps the best of each group; step does not apply,
    and a layer whose target is 0.0 stays dense."""
    pattern = settings.pattern
    target = pattern.target_zeros(tuple(weight.shape)) if settings.target_of(name) > 0 else 0
    zeros = int(mask.numel() - mask.sum())
    if zeros >= target:
        return mask, LayerRound(name, mask.numel(), zeros, zeros, target, 0)
    if CRITERIA.get(settings.criterion).needs_groups and not pattern.supports_variance:
        raise SparsifyError(f"criterion 'variance' needs groups of several weights; pattern {pattern.name!r} "
                            "scores single weights: use criterion l1 or l2")
    scores = score_groups(settings.criterion, weight, pattern, inputs).cpu()
    new_mask = pattern.select(scores, mask.cpu())
    after = int(new_mask.numel() - new_mask.sum())
    return new_mask, LayerRound(name, mask.numel(), zeros, after, target, target - zeros)


def _active(settings: PruneSettings) -> str:
    names = [n for n in ("keep_rows", "keep_cols", "balanced") if getattr(settings, n)]
    return ", ".join(names) or "none"


def prune_round(
    weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], settings: PruneSettings,
    *, seed: int = 0, round_: int = 0, taylor: dict[str, torch.Tensor] | None = None,
    channel_scales: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[LayerRound]]:
    """Prune every layer in `masks` once; returns new masks (old ones untouched) and the log.

    `seed` and `round_` feed criterion `random`, `taylor` (|w * dL/dw| per weight) criterion `taylor`,
    `channel_scales` (|gamma| per output channel) criterion `bn_scale`.
    """
    inputs = {n: ScoreInputs(n, seed, round_, (taylor or {}).get(n), (channel_scales or {}).get(n)) for n in masks}
    if settings.scope == "global":
        return prune_round_global(weights, masks, settings, inputs=inputs)
    new_masks, log = {}, []
    for name, mask in masks.items():
        new_masks[name], entry = prune_layer(name, weights[name], mask, settings, inputs=inputs[name])
        log.append(entry)
    return new_masks, log


# ---------------------------------------------------------------- scope global


def check_global(settings: PruneSettings) -> None:
    """Refuse settings that a single ranking over all layers cannot honour."""
    if not settings.pattern.supports_global:
        raise SparsifyError(f"sparsity.scope 'global' ranks single weights across layers and needs pattern "
                            f"'unstructured', not {settings.pattern.name!r} (or pattern 'channel', whose global "
                            "target is a share of multiply-adds); use scope: layer for this pattern")
    if settings.pattern.global_share != "groups":
        raise SparsifyError(f"sparsity.scope 'global' with pattern {settings.pattern.name!r} is a share of the "
                            "model's multiply-adds, which `sparsify prune` counts over the channel graph "
                            "(rounds/channelglobal.py); this ranking counts groups only")
    if settings.balanced:
        raise SparsifyError("sparsity.balanced caps zeros per output block of one layer and has no meaning "
                            "with scope 'global'; set balanced: false or scope: layer")


def global_shares(scores: dict, grids: dict, names: list[str], count: int) -> dict[str, int]:
    """How many of the `count` lowest-scoring kept groups over the `names` layers fall in each layer.

    Ties are broken by layer order, then position, as `select_zeros` does within a layer.
    """
    kept = [scores[n].ravel()[grids[n].ravel()] for n in names]
    if not kept or count <= 0:
        return {}
    layer_of = np.repeat(np.arange(len(names)), [k.size for k in kept])
    order = np.argsort(np.concatenate(kept), kind="stable")[:count]
    counts = np.bincount(layer_of[order], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts) if c}


def prune_round_global(
    weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], settings: PruneSettings,
    *, inputs: dict[str, ScoreInputs],
) -> tuple[dict[str, torch.Tensor], list[LayerRound]]:
    """One round over all layers together: ceil(step * kept) of the lowest raw scores model-wide.

    The target is floor(target * all eligible groups). A layer whose keep_rows/keep_cols block its
    share takes its next-best groups; if it still falls short, the rest goes to the other layers.
    """
    check_global(settings)
    pattern = settings.pattern
    grids = {n: pattern.grid(m).cpu().numpy() for n, m in masks.items()}
    scores = {n: pattern.grid(score_groups(settings.criterion, weights[n], pattern, inputs[n])).cpu().numpy()
              for n in masks}
    total = sum(g.size for g in grids.values())
    zeros = total - sum(int(g.sum()) for g in grids.values())
    target = math.floor(settings.target * total + _EPS)
    remaining = planned_count(total - zeros, zeros, target, settings.step, settings.step_basis)
    new = dict(grids)
    asked = dict.fromkeys(masks, 0)
    open_layers = list(masks)
    while remaining > 0 and open_layers:
        shares = global_shares(scores, new, open_layers, remaining)
        if not shares:
            break
        for name, share in shares.items():
            before = int(new[name].sum())
            new[name] = select_zeros(scores[name], new[name], share, **_caps(new[name].shape, settings))
            got = before - int(new[name].sum())
            asked[name] += share
            remaining -= got
            if got < share:
                open_layers.remove(name)
    return _global_result(masks, grids, new, asked, settings)


def _caps(grid_shape: tuple[int, int], settings: PruneSettings) -> dict:
    rows, cols = grid_shape
    return {"row_cap": cols - 1 if settings.keep_rows and cols > 1 else cols, "col_cap": rows - 1 if settings.keep_cols else rows}


def _global_result(masks, grids, new, asked, settings):
    new_masks, log = {}, []
    for name, mask in masks.items():
        before = int(grids[name].size - grids[name].sum())
        after = int(new[name].size - new[name].sum())
        note = ""
        if after - before < asked[name]:
            note = f"constraints allowed {after - before} of {asked[name]} groups ({_active(settings)})"
        new_masks[name] = torch.from_numpy(new[name]).reshape(mask.shape)
        log.append(LayerRound(name, grids[name].size, before, after, before + asked[name], asked[name], note))
    return new_masks, log
