"""Per-layer targets: `sparsity.layers` overrides and `sparsity.allocation` (uniform | erk).

A layer's target is the share of its groups that end up zero. Overrides are globs over parameter
names; the first glob (in the order written) that matches a layer sets its target. `uniform` gives
every other layer the model-wide `target`. `erk` (Erdos-Renyi-Kernel, as in RigL) gives each other
layer a density proportional to sum(shape) / prod(shape), scaled so the zeros of all eligible
layers, overridden ones included, are `target` of all eligible weights; a layer whose density would
exceed 1 stays dense and the rest is shared again over the others. ERK targets are whole group
counts (largest remainders first), so the model-wide zeros land within one group of the target.
"""

from __future__ import annotations

import fnmatch
import math

from sparsify.errors import SparsifyError

_EPS = 1e-9


def match_overrides(names: list[str], globs: dict[str, float]) -> dict[str, float]:
    """Target per eligible layer named by a glob (first matching glob wins); refuses a glob matching none."""
    for glob in globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            few = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise SparsifyError(f"sparsity.layers: {glob!r} matches no eligible layer; eligible layers are "
                                f"{few} (see `sparsify report`); fix or remove the glob")
    chosen = {}
    for name in names:
        glob = next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)
        if glob is not None:
            chosen[name] = float(globs[glob])
    return chosen


def erk_densities(shapes: dict[str, tuple[int, ...]], budget: float) -> dict[str, float]:
    """Density per layer, proportional to sum(shape)/prod(shape), capped at 1, keeping `budget` weights in all."""
    capped: set[str] = set()
    while True:
        free = [n for n in shapes if n not in capped]
        left = budget - sum(math.prod(shapes[n]) for n in capped)
        scale = sum(sum(shapes[n]) for n in free)  # sum over free layers of score * numel
        eps = left / scale if free and scale else 0.0
        over = [n for n in free if eps * sum(shapes[n]) / math.prod(shapes[n]) > 1 + _EPS]
        if not over:
            dens = {n: eps * sum(shapes[n]) / math.prod(shapes[n]) for n in free}
            return {**dens, **dict.fromkeys(capped, 1.0)}
        capped.update(over)


def whole_groups(ideal: dict[str, float], groups: dict[str, int], weights: dict[str, int], zeros: float) -> dict[str, int]:
    """Zero groups per layer near `ideal` whose weights sum within one group of `zeros` (largest remainders first)."""
    counts = {n: min(math.floor(z + _EPS), max(groups[n] - 1, 0)) for n, z in ideal.items()}
    left = zeros - sum(counts[n] * weights[n] / groups[n] for n in counts)
    for name in sorted(ideal, key=lambda n: (counts[n] - ideal[n], n)):
        size = weights[name] / groups[name]
        if left < size / 2 or counts[name] >= groups[name] - 1 or ideal[name] - counts[name] < _EPS:
            continue
        counts[name] += 1
        left -= size
    return counts


def erk_targets(shapes: dict[str, tuple[int, ...]], groups: dict[str, int], target: float,
                fixed: dict[str, float]) -> dict[str, float]:
    """ERK target per layer not in `fixed`, so that all layers together zero `target` of their weights."""
    weights = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(weights.values())
    fixed_zeros = sum(math.floor(t * groups[n] + _EPS) * weights[n] / groups[n] for n, t in fixed.items())
    rest = [n for n in shapes if n not in fixed]
    zeros = target * total - fixed_zeros
    room = sum(weights[n] for n in rest)
    if zeros < -_EPS or zeros > room * (1 - 1e-6) or not rest:
        raise SparsifyError(f"sparsity.layers: the overrides zero {fixed_zeros / total:.1%} of the eligible weights, "
                            f"and allocation erk cannot meet the model-wide target {target:.1%} with the other "
                            f"{len(rest)} layers; change sparsity.target or the overrides")
    dens = erk_densities({n: shapes[n] for n in rest}, room - zeros)
    counts = whole_groups({n: (1 - dens[n]) * groups[n] for n in rest}, {n: groups[n] for n in rest},
                          {n: weights[n] for n in rest}, zeros)
    return {n: counts[n] / groups[n] for n in rest}


def layer_targets(shapes: dict[str, tuple[int, ...]], groups: dict[str, int], *, target: float,
                  allocation: str, overrides: dict[str, float]) -> dict[str, float]:
    """Target per eligible layer (in `shapes` order): overrides first, the rest by `allocation`."""
    fixed = match_overrides(list(shapes), overrides)
    if allocation == "erk":
        rest = erk_targets(shapes, groups, target, fixed)
    elif allocation == "uniform":
        rest = {n: target for n in shapes if n not in fixed}
    else:
        raise SparsifyError(f"sparsity.allocation: unknown {allocation!r}; use uniform or erk")
    return {n: fixed[n] if n in fixed else rest[n] for n in shapes}


def check_one_round(targets: dict[str, float], *, pattern_target: float, allocation: str) -> None:
    """One-round patterns (nm) fix each pruned layer's target: a layer is dense (0.0) or at the pattern's target."""
    if allocation != "uniform":
        raise SparsifyError(f"sparsity.allocation {allocation!r}: this pattern zeros the same share "
                            f"({pattern_target:g}) of every layer it prunes; use allocation: uniform")
    for name, value in targets.items():
        if value != 0.0 and abs(value - pattern_target) > 1e-6:
            raise SparsifyError(f"sparsity.layers: {name} target {value:g}, but this pattern's layers are either "
                                f"dense (0.0) or at {pattern_target:g}; use one of those")
