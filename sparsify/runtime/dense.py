"""Executor dense: the layer's own forward with its masked weights (the reference every other executor
is compared with and timed against)."""

from __future__ import annotations

import torch
from torch import nn

from sparsify.registry import EXECUTORS
from sparsify.runtime.base import Executor


@EXECUTORS.register("dense")
class Dense(Executor):
    """The module as it is; runs every layer (depthwise and grouped convs included)."""

    name = "dense"

    def applies(self, module, mask, device, dtype) -> str | None:
        return None

    def prepare(self, module: nn.Module, mask: torch.Tensor) -> None:
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
