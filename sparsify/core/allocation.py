"""Per-layer targets: `sparsity.layers` overrides and `sparsity.allocation` (uniform | erk | sensitivity).

A layer's target is the share of its groups that end up zero. Overrides are globs over parameter
names; the first glob (in the order written) that matches a layer sets its target. `uniform` gives
every other layer the model-wide `target`. `erk` (Erdos-Renyi-Kernel, as in RigL) gives each other
layer a density proportional to sum(shape) / prod(shape), scaled so the zeros of all eligible
layers, overridden ones included, are `target` of all eligible weights; a layer whose density would
exceed 1 stays dense and the rest is shared again over the others. ERK targets are whole group
counts (largest remainders first), so the model-wide zeros land within one group of the target.
`sensitivity` reads each other layer's measured loss increase at some levels (`sparsify sensitivity`)
and picks the levels with the least summed increase that zero `target` of all eligible weights
(see `sensitivity_targets`), rounded to whole groups the same way.
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


def zeros_left(weights: dict[str, int], groups: dict[str, int], target: float, fixed: dict[str, float],
               allocation: str) -> tuple[float, list[str]]:
    """Weights the layers not in `fixed` must zero so all zero `target` of the total, and those layers;
    refuses overrides that leave them less than nothing or more than all of their weights."""
    total = sum(weights.values())
    fixed_zeros = sum(math.floor(t * groups[n] + _EPS) * weights[n] / groups[n] for n, t in fixed.items())
    rest = [n for n in weights if n not in fixed]
    zeros = target * total - fixed_zeros
    room = sum(weights[n] for n in rest)
    if zeros < -_EPS or zeros > room * (1 - 1e-6) or not rest:
        raise SparsifyError(f"sparsity.layers: the overrides zero {fixed_zeros / total:.1%} of the eligible weights, "
                            f"and allocation {allocation} cannot meet the model-wide target {target:.1%} with the "
                            f"other {len(rest)} layers; change sparsity.target or the overrides")
    return max(zeros, 0.0), rest


def erk_targets(shapes: dict[str, tuple[int, ...]], groups: dict[str, int], target: float,
                fixed: dict[str, float]) -> dict[str, float]:
    """ERK target per layer not in `fixed`, so that all layers together zero `target` of their weights."""
    weights = {n: math.prod(s) for n, s in shapes.items()}
    zeros, rest = zeros_left(weights, groups, target, fixed, "erk")
    room = sum(weights[n] for n in rest)
    dens = erk_densities({n: shapes[n] for n in rest}, room - zeros)
    counts = whole_groups({n: (1 - dens[n]) * groups[n] for n in rest}, {n: groups[n] for n in rest},
                          {n: weights[n] for n in rest}, zeros)
    return {n: counts[n] / groups[n] for n in rest}


def hull_corners(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Corners (level, loss increase) of the lower convex hull of one layer's measured curve, from (0, 0).

    Increases are made non-decreasing in the level and non-negative first: a layer that measured
    better when pruned more is read as noise, not as a reason to prune it more.
    """
    points_up = [(0.0, 0.0)]
    for level, cost in sorted(points):
        if level > points_up[-1][0] + _EPS:
            points_up.append((level, max(cost, points_up[-1][1])))
    hull = [points_up[0]]
    for point in points_up[1:]:
        while len(hull) >= 2 and _turns_down(hull[-2], hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _turns_down(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> bool:
    """Whether b lies on or above the segment from a to c."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) <= 0


def cheapest_levels(curves: dict[str, list[tuple[float, float]]], weights: dict[str, int],
                    zeros: float) -> dict[str, float]:
    """Level per layer whose zeros (level x weights) sum to `zeros` with the least predicted loss increase.

    Greedy over the segments of every layer's lower convex hull (`hull_corners`), cheapest loss
    increase per zeroed weight first; that is optimal for the curves read as straight lines between
    the measured levels, and it leaves at most one layer between two of its measured levels (the
    segment it cuts, interpolated). Ties go to the segment that starts lower, then by name.
    """
    segments = []
    for name, points in curves.items():
        hull = hull_corners(points)
        for (x0, c0), (x1, c1) in zip(hull, hull[1:]):
            segments.append(((c1 - c0) / ((x1 - x0) * weights[name]), x0, name, x1))
    levels = dict.fromkeys(curves, 0.0)
    left = zeros
    for _, x0, name, x1 in sorted(segments):
        if left <= _EPS:
            break
        take = min(x1 - x0, left / weights[name])
        levels[name] = x0 + take
        left -= take * weights[name]
    if left > max(zeros, 1.0) * 1e-9:
        total = sum(weights.values())
        reach = sum(max((level for level, _ in curves[n]), default=0.0) * weights[n] for n in curves)
        raise SparsifyError(f"sparsity.allocation sensitivity: the scanned levels, as the constraints let each layer "
                            f"reach them, zero at most {reach / total:.1%} of these layers' weights, short of the "
                            f"{zeros / total:.1%} "
                            "the target asks of them; lower sparsity.target or scan a higher level, e.g. "
                            "`sparsify sensitivity -c CFG --levels 0.25,0.5,0.75,0.9,0.95`")
    return levels


def sensitivity_targets(weights: dict[str, int], groups: dict[str, int], target: float, fixed: dict[str, float],
                        curves: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Target per layer not in `fixed` from its measured (level, loss increase) curve: the cheapest levels
    (`cheapest_levels`) as whole groups, so all layers together zero `target` of their weights within one group."""
    zeros, rest = zeros_left(weights, groups, target, fixed, "sensitivity")
    missing = [n for n in rest if n not in curves]
    if missing:
        raise SparsifyError(f"sparsity.allocation sensitivity: no measured curve for {missing[0]} "
                            f"({len(missing)} layer(s)); run `sparsify sensitivity -c CFG` first")
    levels = cheapest_levels({n: curves[n] for n in rest}, {n: weights[n] for n in rest}, zeros)
    counts = whole_groups({n: levels[n] * groups[n] for n in rest}, {n: groups[n] for n in rest},
                          {n: weights[n] for n in rest}, zeros)
    return {n: counts[n] / groups[n] for n in rest}


def layer_targets(shapes: dict[str, tuple[int, ...]], groups: dict[str, int], *, target: float,
                  allocation: str, overrides: dict[str, float],
                  curves: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, float]:
    """Target per eligible layer (in `shapes` order): overrides first, the rest by `allocation`
    (`curves`: each layer's measured (level, loss increase) points, for allocation sensitivity)."""
    fixed = match_overrides(list(shapes), overrides)
    if allocation == "erk":
        rest = erk_targets(shapes, groups, target, fixed)
    elif allocation == "sensitivity":
        weights = {n: math.prod(s) for n, s in shapes.items()}
        rest = sensitivity_targets(weights, groups, target, fixed, curves or {})
    elif allocation == "uniform":
        rest = {n: target for n in shapes if n not in fixed}
    else:
        raise SparsifyError(f"sparsity.allocation: unknown {allocation!r}; use uniform, erk or sensitivity")
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
