"""Exponential moving average of a model's weights, evaluated in place of the trained model.

The average covers parameters and floating-point buffers (BatchNorm statistics); integer
buffers (`num_batches_tracked`) are copied. Every update is ema <- ema + (1 - decay) * (w - ema),
so a weight that is exactly 0.0 in the model and in the average stays exactly 0.0: an average
started from a masked model keeps its pruned weights at zero as long as the model does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsify.errors import SparsifyError


class ModelEma:
    """A frozen copy of `model` whose weights follow it with `decay`, every `every` steps."""

    def __init__(self, model: nn.Module, *, decay: float, every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise SparsifyError(f"EMA decay must be in [0, 1), got {decay}; try 0.9998 (per update)")
        if every < 1:
            raise SparsifyError(f"EMA every must be at least 1 step, got {every}; use 1 to update each step")
        self.decay = decay
        self.every = every
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list, list]:
        """(average, model) tensors to blend, and (average, model) integer buffers to copy."""
        mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            raise SparsifyError("the EMA copy and the model have different state_dict keys; "
                                "build the ModelEma from the model it averages")
        blend_a, blend_b, copy_a, copy_b = [], [], [], []
        for key, value in mine.items():
            other = theirs[key].detach()
            if value.dtype.is_floating_point:
                blend_a.append(value.data)
                blend_b.append(other)
            else:
                copy_a.append(value)
                copy_b.append(other)
        return blend_a, blend_b, copy_a, copy_b

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Blend `model` into the average when `step` is a multiple of `every`; True if it did."""
        if step % self.every:
            return False
        blend_a, blend_b, copy_a, copy_b = self._pairs(model)
        if blend_a:
            torch._foreach_lerp_(blend_a, blend_b, 1.0 - self.decay)
        for mine, theirs in zip(copy_a, copy_b):
            mine.copy_(theirs)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights and buffers, keyed like the model's own state_dict."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averaged weights saved by `state_dict` (strict: keys and shapes must match)."""
        try:
            self.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SparsifyError(f"EMA state does not fit the model ({first}); "
                                "resume with the same model.arch it was saved with") from None

    def to(self, device: torch.device | str) -> "ModelEma":
        """Move the averaged copy to `device`."""
        self.module.to(device)
        return self

    @torch.no_grad()
    def copy_to_(self, model: nn.Module) -> None:
        """Overwrite `model`'s weights and buffers with the average (to save or export it)."""
        model.load_state_dict(self.module.state_dict(), strict=True)
