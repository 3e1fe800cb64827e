"""Regroup (seed 002): turn an unstructured layer mask into a union of dense row x column blocks.

The mask is viewed as M = (COUT, CIN*kh*kw). Rows that keep a weight are partitioned into
`clusters` balanced parts so that parts share few columns (a hypergraph partition: rows are
vertices, each column is the hyperedge of the rows that keep it). For each part the columns are
ranked by how many of its rows keep them, and the dense column set grows along that ranking
until, for every row, the set is wider than `growth` times the row's weights still outside it
(the intended rule of the reference code; its IMP copy breaks out of the row loop early). A part
with more than `split_rows` rows becomes two blocks (a multiple of `split_rows` rows and the
rest), one with more than `min_rows` rows one block, a smaller one is dropped. The new mask is
the union of the blocks: weights inside a block are kept even if IMP pruned them (added), those
outside every block are zeroed (removed).

Partitioner: our own instead of the hMETIS binary — recursive spectral bisection (normalised-cut
Fiedler vector of the hypergraph's clique expansion) for a start, then greedy single-row moves
that lower the connectivity cut sum_c (parts touching column c - 1), within +-20 % of the mean
part size (hMETIS was run balanced too, UBfactor 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from sparsify.errors import SparsifyError

IMBALANCE = 0.2  # a part may hold 20 % more or fewer rows than n / clusters
REFINE_PASSES = 8


@dataclass
class RegroupResult:
    """The regrouped 2-D mask of one layer and what changed."""

    mask: np.ndarray
    blocks: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (rows, columns)
    cut: int = 0  # connectivity cut of the row partition
    note: str = ""

    def stats(self, before: np.ndarray) -> dict:
        """Blocks, their sizes, densities and the weights regroup added and removed."""
        return {
            "blocks": len(self.blocks),
            "block_sizes": [[int(r.size), int(c.size)] for r, c in self.blocks],
            "weights": int(before.size),
            "density_before": round(float(before.mean()), 6),
            "density_after": round(float(self.mask.mean()), 6),
            "added": int((self.mask & ~before).sum()),
            "removed": int((before & ~self.mask).sum()),
            "cut": self.cut,
            "note": self.note,
        }


# ---------------------------------------------------------------- partitioners


def contiguous_partition(rows: np.ndarray, parts: int) -> np.ndarray:
    """Baseline: rows in their original order, cut into `parts` chunks of near-equal size."""
    n = rows.shape[0]
    return (np.arange(n) * parts) // max(n, 1)


def fiedler_order(rows: np.ndarray) -> np.ndarray:
    """Row order along the Fiedler vector of the rows' co-occurrence graph (normalised cut).

    The graph is the hypergraph's clique expansion: rows sharing a column are joined with weight
    1 / (rows in that column - 1), so columns kept by many rows weigh little.
    """
    n = rows.shape[0]
    if n <= 2:
        return np.arange(n)
    a = rows.astype(np.float64)
    a = a[:, a.sum(0) > 1]
    similarity = (a / (a.sum(0) - 1.0)) @ a.T
    np.fill_diagonal(similarity, 0.0)
    scale = 1.0 / np.sqrt(similarity.sum(1) + 1e-12)
    normalised = np.eye(n) - scale[:, None] * similarity * scale[None, :]
    vector = scale * np.linalg.eigh(normalised)[1][:, 1]
    if vector[np.argmax(np.abs(vector))] < 0:  # fix the eigenvector's sign: same order on every run
        vector = -vector
    return np.lexsort((np.arange(n), np.round(vector, 12)))


def bisect_(rows: np.ndarray, index: np.ndarray, parts: int, first: int, labels: np.ndarray) -> None:
    """Label `index` rows with parts first..first+parts-1 by recursive spectral bisection."""
    if parts == 1:
        labels[index] = first
        return
    left_parts = parts // 2
    order = index[fiedler_order(rows[index])]
    cut = round(index.size * left_parts / parts)
    bisect_(rows, order[:cut], left_parts, first, labels)
    bisect_(rows, order[cut:], parts - left_parts, first + left_parts, labels)


def hypergraph_partition(rows: np.ndarray, parts: int) -> np.ndarray:
    """Balanced partition of the rows into `parts` that share few columns (labels per row)."""
    labels = np.zeros(rows.shape[0], dtype=np.int64)
    bisect_(rows, np.arange(rows.shape[0]), parts, 0, labels)
    refine_(rows, labels, parts)
    return labels


def refine_(rows: np.ndarray, labels: np.ndarray, parts: int) -> None:
    """Greedy moves of single rows to the part that lowers the connectivity cut most."""
    n = rows.shape[0]
    low, high = math.floor(n / parts * (1 - IMBALANCE)), math.ceil(n / parts * (1 + IMBALANCE))
    counts = np.stack([rows[labels == p].sum(0) for p in range(parts)])
    sizes = np.bincount(labels, minlength=parts)
    columns = [np.flatnonzero(r) for r in rows]
    for _ in range(REFINE_PASSES):
        moved = 0
        for j in range(n):
            a, cols = labels[j], columns[j]
            if sizes[a] <= low:
                continue
            gains = int((counts[a, cols] == 1).sum()) - (counts[:, cols] == 0).sum(1)
            gains[a] = 0
            gains[sizes >= high] = 0
            b = int(np.argmax(gains))
            if gains[b] > 0:
                counts[a, cols] -= 1
                counts[b, cols] += 1
                sizes[a] -= 1
                sizes[b] += 1
                labels[j] = b
                moved += 1
        if moved == 0:
            break


def connectivity_cut(rows: np.ndarray, labels: np.ndarray, parts: int) -> int:
    """sum over columns of (number of parts with a row that keeps the column) - 1."""
    touched = np.stack([rows[labels == p].any(0) for p in range(parts)]).sum(0)
    return int(np.clip(touched - 1, 0, None).sum())


# ---------------------------------------------------------------- the rule


def dense_columns(block: np.ndarray, growth: float) -> np.ndarray | None:
    """Columns of one row cluster's dense block, or None when the rule never stops growing.

    Columns are ranked by how many of the cluster's rows keep them (ties by index); the set
    cc[:i+1] is taken at the first i with i > growth * (weights of every row outside the set).
    """
    ranked = np.argsort(-block.sum(0), kind="stable")
    inside = np.cumsum(block[:, ranked], axis=1)
    outside_max = (block.sum(1)[:, None] - inside).max(0)
    stops = np.flatnonzero(np.arange(ranked.size) > growth * outside_max)
    return ranked[: stops[0] + 1] if stops.size else None


def cluster_blocks(rows: np.ndarray, cols: np.ndarray, *, split_rows: int, min_rows: int):
    """The blocks of one cluster: split above `split_rows` rows, none at `min_rows` rows or fewer."""
    if rows.size > split_rows:
        head = (rows.size // split_rows) * split_rows
        return [(rows[:head], cols)] + ([(rows[head:], cols)] if head < rows.size else [])
    return [(rows, cols)] if rows.size > min_rows else []


def regroup_mask(
    mask: np.ndarray, *, clusters: int = 8, growth: float = 1.5, split_rows: int = 32, min_rows: int = 16,
    partition: Callable[[np.ndarray, int], np.ndarray] = hypergraph_partition,
) -> RegroupResult:
    """Regroup a 2-D bool mask (COUT, CIN*kh*kw) into a union of dense row x column blocks."""
    mask = np.asarray(mask, dtype=bool)
    nonempty = np.flatnonzero(mask.any(1))
    if nonempty.size == 0:
        return RegroupResult(mask.copy(), note="no kept weight: mask left as it was")
    parts = min(clusters, nonempty.size)
    labels = partition(mask[nonempty], parts)
    cut = connectivity_cut(mask[nonempty], labels, parts)
    clustered = sorted((nonempty[labels == p] for p in range(parts)), key=lambda r: (-r.size, r[0] if r.size else 0))
    blocks = []
    for rows in clustered:
        cols = dense_columns(mask[rows], growth) if rows.size else None
        if cols is not None:
            blocks += cluster_blocks(rows, np.sort(cols), split_rows=split_rows, min_rows=min_rows)
    if not blocks:
        return RegroupResult(mask.copy(), cut=cut,
                             note=f"no cluster has more than {min_rows} rows: mask left as it was")
    new = np.zeros_like(mask)
    for rows, cols in blocks:
        new[np.ix_(rows, cols)] = True
    return RegroupResult(new, blocks, cut)


# ---------------------------------------------------------------- masks of a model


def regroup_masks(
    masks: dict[str, torch.Tensor], pattern, *, clusters: int, growth: float, split_rows: int, min_rows: int
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Regroup every layer's element mask; returns the new masks and per-layer statistics."""
    if not pattern.supports_regroup:
        raise SparsifyError(f"sparsity.regroup works on element masks and needs pattern 'unstructured', not "
                            f"{pattern.name!r}; set regroup.enabled: false or pattern: {{type: unstructured}}")
    new_masks, stats = {}, []
    for name, mask in masks.items():
        before = mask.reshape(mask.shape[0], -1).cpu().numpy()
        result = regroup_mask(before, clusters=clusters, growth=growth, split_rows=split_rows, min_rows=min_rows)
        new_masks[name] = torch.from_numpy(result.mask).reshape(mask.shape).clone()
        stats.append({"parameter": name, **result.stats(before)})
    return new_masks, stats


