"""One prune round: score the kept groups, pick the lowest under step/target/constraints.

Counting rules (scope `layer`), per eligible layer with G groups of which `kept` are kept:
- target count T = floor(target * G); with `balanced`, every output row may lose at most
  floor(target * cols) groups, so T = rows * floor(target * cols);
- a round zeros ceil(step * kept) groups (`step_basis: remaining`) or ceil(step * T)
  (`step_basis: target`), at least one, and never more than T minus the zeros already there;
- a group whose removal would break a constraint is skipped for the next-best one.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparsify.criteria import score_groups

_EPS = 1e-9


@dataclass(frozen=True)
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


def prune_layer(name: str, weight: torch.Tensor, mask: torch.Tensor, settings: PruneSettings):
    """New group mask for one layer and a LayerRound describing the change."""
    pattern = settings.pattern
    grid = pattern.grid(mask).cpu().numpy()
    rows, cols = grid.shape
    zeros = int(grid.size - grid.sum())
    target = target_zero_count(grid.shape, settings.target, settings.balanced)
    count = planned_count(grid.size - zeros, zeros, target, settings.step, settings.step_basis)
    if count == 0:
        return mask, LayerRound(name, grid.size, zeros, zeros, target, 0)
    scores = pattern.grid(score_groups(settings.criterion, weight, pattern)).cpu().numpy()
    row_cap = cols - 1 if settings.keep_rows else cols
    if settings.balanced:
        row_cap = min(row_cap, math.floor(settings.target * cols + _EPS))
    col_cap = rows - 1 if settings.keep_cols else rows
    new_grid = select_zeros(scores, grid, count, row_cap=row_cap, col_cap=col_cap)
    after = int(new_grid.size - new_grid.sum())
    note = ""
    if after - zeros < count:
        note = f"constraints allowed {after - zeros} of {count} groups ({_active(settings)})"
    new_mask = torch.from_numpy(new_grid).reshape(mask.shape)
    return new_mask, LayerRound(name, grid.size, zeros, after, target, count, note)


def _active(settings: PruneSettings) -> str:
    names = [n for n in ("keep_rows", "keep_cols", "balanced") if getattr(settings, n)]
    return ", ".join(names) or "none"


def prune_round(
    weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], settings: PruneSettings
) -> tuple[dict[str, torch.Tensor], list[LayerRound]]:
    """Prune every layer in `masks` once; returns new masks (old ones untouched) and the log."""
    new_masks, log = {}, []
    for name, mask in masks.items():
        new_masks[name], entry = prune_layer(name, weights[name], mask, settings)
        log.append(entry)
    return new_masks, log
