"""Patterns: how a weight tensor is cut into groups, and how a group mask maps back to elements.

A pattern is one `Pattern` subclass registered with `@PATTERNS.register(name)`; its `Options`
(a pydantic model) are the keys of the config's `sparsity.pattern` section besides `type`,
and its spec (`{"type": name, **options}`) is what checkpoints record. A group mask has one
bool per group (True = kept). Every pattern also offers a 2-D "grid" view of its mask, rows =
output groups, so the row/column constraints are defined once for all patterns. What differs
between patterns is a method or a class attribute here, never a test of the pattern's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.registry import PATTERNS


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
    global_share: ClassVar[str] = "groups"  # scope global's target is a share of: groups (prune_round_global) or
    # macs (the model's multiply-adds, counted by the prune round's channel hook: rounds/channelglobal.py)
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
        if sparsity.scope == "global" and not cls.supports_global:
            raise SparsifyError(f"sparsity.scope 'global' (one ranking over all layers) applies to pattern "
                                f"unstructured (a share of the weights) or channel (a share of the multiply-adds), "
                                f"not {cls.name!r}; use scope: layer")
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

    def followers(self, model: nn.Module, names: list[str]) -> dict[str, str]:
        """Per-channel parameters zeroed with a named weight's fully pruned output channels (parameter -> weight)."""
        return {}


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
        return weight_transform_reason(module)
    return f"{type(module).__name__} is not a conv or Linear layer"


_LINEAR_IN_WEIGHT: dict[type, str | None] = {}  # a class with its own forward -> why its zeros do not stay zero


def weight_transform_reason(module: nn.Module) -> str | None:
    """Why a conv subclass with its own forward cannot be pruned: its output is not linear in its weight
    (e.g. weight standardisation, (w - mean) / std, turns pruned zeros into nonzeros). None: it can."""
    cls = type(module)
    base = next(b for b in cls.__mro__ if b.__module__.startswith("torch.nn."))
    if cls.forward is base.forward:
        return None
    if cls not in _LINEAR_IN_WEIGHT:
        _LINEAR_IN_WEIGHT[cls] = probe_linear_in_weight(module)
    return _LINEAR_IN_WEIGHT[cls]


def probe_linear_in_weight(module: nn.Module) -> str | None:
    """f(wa) + f(wb) == f(wa + wb) for the layer's forward with zero bias, on a small random input (a copy)."""
    import copy

    name = type(module).__name__
    try:
        probe = copy.deepcopy(module).to_empty(device="cpu").float().eval()
        generator = torch.Generator().manual_seed(0)
        shape = (1, probe.in_channels, *[k * d + 3 for k, d in zip(probe.kernel_size, probe.dilation)])
        x = torch.randn(shape, generator=generator)
        weights = [torch.randn(probe.weight.shape, generator=generator) for _ in range(2)]
        outputs = []
        with torch.no_grad():
            if probe.bias is not None:
                probe.bias.zero_()
            for weight in (weights[0], weights[1], weights[0] + weights[1]):
                probe.weight.copy_(weight)
                outputs.append(probe(x))
    except Exception as exc:  # a forward this probe cannot call: do not guess
        return f"{name} has its own forward, which could not be checked ({type(exc).__name__}): not pruned"
    total = outputs[0] + outputs[1]
    if torch.allclose(total, outputs[2], rtol=1e-3, atol=1e-4 * max(float(total.abs().max()), 1.0)):
        return None
    return f"{name}'s forward transforms its weight (pruned zeros would not stay zero): not pruned"


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
