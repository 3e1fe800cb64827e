"""Executor bsr: the weight matrix as a torch block-sparse (BSR) tensor times the implicit im2col.

Rows keeping the same columns are put next to each other, and columns kept by the same rows too,
so an 8x8 block mask and a regrouped mask both become square b x b tiles (MKL, torch's CPU BSR
backend, takes square blocks only). The largest b of 8, 4, 2 whose tiles store at most
`fill_limit` times the kept weights is used; a mask without such tiles (plain unstructured) is
refused. Columns nobody keeps are never gathered, rows that keep nothing get their bias. A 1x1
conv with stride 1 and no padding (and a Linear) is a matmul over channels: its input is read in place.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify.registry import EXECUTORS
from sparsify.runtime.base import (
    Executor, Geometry, as_batched_image, cpu_matrix_reason, restore_shape, sparse_beta_quiet, weight_matrix,
)
from sparsify.runtime.blocks import mask_matrix, row_groups
from sparsify.runtime.im2col import GRID_WASTE_LIMIT
from sparsify.runtime.parts import Part, PartsRunner

SIZES = (8, 4, 2)


def grouped_order(labels: np.ndarray, size: int) -> np.ndarray:
    """Indices sorted by label, labels whose count is not a multiple of `size` last (keeps tiles aligned)."""
    counts = np.bincount(labels)
    order = np.lexsort((np.arange(labels.size), labels, counts[labels] % size != 0))
    return order


def labels(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept rows and their group, kept columns and their class (the groups that use them), empty rows."""
    groups, empty = row_groups(matrix)
    if not groups:
        none = np.zeros(0, dtype=np.int64)
        return none, none, none, none, empty
    rows = np.concatenate([g.rows for g in groups])
    row_labels = np.repeat(np.arange(len(groups)), [g.rows.size for g in groups])
    used = np.flatnonzero(matrix.any(0))
    membership = matrix[np.array([g.rows[0] for g in groups])][:, used]  # (groups, used columns)
    _, column_labels = np.unique(np.packbits(membership, axis=0), axis=1, return_inverse=True)
    return rows, row_labels, used, column_labels.reshape(-1), empty


def tiles(matrix: np.ndarray, size: int) -> int:
    """How many size x size tiles of `matrix` (padded with zeros) hold a kept weight."""
    rows, cols = -(-matrix.shape[0] // size) * size, -(-matrix.shape[1] // size) * size
    padded = np.zeros((rows, cols), dtype=bool)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    return int(padded.reshape(rows // size, size, cols // size, size).any((1, 3)).sum())


def block_layout(matrix: np.ndarray, fill_limit: float):
    """(size, rows, columns, empty) of the largest tile size within the fill limit, or (None, fill) if none.

    Rows are ordered by group and columns by class, groups and classes whose count is not a multiple
    of the tile size last, so the tiles of a block mask line up.
    """
    kept = int(matrix.sum())
    if kept == 0:
        return None, float("inf")
    rows, row_labels, used, column_labels, empty = labels(matrix)
    best = float("inf")
    for size in SIZES:
        ordered_rows, columns = rows[grouped_order(row_labels, size)], used[grouped_order(column_labels, size)]
        fill = tiles(matrix[np.ix_(ordered_rows, columns)], size) * size * size / kept
        if fill <= fill_limit:
            return (size, ordered_rows, columns, empty), fill
        best = min(best, fill)
    return None, best


@EXECUTORS.register("bsr")
class Bsr(Executor):
    """torch.sparse BSR matmul on the implicit im2col; square tiles from block and regrouped masks."""

    name = "bsr"
    fill_limit = 1.25  # stored tile entries per kept weight

    def applies(self, module, mask, device, dtype) -> str | None:
        reason = cpu_matrix_reason(module, device, dtype)
        if reason:
            return reason
        layout, fill = self.layout(mask)
        if layout is None:
            return (f"the kept weights do not form square blocks: tiles of {'/'.join(map(str, SIZES))} would store "
                    f"{fill:.2f} times the kept weights (at most {self.fill_limit})" if fill != float("inf")
                    else "no kept weight")
        return None

    def layout(self, mask: torch.Tensor):
        """`block_layout` of this mask (kept from `applies` for the `prepare` that follows it)."""
        cached = getattr(self, "_layout", None)
        if cached is None or cached[0] is not mask:
            self._layout = (mask, *block_layout(mask_matrix(mask), self.fill_limit))
        return self._layout[1:]

    def prepare(self, module: nn.Module, mask: torch.Tensor) -> None:
        self.geometry = Geometry.of(module)
        matrix = mask_matrix(mask)
        (self.size, rows, columns, empty), self.fill = self.layout(mask)
        device = module.weight.device
        weights = weight_matrix(module) * torch.from_numpy(matrix).to(device, module.weight.dtype)
        height, width = -(-rows.size // self.size) * self.size, -(-columns.size // self.size) * self.size
        packed = weights.new_zeros(height, width)
        packed[: rows.size, : columns.size] = weights[torch.from_numpy(rows)][:, torch.from_numpy(columns)]
        with sparse_beta_quiet():
            tiles_ = packed.to_sparse_bsr((self.size, self.size))
        padded = np.concatenate([columns, np.full(width - columns.size, columns[0])])  # padding: zero weights
        bias = None if module.bias is None else module.bias.detach()
        self.runner = PartsRunner(self.geometry, [Part(rows, padded, tiles_, bias)], empty, bias, device=device,
                                  grid_waste_limit=GRID_WASTE_LIMIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, lead = as_batched_image(x, self.geometry)
        return restore_shape(self.runner.run(images), lead, self.geometry)

    def describe(self) -> str:
        return f"{self.size}x{self.size} tiles storing {self.fill:.2f}x the kept weights"
