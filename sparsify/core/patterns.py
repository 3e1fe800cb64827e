"""Patterns: how a weight tensor is cut into groups, and how a group mask maps back to elements.

A pattern is one `Pattern` subclass registered with `@PATTERNS.register(name)`; its `Options`
(a pydantic model) are the keys of the config's `sparsity.pattern` section besides `type`,
and its spec (`{"type": name, **options}`) is what checkpoints record. A group mask has one
bool per group (True = kept). Every pattern also offers a 2-D "grid" view of its mask, rows =
output groups, so the row/column constraints are defined once for all patterns. What differs
between patterns is a method or a class attribute here, never a test of the pattern's name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.registry import CRITERIA, PATTERNS


class PatternOptions(BaseModel):
    """Base of every pattern's options: strict, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Pattern(ABC):
    """How one weight tensor is cut into groups."""

    name: ClassVar[str]
    Options: ClassVar[type[PatternOptions]]
    one_round: ClassVar[bool] = False  # a single prune round reaches the pattern (`select`); step/target do not apply
    supports_variance: ClassVar[bool] = False  # groups of several weights: criterion variance applies
    supports_global: ClassVar[bool] = False  # scope: global can rank its groups across layers
    supports_regroup: ClassVar[bool] = False  # sparsity.regroup can turn its masks into dense blocks
    supports_permute: ClassVar[bool] = False  # sparsity.permute can reorder input channels for it

    @classmethod
    def from_options(cls, options: PatternOptions) -> "Pattern":
        """The pattern of a validated options object (default: no options)."""
        return cls()

    @classmethod
    def parse(cls, text: str) -> dict | None:
        """The spec of a short form this pattern understands (`sparsify check --pattern`), else None."""
        return {"type": cls.name} if text == cls.name else None

    @classmethod
    def example(cls) -> "Pattern":
        """A small instance for the contract tests."""
        return cls()

    @classmethod
    def apply_config_rules(cls, sparsity, given: set[str]) -> None:
        """Defaults and refusals this pattern imposes on the `sparsity:` section (SparsifyError)."""
        if sparsity.permute.enabled and not cls.supports_permute:
            raise SparsifyError(f"sparsity.permute applies to pattern nm only, not {cls.name!r}; "
                                "set permute.enabled: false or pattern: {type: nm, n: 2, m: 4}")

    def spec(self) -> dict:
        """What checkpoints record: {"type": name, **options}."""
        return {"type": self.name}

    def describe(self) -> str:
        """Short text for tables and messages: 'block 8x8', '2:4', 'unstructured'."""
        return self.name

    @abstractmethod
    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        """Why `module`'s weight of `shape` cannot carry this pattern (None: it can)."""

    @abstractmethod
    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the group mask of a weight of `shape`."""

    @abstractmethod
    def grid(self, mask: torch.Tensor) -> torch.Tensor:
        """2-D view of a group mask: rows are output groups."""

    @abstractmethod
    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of weight-shaped `values` inside each group (mask-shaped)."""

    @abstractmethod
    def group_sizes(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Weights per group (float64, mask-shaped)."""

    @abstractmethod
    def expand(self, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Element mask of `shape` from a group mask."""

    def select(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One-round patterns: the mask that keeps the best groups by `scores` (see `one_round`)."""
        raise NotImplementedError(f"pattern {self.name} is pruned by ranking, not by select")

    def target_zeros(self, shape: tuple[int, ...]) -> int:
        """One-round patterns: the zeros a weight of `shape` has once the pattern holds."""
        raise NotImplementedError(f"pattern {self.name} reaches its target over rounds")

    def layout_problems(self, weight: torch.Tensor) -> list[str]:
        """What in a weight's nonzeros breaks the pattern's layout beyond its mask (`sparsify check`)."""
        return []


def conv_or_linear_reason(module: nn.Module) -> str | None:
    """Why a module is not a dense conv or Linear layer (None: it is)."""
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


def build_pattern(spec: dict) -> Pattern:
    """Pattern object from its spec (a config section or checkpoint metadata)."""
    from pydantic import ValidationError

    spec = {"type": "block", **dict(spec)}
    cls = PATTERNS.get(spec["type"])
    try:
        options = cls.Options.model_validate(spec, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SparsifyError(f"pattern {spec['type']!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return cls.from_options(options)


def parse_pattern(text: str) -> dict:
    """Pattern spec from a short form any registered pattern understands: '2:4', '8x8', 'unstructured'."""
    text = text.strip().lower()
    for _, cls in PATTERNS.items():
        spec = cls.parse(text)
        if spec is not None:
            return spec
    raise SparsifyError(f"pattern {text!r} is not understood; write N:M with N < M (2:4), BOxBI (8x8) or "
                        f"the name of a pattern ({', '.join(PATTERNS.names())})")


def describe_pattern(spec: dict) -> str:
    """Short text of a pattern spec: 'block 8x8', '2:4', 'unstructured'."""
    return build_pattern(spec).describe()
