"""Pattern block: bo x bi blocks over (COUT, CIN), spanning all kernel taps (the first recipe's 8x8)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from sparsify.core.patterns import Pattern, PatternOptions, conv_or_linear_reason
from sparsify.registry import PATTERNS


class BlockOptions(PatternOptions):
    type: Literal["block"] = "block"
    block: list[int] = Field(default_factory=lambda: [8, 8])  # [bo, bi]: output x input channels

    @field_validator("block")
    @classmethod
    def _two_positive(cls, value: list[int]) -> list[int]:
        if len(value) != 2 or min(value) < 1:
            raise ValueError("block must be two positive integers [bo, bi], e.g. [8, 8]")
        return value


@PATTERNS.register("block")
class BlockPattern(Pattern):
    """`bo x bi` blocks over (COUT, CIN), spanning all kernel taps; short tail blocks at the edges."""

    name = "block"
    Options = BlockOptions
    supports_variance = True

    def __init__(self, bo: int = 8, bi: int = 8) -> None:
        self.bo, self.bi = int(bo), int(bi)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockPattern) and (self.bo, self.bi) == (other.bo, other.bi)

    def __hash__(self) -> int:
        return hash(("block", self.bo, self.bi))

    def __repr__(self) -> str:
        return f"BlockPattern(bo={self.bo}, bi={self.bi})"

    @classmethod
    def from_options(cls, options: BlockOptions) -> "BlockPattern":
        return cls(*options.block)

    @classmethod
    def parse(cls, text: str) -> dict | None:
        parts = text.split("x")
        if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
            return {"type": "block", "block": [int(parts[0]), int(parts[1])]}
        return None

    @classmethod
    def example(cls) -> "BlockPattern":
        return cls(2, 2)

    def spec(self) -> dict:
        return {"type": "block", "block": [self.bo, self.bi]}

    def describe(self) -> str:
        return f"block {self.bo}x{self.bi}"

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        reason = conv_or_linear_reason(module)
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
