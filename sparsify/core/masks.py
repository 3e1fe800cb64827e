"""Masks on a live model: initial masks, in-place enforcement, per-layer statistics, checks."""

from __future__ import annotations

import torch
from torch import nn

from sparsify.errors import CheckpointError


def full_masks(model: nn.Module, names: list[str], pattern) -> dict[str, torch.Tensor]:
    """All-kept group masks for the named weights."""
    params = dict(model.named_parameters())
    return {n: torch.ones(pattern.mask_shape(tuple(params[n].shape)), dtype=torch.bool) for n in names}


class MaskEnforcer:
    """Keeps masked weights at exactly 0.0: call `mask_grads_` before and `apply_` after each step.

    Element masks are expanded once and kept on the parameters' device and dtype, so the
    per-step cost is one multiply per masked tensor (weights) and one for gradients. The pattern's
    `followers` (per-channel parameters, e.g. the BatchNorm after a channel-pruned layer) are zeroed
    where their weight's whole output channel is pruned.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], pattern) -> None:
        self.pattern = pattern
        self.params = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        self.elements: dict[str, torch.Tensor] = {}
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.followers = pattern.followers(model, list(masks)) if masks else {}
        for name, mask in masks.items():
            self.set_mask(name, mask)

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Install (or replace) the group mask of one weight; methods that change masks call this."""
        param = self.params[name]
        self.masks[name] = mask.to("cpu", torch.bool)
        element = self.pattern.expand(self.masks[name], tuple(param.shape))
        self.elements[name] = element.to(device=param.device, dtype=param.dtype)
        channels = self.masks[name].reshape(self.masks[name].shape[0], -1).any(1)  # False: whole channel pruned
        for follower in (f for f, weight in self.followers.items() if weight == name):
            target = self.params[follower]
            self.elements[follower] = channels.to(device=target.device, dtype=target.dtype)
        self.pairs = [(self.params[n], e) for n, e in self.elements.items()]

    @torch.no_grad()
    def apply_(self) -> None:
        for param, element in self.pairs:
            param.mul_(element)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for param, element in self.pairs:
            if param.grad is not None:
                param.grad.mul_(element)


def find_unmasked_nonzeros(
    state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], pattern
) -> list[str]:
    """Names of weights with a nonzero (or NaN) value inside a masked-out group (the drift guard)."""
    bad = []
    for name, mask in masks.items():
        magnitude = pattern.group_sum(state[name].detach().abs())
        if bool(magnitude.reshape(mask.shape)[~mask].ne(0).any()):
            bad.append(name)
    return bad


def check_masks(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], pattern, *, source) -> None:
    """Refuse masks that do not fit their weights, or weights that drifted inside pruned groups."""
    check_mask_shapes(state, masks, pattern)
    drifted = find_unmasked_nonzeros(state, masks, pattern)
    if drifted:
        more = f" (and {len(drifted) - 1} more)" if len(drifted) > 1 else ""
        raise CheckpointError(f"{source} has nonzero weights inside pruned groups of {drifted[0]}{more}; "
                              "it was altered or written by a faulty tool")


def check_mask_shapes(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], pattern) -> None:
    for name, mask in masks.items():
        if name not in state:
            raise CheckpointError(f"mask {name!r} has no weight of that name in the checkpoint")
        expected = tuple(pattern.mask_shape(tuple(state[name].shape)))
        if tuple(mask.shape) != expected or mask.dtype != torch.bool:
            raise CheckpointError(
                f"mask {name!r} has shape {tuple(mask.shape)} ({mask.dtype}); a weight of shape "
                f"{tuple(state[name].shape)} needs a bool mask of shape {expected}"
            )
