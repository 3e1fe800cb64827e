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


class ElementMasks:
    """Masks with one entry per weight (element-level); the grid view is (COUT, everything else)."""

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


@PATTERNS.register("unstructured")
@dataclass(frozen=True)
class UnstructuredPattern(ElementMasks):
    """One element per group (iterative magnitude pruning)."""

    name = "unstructured"

    def spec(self) -> dict:
        return {"type": "unstructured"}

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        return _conv_or_linear_reason(module)


@PATTERNS.register("nm")
@dataclass(frozen=True)
class NMPattern(ElementMasks):
    """n kept of every m consecutive input channels at fixed (cout, kh, kw); masks are element-level.

    The layout sparse tensor cores need (2:4). A tail of fewer than m channels keeps min(n, tail),
    as if it were zero-padded to m. One round reaches the pattern: see `select`.
    """

    n: int = 2
    m: int = 4
    name = "nm"

    def spec(self) -> dict:
        return {"type": "nm", "n": self.n, "m": self.m}

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        reason = _conv_or_linear_reason(module)
        if reason:
            return reason
        if shape[0] % 8 or shape[1] % 16 or shape[1] % self.m:
            return f"needs COUT % 8 == 0 and CIN % 16 == 0 for {self.n}:{self.m} (has {shape[0]}x{shape[1]})"
        return None

    def target_zeros(self, shape: tuple[int, ...]) -> int:
        """Zeros once every group keeps n (a tail of t < m channels keeps min(n, t))."""
        cin, rest = shape[1], math.prod(shape) // shape[1]
        full, tail = divmod(cin, self.m)
        return rest * (full * (self.m - self.n) + max(0, tail - self.n))

    def select(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Element mask keeping the n best-scoring kept weights of every group (ties: lower channel)."""
        groups = to_groups(scores.double().masked_fill(~mask, -math.inf), self.m, fill=-math.inf)
        order = torch.sort(-groups, dim=-1, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., : self.n], True)
        return from_groups(keep, tuple(mask.shape)) & mask

    def count_violations(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-output-channel count of groups with more than n nonzeros."""
        groups = to_groups(weight.ne(0), self.m, fill=False)
        return (groups.sum(-1) > self.n).reshape(weight.shape[0], -1).sum(1)


def to_groups(values: torch.Tensor, m: int, *, fill) -> torch.Tensor:
    """(COUT, *taps, ceil(CIN/m), m) view of a (COUT, CIN, *taps) tensor; the tail padded with `fill`."""
    moved = values.movedim(1, -1)
    cin = moved.shape[-1]
    pad = -cin % m
    if pad:
        filler = torch.full((*moved.shape[:-1], pad), fill, dtype=moved.dtype)
        moved = torch.cat([moved, filler], -1)
    return moved.reshape(*moved.shape[:-1], -1, m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_groups`: back to (COUT, CIN, *taps), dropping the padding."""
    flat = groups.reshape(*groups.shape[:-2], -1)[..., : shape[1]]
    return flat.movedim(-1, 1).contiguous()


def parse_pattern(text: str) -> dict:
    """Pattern spec from its short form: '2:4' (nm), '8x8' (block) or 'unstructured'."""
    text = text.strip().lower()
    parts = text.replace(":", "x").split("x")
    if text == "unstructured":
        return {"type": "unstructured"}
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        a, b = map(int, parts)
        if ":" in text and a < b:
            return {"type": "nm", "n": a, "m": b}
        if "x" in text:
            return {"type": "block", "block": [a, b]}
    raise SparsifyError(f"pattern {text!r} is not understood; write N:M with N < M (2:4), BOxBI (8x8) or unstructured")


def build_pattern(spec: dict):
    """Pattern object from its spec (a config section or checkpoint metadata)."""
    spec = dict(spec)
    kind = spec.pop("type")
    cls = PATTERNS.get(kind)
    if kind == "block":
        bo, bi = spec.pop("block", (8, 8))
        pattern = cls(int(bo), int(bi))
    elif kind == "nm":
        pattern = cls(int(spec.pop("n", 2)), int(spec.pop("m", 4)))
        if not 0 < pattern.n < pattern.m:
            raise SparsifyError(f"pattern nm needs 0 < n < m, got {pattern.n}:{pattern.m}; e.g. n: 2, m: 4")
    else:
        pattern = cls()
    if spec:
        raise SparsifyError(f"pattern {kind!r} does not take {sorted(spec)}")
    return pattern


def describe_pattern(spec: dict) -> str:
    """Short text of a pattern spec: 'block 8x8', '2:4', 'unstructured'."""
    if spec["type"] == "block":
        return "block {}x{}".format(*spec["block"])
    if spec["type"] == "nm":
        return "{}:{}".format(spec.get("n", 2), spec.get("m", 4))
    return spec["type"]
