"""The permutation search: stripe-pair exhaustive search with escapes (Pool & Yu 2021, apex's reference).

The objective of a (rows, C) magnitude matrix under a column order is the magnitude n:m pruning
keeps: for every row and every stripe of m consecutive columns, the sum of its n largest values.
A move takes two stripes and redistributes their 2m columns into the best two groups of m (35
ways for 2:4). Moves are applied greedily by gain, never two on one stripe at once; only pairs
with a changed stripe are evaluated again. At a local optimum, an escape swaps one column between
two random stripes (at most `escapes` times); the best order seen is returned, and the identity
unless the best order keeps strictly more. The search stops at the time limit.
"""

from __future__ import annotations

import itertools
import time

import torch

ESCAPES = 100
_CHUNK_ELEMENTS = 1_000_000  # gathered values per evaluation batch (4 MB of float32): fine time steps


def kept_magnitude(magnitude: torch.Tensor, *, n: int, m: int) -> float:
    """Magnitude kept by n:m pruning of a (rows, C) matrix, in float64 (a tail of C % m keeps min(n, tail))."""
    x = magnitude.double()
    full = x.shape[1] - x.shape[1] % m
    kept = x[:, :full].reshape(x.shape[0], -1, m).topk(n, -1).values.sum()
    if full < x.shape[1]:
        tail = x[:, full:]
        kept += tail.topk(min(n, tail.shape[1]), -1).values.sum()
    return float(kept)


def split_tables(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subsets of m of 2m columns, and the splits (a, b) of the 2m columns into two such subsets."""
    subsets = list(itertools.combinations(range(2 * m), m))
    index = {s: i for i, s in enumerate(subsets)}
    first = [i for i, s in enumerate(subsets) if 0 in s]
    second = [index[tuple(c for c in range(2 * m) if c not in subsets[i])] for i in first]
    return torch.tensor(subsets), torch.tensor(first), torch.tensor(second)


def stripe_kept(x: torch.Tensor, columns: torch.Tensor, *, n: int) -> torch.Tensor:
    """Kept magnitude of each stripe: `columns` is (stripes, m) indices into x's columns."""
    values = x[:, columns]  # rows, stripes, m
    return values.topk(n, -1).values.sum(-1).sum(0)


def evaluate_pairs(x: torch.Tensor, order: torch.Tensor, pairs: torch.Tensor, tables, *, n: int, m: int):
    """Best regrouping of each stripe pair: (best total, split index) per pair."""
    subsets, first, second = tables
    stripes = order.reshape(-1, m)
    cols = torch.cat([stripes[pairs[:, 0]], stripes[pairs[:, 1]]], 1)  # pairs, 2m
    groups = cols[:, subsets]  # pairs, subsets, m
    kept = x[:, groups].topk(n, -1).values.sum(-1).sum(0)  # pairs, subsets
    totals = kept[:, first] + kept[:, second]
    best, split = totals.max(1)
    return best, split, kept


def search_permutation(magnitude: torch.Tensor, *, n: int, m: int, seconds: float, seed: int = 0):
    """Column order of a (rows, C) magnitude matrix keeping the most after n:m pruning, and how it ended.

    The second value is "converged" (no move helps and the escapes are spent), "time limit",
    "no time" (seconds <= 0) or "nothing to gain" (n:m already keeps everything, or one stripe).
    """
    x = magnitude.float().contiguous()
    channels = x.shape[1]
    identity = torch.arange(channels)
    stripes = channels // m
    if stripes < 2 or kept_magnitude(x, n=n, m=m) >= float(x.double().sum()) * (1 - 1e-9):
        return identity, "nothing to gain"
    if seconds <= 0:
        return identity, "no time"
    deadline = time.perf_counter() + seconds
    generator = torch.Generator().manual_seed(seed)
    tables = split_tables(m)
    order = identity[: stripes * m].clone()
    kept = stripe_kept(x, order.reshape(-1, m), n=n)
    dirty = torch.ones(stripes, stripes, dtype=torch.bool).triu(1)
    best_order, best_total = order.clone(), float(kept.double().sum())
    chunk = max(1, _CHUNK_ELEMENTS // (x.shape[0] * len(tables[0]) * m))
    escapes, status = 0, "time limit"
    while time.perf_counter() < deadline:
        pairs = dirty.nonzero()
        if len(pairs) == 0:
            if escapes == ESCAPES:
                status = "converged"
                break
            escapes += 1
            order, kept = escape(x, order, kept, dirty, generator, n=n, m=m)
            continue
        pairs = pairs[torch.randperm(len(pairs), generator=generator)]
        for batch in pairs.split(chunk):
            if time.perf_counter() >= deadline:
                break
            improve_(x, order, kept, dirty, batch, tables, n=n, m=m)
            total = float(kept.double().sum())
            if total > best_total * (1 + 1e-7):
                best_order, best_total = order.clone(), total
    best = torch.cat([best_order, identity[stripes * m:]])
    if kept_magnitude(x[:, best], n=n, m=m) <= kept_magnitude(x, n=n, m=m):
        return identity, status
    return best, status


def improve_(x, order, kept, dirty, batch, tables, *, n: int, m: int) -> None:
    """Evaluate a batch of stripe pairs and apply the improving ones, at most one per stripe."""
    subsets, first, second = tables
    best, split, subset_kept = evaluate_pairs(x, order, batch, tables, n=n, m=m)
    dirty[batch[:, 0], batch[:, 1]] = False
    gains = best - (kept[batch[:, 0]] + kept[batch[:, 1]])
    touched: set[int] = set()
    for index in torch.argsort(gains, descending=True).tolist():
        i, j = batch[index].tolist()
        if gains[index] <= 1e-6 * max(float(best[index]), 1.0):
            break
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


def escape(x, order, kept, dirty, generator, *, n: int, m: int):
    """Swap one random column between two random stripes (a step off a local optimum)."""
    stripes = len(kept)
    i, j = torch.randperm(stripes, generator=generator)[:2].tolist()
    a, b = torch.randint(m, (2,), generator=generator).tolist()
    order = order.clone()
    order[i * m + a], order[j * m + b] = order[j * m + b].clone(), order[i * m + a].clone()
    kept = kept.clone()
    kept[[i, j]] = stripe_kept(x, order.reshape(-1, m)[[i, j]], n=n)
    mark_dirty_(dirty, i)
    mark_dirty_(dirty, j)
    return order, kept
