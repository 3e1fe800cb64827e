"""Executor semi_structured: 2:4 weights as torch's semi-structured sparse tensors (cuSPARSELt where torch
has it, else CUTLASS), CUDA only, float16 or bfloat16.

It runs Linear layers and 1x1 convs with stride 1 and no padding (a matmul over channels, the
input read as (N*H*W, CIN)). The mask must keep at most 2 of every 4 consecutive input channels,
and the weight must be a multiple of the backend's smallest sparse tile in rows and columns
(cuSPARSELt, torch's default: 16 x 16 in float16/bfloat16; CUTLASS: 32 x 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.registry import EXECUTORS
from sparsify.runtime.base import Executor, Geometry, matrix_reason, weight_matrix

DTYPES = (torch.float16, torch.bfloat16)
CUTLASS_TILE = (32, 64)  # rows, columns: the larger of the two backends' tiles, used when torch does not say


def backend():
    """The sparse tensor class torch would use: cuSPARSELt where it is built in, else CUTLASS (or when
    CUTLASS is forced); None when this torch has neither."""
    try:
        from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                                  SparseSemiStructuredTensorCUTLASS)
    except ImportError:
        return None
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if SparseSemiStructuredTensor._FORCE_CUTLASS or cusparselt is None or not cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def sparse_tile(dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, columns) a sparse weight must be a multiple of, for `backend()`."""
    try:
        limits = backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(limits.sparse_min_rows), int(limits.sparse_min_cols)
    except (AttributeError, KeyError):
        return CUTLASS_TILE


def two_of_four_reason(mask: torch.Tensor) -> str | None:
    """Why a (COUT, CIN) mask is not 2:4 along CIN (None: it is)."""
    matrix = mask.reshape(mask.shape[0], -1)
    if matrix.shape[1] % 4:
        return f"{matrix.shape[1]} input channels is not a multiple of 4"
    crowded = int((matrix.reshape(matrix.shape[0], -1, 4).sum(-1) > 2).sum())
    return f"{crowded} groups of 4 input channels keep more than 2 weights: not 2:4" if crowded else None


@EXECUTORS.register("semi_structured")
class SemiStructured(Executor):
    """2:4 sparse matmul on CUDA (Linear and 1x1 convs)."""

    name = "semi_structured"

    def applies(self, module, mask, device, dtype) -> str | None:
        if torch.device(device).type != "cuda":
            return "needs CUDA"
        if backend() is None:
            return f"torch {torch.__version__} has no semi-structured sparse tensors"
        if dtype not in DTYPES:
            return f"{dtype}: needs float16 or bfloat16"
        reason = matrix_reason(module)
        if reason:
            return reason
        if not Geometry.of(module).pointwise:
            return "a conv with a kernel, stride or padding: needs a Linear or a 1x1 conv (stride 1, no padding)"
        rows, columns = mask.shape[0], mask[0].numel()
        tile_rows, tile_columns = sparse_tile(dtype)
        if rows % tile_rows or columns % tile_columns:
            return f"weight {rows}x{columns}: needs a multiple of {tile_rows} rows and {tile_columns} columns"
        return two_of_four_reason(mask)

    def prepare(self, module: nn.Module, mask: torch.Tensor) -> None:
        self.geometry = Geometry.of(module)
        weights = weight_matrix(module) * mask.reshape(mask.shape[0], -1).to(module.weight.device, module.weight.dtype)
        self.weight = backend().from_dense(weights.contiguous())
        self.bias = None if module.bias is None else module.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.geometry.linear:  # (the sparse matmul views the input as rows: it must be contiguous)
            return F.linear(x.contiguous(), self.weight, self.bias)
        images = x if x.dim() == 4 else x.unsqueeze(0)
        n, c, h, w = images.shape
        rows = images.permute(0, 2, 3, 1).reshape(-1, c)
        out = F.linear(rows, self.weight, self.bias).view(n, h, w, -1).permute(0, 3, 1, 2)
        return out if x.dim() == 4 else out.squeeze(0)
