"""Executor blockgemm (seed 002): one dense GEMM per row x column block, the rest in a CSR remainder.

The blocks come from the mask (`sparsify.runtime.blocks`): rows keeping exactly the same columns.
For each block the input rows of its columns are gathered through the implicit im2col
(`sparsify.runtime.im2col`), multiplied by the block's dense weights (rows x columns) in one GEMM
over a chunk of images and all their positions, and written into the block's output channels
(`sparsify.runtime.parts`). Rows in groups of fewer than `min_rows` go to one CSR matrix over the
columns they use (torch.sparse_csr mm): unlike the seed's kernel, no weight outside the blocks is
ever dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify.registry import EXECUTORS
from sparsify.runtime.base import (
    Executor, Geometry, as_batched_image, cpu_matrix_reason, restore_shape, sparse_beta_quiet, weight_matrix,
)
from sparsify.runtime.blocks import coverage, mask_matrix, row_groups, split_groups
from sparsify.runtime.im2col import GRID_WASTE_LIMIT
from sparsify.runtime.parts import Part, PartsRunner



@EXECUTORS.register("blockgemm")
class BlockGemm(Executor):
    """Dense GEMMs on the mask's row x column blocks (implicit im2col) plus a CSR remainder."""

    name = "blockgemm"
    min_rows = 4  # a group of fewer rows goes to the CSR remainder
    grid_waste_limit = GRID_WASTE_LIMIT

    def applies(self, module, mask, device, dtype) -> str | None:
        return cpu_matrix_reason(module, device, dtype)

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
        self.runner = PartsRunner(self.geometry, self.parts, empty, bias, device=module.weight.device,
                                  grid_waste_limit=self.grid_waste_limit)
        self.kept, self.in_blocks = int(matrix.sum()), coverage(blocks)

    def plan(self, height: int, width: int):
        """The im2col of this input size and each part's gather index."""
        return self.runner.plan(height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, lead = as_batched_image(x, self.geometry)
        return restore_shape(self.runner.run(images), lead, self.geometry)

    def describe(self) -> str:
        dense = sum(not p.sparse for p in self.parts)
        share = self.in_blocks / max(self.kept, 1)
        remainder = ", CSR remainder" if dense < len(self.parts) else ""
        return f"{dense} blocks holding {share:.0%} of the kept weights{remainder}"


def remainder_part(groups, weights: torch.Tensor, bias: torch.Tensor | None) -> Part:
    """One CSR part for the rows of the small groups, over the union of the columns they keep."""
    rows = np.sort(np.concatenate([g.rows for g in groups]))
    columns = np.unique(np.concatenate([g.columns for g in groups]))
    block = weights[torch.from_numpy(rows)][:, torch.from_numpy(columns)]
    with sparse_beta_quiet():
        return Part(rows, columns, block.to_sparse_csr(), bias)
