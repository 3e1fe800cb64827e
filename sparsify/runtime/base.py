"""Executor: how one pruned layer computes its output at inference, and the layer geometry they share.

An executor is a class registered with `@EXECUTORS.register(name)`. The runtime makes one instance
per layer: `applies(module, mask, device, dtype)` says why it cannot run that layer (None: it can),
`prepare(module, mask)` builds its packed weights once (on the module's device and dtype), and
`forward(x)` computes what `module(x)` computes with the masked weights. `mask` is the element mask
(weight-shaped, bool, True = kept). Executors are inference-only: outputs carry no gradient.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn


class Executor(ABC):
    """One way to run a pruned Conv2d or Linear layer."""

    name: ClassVar[str]

    def applies(self, module: nn.Module, mask: torch.Tensor, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this executor cannot run `module` (None: it can); the default takes what `matrix_reason` takes."""
        return matrix_reason(module)

    @abstractmethod
    def prepare(self, module: nn.Module, mask: torch.Tensor) -> None:
        """Build the packed weights from the module's (masked) weight, once."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for input `x`."""

    def describe(self) -> str:
        """One phrase about the packed form (blocks, block size, ...)."""
        return self.name


@dataclass(frozen=True)
class Geometry:
    """A Conv2d (groups 1, zero padding) or a Linear seen as one matrix (COUT, CIN*kh*kw) times im2col."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    linear: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> "Geometry":
        if isinstance(module, nn.Linear):
            return cls(module.in_features, module.out_features, linear=True)
        padding = module.padding
        if isinstance(padding, str):  # "valid" or "same" (odd kernels only, see matrix_reason)
            padding = (0, 0) if padding == "valid" else same_padding(module)
        return cls(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   tuple(padding), tuple(module.dilation))

    @property
    def columns(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def pointwise(self) -> bool:
        """A Linear, or a 1x1 conv with stride 1 and no padding: a plain matmul over channels."""
        return self.linear or (self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def describe(self) -> str:
        if self.linear:
            return "linear"
        text = f"conv {self.kernel[0]}x{self.kernel[1]}"
        return text + (f"/{self.stride[0]}" if self.stride != (1, 1) else "")


def matrix_reason(module: nn.Module) -> str | None:
    """Why `module` is not a layer the matrix executors run (None: a Linear or a plain groups=1 Conv2d)."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Conv2d or Linear layer"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else f"grouped (groups={module.groups})"
        return f"{kind} conv: only dense runs it"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}: only dense runs it"
    if module.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(module.kernel_size, module.dilation)):
        return "padding 'same' with an even kernel pads unevenly: only dense runs it"
    return None


CPU_DTYPES = (torch.float32, torch.float64)  # what the CPU sparse kernels (CSR, BSR) multiply


def cpu_matrix_reason(module: nn.Module, device, dtype: torch.dtype) -> str | None:
    """`matrix_reason`, and on CPU a dtype the sparse kernels cannot multiply."""
    reason = matrix_reason(module)
    if reason:
        return reason
    if torch.device(device).type == "cpu" and dtype not in CPU_DTYPES:
        return f"{dtype} on CPU: needs float32 or float64"
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (COUT, CIN*kh*kw), columns in PyTorch's (cin, kh, kw) order (a view)."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def same_padding(module: nn.Module) -> tuple[int, int]:
    """The symmetric padding that padding='same' means for an odd effective kernel."""
    return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))


def as_batched_image(x: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`x` as (N, C, H, W) for the im2col code, and the leading shape the output gets back.

    A Linear's input (..., IN) becomes (prod(...), IN, 1, 1); an unbatched conv input (C, H, W) gets N = 1.
    """
    if geometry.linear:
        lead = tuple(x.shape[:-1])
        return x.reshape(math.prod(lead), x.shape[-1], 1, 1), lead
    if x.dim() == 3:
        return x.unsqueeze(0), ()
    return x, (x.shape[0],)


def restore_shape(out: torch.Tensor, lead: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """Inverse of `as_batched_image` on the output (N, COUT, OH, OW)."""
    if geometry.linear:
        return out.reshape(*lead, out.shape[1])
    return out if lead else out.squeeze(0)


@contextmanager
def sparse_beta_quiet() -> Iterator[None]:
    """Silence torch's "sparse BSR/CSR tensor support is in beta state" warning while packing weights."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tensor support is in beta state.*")
        yield