def imp_at_target(entries, *, scope: str, target: float) -> bool:
    """True when the round's prune (before regroup) reached the target: the last IMP round."""
    if scope == "global":
        total = sum(e.groups for e in entries)
        return sum(e.zeros_after for e in entries) >= math.floor(target * total + 1e-9)
    return all(e.zeros_after >= e.target_zeros for e in entries)


def regroup_round(masks: dict[str, torch.Tensor], pattern, cfg, *, at_target: bool) -> tuple[dict, dict]:
    """Regroup the round's masks; returns them and the `regroup` metadata of the pruned checkpoint."""
    new, stats = regroup_masks(masks, pattern, clusters=cfg.clusters, growth=cfg.growth,
                               split_rows=cfg.split_rows, min_rows=cfg.min_rows)
    return new, {"layers": stats, "imp_at_target": at_target}


def describe_regroup(info: dict) -> str:
    """One line: blocks, density before and after, weights added and removed."""
    layers = info["layers"]
    total = max(sum(s["weights"] for s in layers), 1)
    before = sum(s["density_before"] * s["weights"] for s in layers) / total
    after = sum(s["density_after"] * s["weights"] for s in layers) / total
    blocks = sum(s["blocks"] for s in layers)
    added, removed = sum(s["added"] for s in layers), sum(s["removed"] for s in layers)
    return (f"regroup: {blocks} dense blocks in {sum(s['blocks'] > 0 for s in layers)}/{len(layers)} layers, "
            f"{added} weights added and {removed} removed (density {before:.2%} -> {after:.2%})")
