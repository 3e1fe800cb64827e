"""Executor blockgemm (seed 002): one dense GEMM per row x column block, the rest in a CSR remainder.

The blocks come from the mask (`sparsify.runtime.blocks`): rows keeping exactly the same columns.
For each block the input rows of its columns are gathered once through the implicit im2col
(`sparsify.runtime.im2col`), multiplied by the block's dense weights (rows x columns) in one GEMM
over all images and positions, and written into the block's output channels. Rows in groups of
fewer than `min_rows` go to one CSR matrix over the columns they use (torch.sparse_csr mm): unlike
the seed's kernel, no weight outside the blocks is ever dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify.registry import EXECUTORS
from sparsify.runtime.base import (
    Executor, Geometry, as_batched_image, matrix_reason, restore_shape, sparse_beta_quiet, weight_matrix,
)
from sparsify.runtime.blocks import coverage, mask_matrix, row_groups, split_groups
from sparsify.runtime.im2col import GRID_WASTE_LIMIT, Im2col, Rows, fill_rows_

CPU_DTYPES = (torch.float32, torch.float64)


class Part:
    """Rows computed by one matmul: a dense block, or the CSR remainder."""

    def __init__(self, rows: np.ndarray, columns: np.ndarray, weight: torch.Tensor, bias: torch.Tensor | None):
        self.rows = Rows(rows, weight.device)
        self.columns = columns
        self.weight = weight  # dense (rows, columns) or sparse CSR
        self.bias = None if bias is None else bias[torch.from_numpy(rows).to(bias.device)].unsqueeze(1)
        self.sparse = weight.layout == torch.sparse_csr

    def multiply(self, gathered: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            y = torch.sparse.mm(self.weight, gathered)
            return y if self.bias is None else y.add_(self.bias)
        if self.bias is None:
            return torch.mm(self.weight, gathered)
        return torch.addmm(self.bias, self.weight, gathered)


@EXECUTORS.register("blockgemm")
class BlockGemm(Executor):
    """Dense GEMMs on the mask's row x column blocks (implicit im2col) plus a CSR remainder."""

    name = "blockgemm"
    min_rows = 4  # a group of fewer rows goes to the CSR remainder
    grid_waste_limit = GRID_WASTE_LIMIT

    def applies(self, module, mask, device, dtype) -> str | None:
        reason = matrix_reason(module)
        if reason:
            return reason
        if torch.device(device).type == "cpu" and dtype not in CPU_DTYPES:
            return f"{dtype} on CPU: needs float32 or float64"
        return None

    def prepare(self, module: nn.Module, mask: torch.Tensor) -> None:
        self.geometry = Geometry.of(module)
        matrix = mask_matrix(mask)
        weights = weight_matrix(module) * torch.from_numpy(matrix).to(module.weight.device, module.weight.dtype)
        bias = None if module.bias is None else module.bias.detach()
        groups, empty = row_groups(matrix)
        blocks, rest = split_groups(groups, self.min_rows)
        self.parts = [Part(g.rows, g.columns, weights[torch.from_numpy(g.rows)][:, torch.from_numpy(g.columns)]
                           .contiguous(), bias) for g in blocks]
        if rest:
            self.parts.append(remainder_part(rest, weights, bias))
        self.empty = Rows(empty, weights.device)
        self.bias = bias
        self.kept = int(matrix.sum())
        self.in_blocks = coverage(blocks)
        self.plans: dict[tuple[int, int], tuple[Im2col, list[torch.Tensor]]] = {}

    def plan(self, height: int, width: int) -> tuple[Im2col, list[torch.Tensor]]:
        """The im2col of this input size and each part's gather index (built once per size)."""
        key = (height, width)
        if key not in self.plans:
            im2col = Im2col(self.geometry, height, width, grid_waste_limit=self.grid_waste_limit)
            device = self.empty.index.device
            self.plans[key] = (im2col, [im2col.index(part.columns, device) for part in self.parts])
        return self.plans[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, lead = as_batched_image(x, self.geometry)
        n = images.shape[0]
        im2col, indexes = self.plan(images.shape[2], images.shape[3])
        view = im2col.view(im2col.buffer(images), n)
        out = images.new_empty(n, self.geometry.out_channels, im2col.out_h, im2col.out_w)
        for part, index in zip(self.parts, indexes):
            part.rows.write_(out, im2col.output(part.multiply(im2col.gather(view, index)), n))
        fill_rows_(out, self.empty, self.bias)
        return restore_shape(out, lead, self.geometry)

    def describe(self) -> str:
        dense = sum(not p.sparse for p in self.parts)
        share = self.in_blocks / max(self.kept, 1)
        return f"{dense} blocks holding {share:.0%} of the kept weights" + (", CSR remainder" if dense < len(self.parts)
                                                                          else "")


def remainder_part(groups, weights: torch.Tensor, bias: torch.Tensor | None) -> Part:
    """One CSR part for the rows of the small groups, over the union of the columns they keep."""
    rows = np.sort(np.concatenate([g.rows for g in groups]))
    columns = np.unique(np.concatenate([g.columns for g in groups]))
    block = weights[torch.from_numpy(rows)][:, torch.from_numpy(columns)]
    with sparse_beta_quiet():
        return Part(rows, columns, block.to_sparse_csr(), bias)
