"""The permutation search: stripe-pair exhaustive search with escapes (Pool & Yu 2021, apex's reference).

The objective of a (rows, C) magnitude matrix under a column order is the magnitude n:m pruning
keeps: for every row and every stripe of m consecutive columns, the sum of its n largest values.
A move takes two stripes and redistributes their 2m columns into the best two groups of m (35
ways for 2:4). Moves are applied greedily by gain, never two on one stripe at once; only pairs
with a changed stripe are evaluated again. At a local optimum, an escape swaps one column between
two random stripes (at most `ESCAPES` times); the best order seen is returned, and the identity
unless the best order keeps strictly more.

The budget is counted in iterations, never in seconds: one iteration evaluates one batch of
candidate stripe pairs (about a million gathered magnitudes) or makes one escape. The search runs
on the magnitudes as integers (multiples of max / 2^24), so every sum is exact and the same seed
and budget take the same steps on every machine, whatever its speed, load or thread count. A
time limit only stops a search that runs far too long, and the result says so.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import NamedTuple

import torch

ESCAPES = 100
FIXED_POINT_BITS = 24  # the largest magnitude becomes 2^24: as fine as float32, and exact sums in int64
_CHUNK_ELEMENTS = 1_000_000  # gathered values per iteration's batch (4 MB of int32)


class Search(NamedTuple):
    """A search's column order, how it ended and the iterations it used.

    status: "converged" (no move helps and the escapes are spent), "budget spent" (all its
    iterations used), "time limit" (stopped by the clock: the order depends on the machine),
    "no budget" (no iteration to spend) or "nothing to gain" (n:m already keeps everything).
    """

    order: torch.Tensor
    status: str
    iterations: int


def kept_magnitude(magnitude: torch.Tensor, *, n: int, m: int) -> float:
    """Magnitude kept by n:m pruning of a (rows, C) matrix, in float64 (a tail of C % m keeps min(n, tail))."""
    x = magnitude.double()
    full = x.shape[1] - x.shape[1] % m
    kept = x[:, :full].reshape(x.shape[0], -1, m).topk(n, -1).values.sum()
    if full < x.shape[1]:
        tail = x[:, full:]
        kept += tail.topk(min(n, tail.shape[1]), -1).values.sum()
    return float(kept)


def fixed_point(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative magnitudes as int32 multiples of max / 2^24 (all zeros stay zeros)."""
    x = magnitude.double()
    top = float(x.max()) if x.numel() else 0.0
    if top <= 0.0:
        return torch.zeros(x.shape, dtype=torch.int32)
    return torch.round(x * (2.0 ** FIXED_POINT_BITS / top)).to(torch.int32)


