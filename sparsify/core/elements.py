"""Element-level patterns: unstructured (one weight per group) and n:m (n kept of every m input channels)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from sparsify.core.patterns import Pattern, PatternOptions, conv_or_linear_reason
from sparsify.errors import SparsifyError
from sparsify.registry import CRITERIA, PATTERNS


class ElementPattern(Pattern):
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


class UnstructuredOptions(PatternOptions):
    type: Literal["unstructured"] = "unstructured"


@PATTERNS.register("unstructured")
class UnstructuredPattern(ElementPattern):
    """One element per group (iterative magnitude pruning)."""

    name = "unstructured"
    Options = UnstructuredOptions
    supports_global = True
    supports_regroup = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnstructuredPattern)

    def __hash__(self) -> int:
        return hash("unstructured")

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        return conv_or_linear_reason(module)


class NMOptions(PatternOptions):
    type: Literal["nm"] = "nm"
    n: int = Field(default=2, ge=1)  # weights kept in every group
    m: int = Field(default=4, ge=2)  # group: m consecutive input channels at fixed (cout, kh, kw)


@PATTERNS.register("nm")
class NMPattern(ElementPattern):
    """n kept of every m consecutive input channels at fixed (cout, kh, kw); masks are element-level.

    The layout sparse tensor cores need (2:4). A tail of fewer than m channels keeps min(n, tail),
    as if it were zero-padded to m. One round reaches the pattern: see `select`.
    """

    name = "nm"
    Options = NMOptions
    one_round = True
    supports_permute = True

    def __init__(self, n: int = 2, m: int = 4) -> None:
        self.n, self.m = int(n), int(m)
        if not 0 < self.n < self.m:
            raise SparsifyError(f"pattern nm needs 0 < n < m, got {self.n}:{self.m}; e.g. n: 2, m: 4")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NMPattern) and (self.n, self.m) == (other.n, other.m)

    def __hash__(self) -> int:
        return hash(("nm", self.n, self.m))

    def __repr__(self) -> str:
        return f"NMPattern(n={self.n}, m={self.m})"

    @classmethod
    def from_options(cls, options: NMOptions) -> "NMPattern":
        return cls(options.n, options.m)

    @classmethod
    def parse(cls, text: str) -> dict | None:
        parts = text.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
            return {"type": "nm", "n": int(parts[0]), "m": int(parts[1])}
        return None

    @classmethod
    def apply_config_rules(cls, sparsity, given: set[str]) -> None:
        """nm defaults (criterion l1, Linear layers in, target (m-n)/m) and the keys nm refuses."""
        pattern = sparsity.pattern
        if pattern.n >= pattern.m:
            raise SparsifyError(f"sparsity.pattern: nm needs n < m, got {pattern.n}:{pattern.m}; e.g. n: 2, m: 4")
        target = round((pattern.m - pattern.n) / pattern.m, 6)
        if "target" in given and abs(sparsity.target - target) > 1e-6:
            raise SparsifyError(f"sparsity.target: pattern {pattern.n}:{pattern.m} zeros {pattern.m - pattern.n} of "
                                f"every {pattern.m} weights, so its target is {target}; remove target or set it to {target}")
        if "criterion" in given and CRITERIA.get(sparsity.criterion).needs_groups:
            raise SparsifyError(f"sparsity.criterion {sparsity.criterion!r} needs groups of several weights and nm "
                                "scores single weights; use criterion l1 (the default for nm) or l2")
        sparsity.target = target
        if "criterion" not in given:
            sparsity.criterion = "l1"
        if "include_linear" not in given:
            sparsity.include_linear = True

    def spec(self) -> dict:
        return {"type": "nm", "n": self.n, "m": self.m}

    def describe(self) -> str:
        return f"{self.n}:{self.m}"

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        reason = conv_or_linear_reason(module)
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

    def layout_problems(self, weight: torch.Tensor) -> list[str]:
        bad = int(self.count_violations(weight.detach()).sum())
        return [f"{bad} groups of {self.m} input channels hold more than {self.n} nonzeros"] if bad else []


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
