"""Patterns: how a weight tensor is cut into groups, and how a group mask maps back to elements.

A group mask has one bool per group (True = kept). Every pattern also offers a 2-D "grid" view
of its mask, rows = output groups, so the row/column constraints are defined once for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.registry import Registry

PATTERNS: Registry[type] = Registry("pattern")


def _conv_or_linear_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed conv"
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise conv"
        if module.groups > 1:
            return f"grouped conv (groups={module.groups})"
        return None
    return f"{type(module).__name__} is not a conv or Linear layer"


@PATTERNS.register("block")
@dataclass(frozen=True)
class BlockPattern:
    """`bo x bi` blocks over (COUT, CIN), spanning all kernel taps; short tail blocks at the edges."""

    bo: int = 8
    bi: int = 8
    name = "block"

    def spec(self) -> dict:
        return {"type": "block", "block": [self.bo, self.bi]}

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        reason = _conv_or_linear_reason(module)
        if reason:
            return reason
        rows, cols = self.mask_shape(shape)
        if rows < 2 or cols < 2:
            return f"fewer than 2 blocks on an axis ({rows}x{cols} blocks of {self.bo}x{self.bi})"
        return None

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.ceil(shape[0] / self.bo), math.ceil(shape[1] / self.bi))

    def grid(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of `values` (weight-shaped) inside each block."""
        cout, cin = values.shape[:2]
        rows, cols = self.mask_shape(values.shape)
        plane = values.reshape(cout, cin, -1)
        plane = plane[:, :, 0] if plane.shape[2] == 1 else plane.sum(-1)
        if cout % self.bo or cin % self.bi:
            plane = nn.functional.pad(plane, (0, cols * self.bi - cin, 0, rows * self.bo - cout))
        return plane.reshape(rows, self.bo, cols, self.bi).sum((1, 3))

    def group_sizes(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Weights per block: block height x block width x kernel taps (tail blocks are shorter)."""
        rows, cols = self.mask_shape(shape)
        heights = torch.full((rows,), self.bo, dtype=torch.float64)
        heights[-1] = shape[0] - self.bo * (rows - 1)
        widths = torch.full((cols,), self.bi, dtype=torch.float64)
        widths[-1] = shape[1] - self.bi * (cols - 1)
        return torch.outer(heights, widths) * math.prod(shape[2:])

    def expand(self, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Element mask of `shape` from the block mask."""
        cout, cin = shape[:2]
        plane = mask.repeat_interleave(self.bo, 0)[:cout].repeat_interleave(self.bi, 1)[:, :cin]
        plane = plane.reshape(cout, cin, *([1] * (len(shape) - 2)))
        return plane.expand(shape).contiguous()


@PATTERNS.register("unstructured")
@dataclass(frozen=True)
class UnstructuredPattern:
    """One element per group; the grid view is (COUT, everything else)."""

    name = "unstructured"

    def spec(self) -> dict:
        return {"type": "unstructured"}

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        return _conv_or_linear_reason(module)

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def grid(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.reshape(mask.shape[0], -1)

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def group_sizes(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float64)

    def expand(self, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return mask.reshape(shape).contiguous()


def build_pattern(spec: dict):
    """Pattern object from its spec (a config section or checkpoint metadata)."""
    spec = dict(spec)
    kind = spec.pop("type")
    cls = PATTERNS.get(kind)
    if kind == "block":
        bo, bi = spec.pop("block", (8, 8))
        pattern = cls(int(bo), int(bi))
    else:
        pattern = cls()
    if spec:
        raise SparsifyError(f"pattern {kind!r} does not take {sorted(spec)}")
    return pattern


def describe_pattern(spec: dict) -> str:
    if spec["type"] == "block":
        return "block {}x{}".format(*spec["block"])
    return spec["type"]
