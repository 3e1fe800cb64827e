"""Pattern channel (filter pruning): a group is one output channel of a conv or Linear weight.

The mask has shape (COUT, 1): a zeroed group is a whole output row (all input channels and
kernel taps). What ties channels across layers (residual adds, BatchNorm, depthwise convs,
consumers) is found by the prune round's channel hook (rounds/channelgroups.py), which prunes
tied producers together and skips what the channel graph cannot follow.

Mask semantics: a pruned channel is gone. Its producer weights and bias are exactly 0, and so are the
scale and shift of the BatchNorm right after the producer (`followers`, kept at zero by the MaskEnforcer
while training), so the channel carries exact zeros to its consumers, whatever the running
statistics. The consumers' input weights are not masked: `export --compact` removes them with the
channel (graph/compact.py), and folds any constant a later op adds (a bias, the shift of a
BatchNorm after a depthwise conv) into the next layer's bias.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import nn

from sparsify.core.patterns import Pattern, PatternOptions, conv_or_linear_reason
from sparsify.errors import SparsifyError
from sparsify.registry import PATTERNS


class ChannelOptions(PatternOptions):
    type: Literal["channel"] = "channel"


@PATTERNS.register("channel")
class ChannelPattern(Pattern):
    """Whole output channels; tied producers are pruned together by the round's channel hook."""

    name = "channel"
    Options = ChannelOptions
    supports_variance = True
    couples_channels: ClassVar[bool] = True  # the prune round couples producers through the channel graph
    supports_global: ClassVar[bool] = True  # scope global: one ranking of channels over the model ...
    global_share: ClassVar[str] = "macs"  # ... whose target is a share of the model's multiply-adds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelPattern)

    def __hash__(self) -> int:
        return hash("channel")

    @classmethod
    def apply_config_rules(cls, sparsity, given: set[str]) -> None:
        """balanced has no row to balance (a row is one group); keep_rows does not apply, keep_cols keeps one
        channel in every layer."""
        super().apply_config_rules(sparsity, given)
        if sparsity.balanced:
            raise SparsifyError("sparsity.balanced spreads zeros over the groups of each output row, and with "
                                "pattern channel a row is one group; set balanced: false")

    def ineligible_reason(self, module: nn.Module, shape: tuple[int, ...]) -> str | None:
        reason = conv_or_linear_reason(module)
        if reason:
            return reason
        if shape[0] < 2:
            return "a single output channel"
        return None

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], 1)

    def grid(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(values.shape[0], -1).sum(1, keepdim=True)

    def group_sizes(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full((shape[0], 1), float(math.prod(shape[1:])), dtype=torch.float64)

    def expand(self, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return mask.reshape(shape[0], *([1] * (len(shape) - 1))).expand(shape).contiguous()

    def followers(self, model: nn.Module, names: list[str]) -> dict[str, str]:
        """Each named layer's bias, and the scale and shift of the BatchNorm right after it (when the model
        can be traced)."""
        from torch import fx

        from sparsify.graph.channels import batchnorm_after

        params = dict(model.named_parameters())
        found = {f"{name[: -len('weight')]}bias": name for name in names
                 if name.endswith(".weight") and f"{name[: -len('weight')]}bias" in params}
        try:
            after = batchnorm_after(fx.symbolic_trace(model))
        except Exception:  # data-dependent control flow: the channel hook prunes nothing in such a model
            return found
        modules = dict(model.named_modules())
        for name in names:
            bn = modules.get(after[name]) if name in after else None
            if bn is not None and bn.affine:
                found.update({f"{after[name]}.weight": name, f"{after[name]}.bias": name})
        return found
