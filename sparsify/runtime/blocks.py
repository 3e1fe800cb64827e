"""Dense row x column blocks read from a mask: rows that keep exactly the same columns form one block.

A regrouped mask (seed 002, sparsify.rounds.regroup) is a union of blocks whose rows are disjoint,
so grouping identical rows gives its blocks back exactly (a cluster split in two blocks of the
same columns comes back as one). An 8x8 block mask gives one block per output block row (or per set
of output block rows keeping the same input blocks). The checkpoint's `regroup` metadata holds only
block counts and sizes, not their rows and columns, so the mask itself is the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RowGroup:
    """Output channels (rows) that keep the same weight columns."""

    rows: np.ndarray
    columns: np.ndarray


def mask_matrix(mask: torch.Tensor) -> np.ndarray:
    """An element mask as a 2-D bool array (COUT, CIN*kh*kw)."""
    return mask.detach().reshape(mask.shape[0], -1).to("cpu", torch.bool).numpy()


def row_groups(matrix: np.ndarray) -> tuple[list[RowGroup], np.ndarray]:
    """The groups of rows with identical column sets (ordered by first row), and the rows that keep nothing."""
    packed = np.packbits(matrix, axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=first.size))[:-1]
    groups, empty = [], np.zeros(0, dtype=np.int64)
    for rows in np.split(order, bounds):
        columns = np.flatnonzero(matrix[rows[0]])
        if columns.size:
            groups.append(RowGroup(rows.astype(np.int64), columns.astype(np.int64)))
        else:
            empty = rows.astype(np.int64)
    groups.sort(key=lambda g: int(g.rows[0]))
    return groups, empty


def split_groups(groups: list[RowGroup], min_rows: int) -> tuple[list[RowGroup], list[RowGroup]]:
    """Groups big enough to be a dense block, and the rest (they go to a sparse remainder)."""
    return [g for g in groups if g.rows.size >= min_rows], [g for g in groups if g.rows.size < min_rows]


def coverage(groups: list[RowGroup]) -> int:
    """Kept weights inside these groups."""
    return sum(int(g.rows.size * g.columns.size) for g in groups)