def split_tables(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subsets of m of 2m columns, and the splits (a, b) of the 2m columns into two such subsets."""
    subsets = list(itertools.combinations(range(2 * m), m))
    index = {s: i for i, s in enumerate(subsets)}
    first = [i for i, s in enumerate(subsets) if 0 in s]
    second = [index[tuple(c for c in range(2 * m) if c not in subsets[i])] for i in first]
    return torch.tensor(subsets), torch.tensor(first), torch.tensor(second)


def top_n_sum(values: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the n largest of the m slices along dim -2 of (..., m, rows) values, per (..., rows).

    Each slice is inserted into a sorted list of the n largest so far with elementwise max/min:
    far faster than topk over a dimension of 4.
    """
    largest: list[torch.Tensor] = []
    for k in range(values.shape[-2]):
        value = values[..., k, :]
        for j in range(len(largest)):
            largest[j], value = torch.maximum(largest[j], value), torch.minimum(largest[j], value)
        if len(largest) < n:
            largest.append(value)
    return sum(largest[1:], largest[0])


def stripe_kept(xt: torch.Tensor, columns: torch.Tensor, *, n: int) -> torch.Tensor:
    """Kept magnitude of each stripe (int64): `columns` is (stripes, m) indices into xt's rows (the columns)."""
    return top_n_sum(xt[columns], n).sum(-1, dtype=torch.int64)


def evaluate_pairs(xt: torch.Tensor, order: torch.Tensor, pairs: torch.Tensor, tables, *, n: int, m: int):
    """Best regrouping of each stripe pair: (best total, split index, kept per subset) per pair."""
    subsets, first, second = tables
    stripes = order.reshape(-1, m)
    cols = torch.cat([stripes[pairs[:, 0]], stripes[pairs[:, 1]]], 1)  # pairs, 2m
    groups = cols[:, subsets]  # pairs, subsets, m
    kept = top_n_sum(xt[groups], n).sum(-1, dtype=torch.int64)  # pairs, subsets
    totals = kept[:, first] + kept[:, second]
    best, split = totals.max(1)  # ties: the first split
    return best, split, kept


def search_permutation(magnitude: torch.Tensor, *, n: int, m: int, iterations: int,
                       seconds: float = math.inf, seed: int = 0) -> Search:
    """Column order of a (rows, C) magnitude matrix keeping the most after n:m pruning, within
    `iterations` (the budget) and, as a safety only, `seconds`."""
    xt = fixed_point(magnitude).t().contiguous()  # (C, rows): a gathered column is contiguous
    channels = xt.shape[0]
    identity = torch.arange(channels)
    stripes = channels // m
    order = identity[: stripes * m].clone()
    kept = stripe_kept(xt, order.reshape(-1, m), n=n) if stripes else torch.zeros(0, dtype=torch.int64)
    start_total = int(kept.sum())
    if stripes < 2 or start_total == int(xt[: stripes * m].sum(dtype=torch.int64)):
        return Search(identity, "nothing to gain", 0)
    if iterations <= 0:
        return Search(identity, "no budget", 0)
    best_order, best_total, status, done = climb(xt, order, kept, n=n, m=m, iterations=iterations,
                                                 deadline=time.perf_counter() + seconds, seed=seed)
    if best_total <= start_total:
        return Search(identity, status, done)
    return Search(torch.cat([best_order, identity[stripes * m:]]), status, done)


def climb(xt: torch.Tensor, order: torch.Tensor, kept: torch.Tensor, *, n: int, m: int, iterations: int,
          deadline: float, seed: int) -> tuple[torch.Tensor, int, str, int]:
    """Improving moves in batches, escapes at each local optimum; returns the best order seen, its total,
    how the climb ended and the iterations it used."""
    stripes = len(kept)
    generator = torch.Generator().manual_seed(seed)
    tables = split_tables(m)
    dirty = torch.ones(stripes, stripes, dtype=torch.bool).triu(1)
    best_order, best_total = order.clone(), int(kept.sum())
    chunk = max(1, _CHUNK_ELEMENTS // (xt.shape[1] * len(tables[0]) * m))
    queue: list[torch.Tensor] = []  # the batches of this sweep, the next one last
    escapes = done = 0
    while True:
        if not queue:
            pairs = dirty.nonzero()
            if len(pairs) == 0 and escapes == ESCAPES:
                return best_order, best_total, "converged", done
            if len(pairs):
                queue = list(pairs[torch.randperm(len(pairs), generator=generator)].split(chunk))[::-1]
        if done == iterations:
            return best_order, best_total, "budget spent", done
        if time.perf_counter() >= deadline:
            return best_order, best_total, "time limit", done
        done += 1
        if not queue:
            escapes += 1
            order, kept = escape(xt, order, kept, dirty, generator, n=n, m=m)
            continue
        improve_(xt, order, kept, dirty, queue.pop(), tables, n=n, m=m)
        total = int(kept.sum())
        if total > best_total:
            best_order, best_total = order.clone(), total


def improve_(xt, order, kept, dirty, batch, tables, *, n: int, m: int) -> None:
    """Evaluate a batch of stripe pairs and apply the improving ones, best gain first, at most one per stripe."""
    subsets, first, second = tables
    best, split, subset_kept = evaluate_pairs(xt, order, batch, tables, n=n, m=m)
    dirty[batch[:, 0], batch[:, 1]] = False
    gains = best - (kept[batch[:, 0]] + kept[batch[:, 1]])
    improving = (gains > 0).nonzero().squeeze(1)
    if len(improving) == 0:
        return
    ranked = improving[torch.argsort(gains[improving], descending=True, stable=True)]
    touched: set[int] = set()
    for index, (i, j) in zip(ranked.tolist(), batch[ranked].tolist()):
        if i in touched or j in touched:
            continue
        touched.update((i, j))
        cols = torch.cat([order[i * m:(i + 1) * m], order[j * m:(j + 1) * m]])
        a, b = first[split[index]], second[split[index]]
        order[i * m:(i + 1) * m], order[j * m:(j + 1) * m] = cols[subsets[a]], cols[subsets[b]]
        kept[i], kept[j] = subset_kept[index, a], subset_kept[index, b]
        mark_dirty_(dirty, i)
        mark_dirty_(dirty, j)


def mark_dirty_(dirty: torch.Tensor, stripe: int) -> None:
    dirty[stripe, stripe + 1:] = True
    dirty[:stripe, stripe] = True


def escape(xt, order, kept, dirty, generator, *, n: int, m: int):
    """Swap one random column between two random stripes (a step off a local optimum)."""
    stripes = len(kept)
    i, j = torch.randperm(stripes, generator=generator)[:2].tolist()
    a, b = torch.randint(m, (2,), generator=generator).tolist()
    order = order.clone()
    order[i * m + a], order[j * m + b] = order[j * m + b].clone(), order[i * m + a].clone()
    kept = kept.clone()
    kept[[i, j]] = stripe_kept(xt, order.reshape(-1, m)[[i, j]], n=n)
    mark_dirty_(dirty, i)
    mark_dirty_(dirty, j)
    return order, kept
