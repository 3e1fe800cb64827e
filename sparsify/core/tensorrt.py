"""TensorRT's rule for 2:4 sparse kernels, read off a conv or Linear weight.

TensorRT runs a convolution or fully connected layer with sparse tensor cores only when, for every
output channel and every kernel position, each group of 4 consecutive input channels holds at
least 2 zeros, and the input channels (per group of a grouped conv) are a multiple of 4. Whether it
then picks the sparse kernel is its own timing decision; this says whether it can.
"""

from __future__ import annotations

import torch

from sparsify.core.elements import to_groups

TENSORRT_PATTERN = "2:4"  # the n:m layout TensorRT's sparse kernels read
TENSORRT_RULE = "every 4 input channels at each (output channel, kernel tap) hold at least 2 zeros; CIN % 4 == 0"


def tensorrt_2to4(weight: torch.Tensor) -> str:
    """`yes` when TensorRT can run this (COUT, CIN, *taps) weight 2:4-sparse, else `no: <why>`."""
    if weight.dim() < 2:
        return f"no: a {weight.dim()}-d tensor is not a conv or Linear weight"
    cin = weight.shape[1]
    if cin % 4:
        return f"no: CIN {cin} not a multiple of 4"
    zeros = to_groups(weight.detach().eq(0), 4, fill=True).sum(-1)
    short = int((zeros < 2).sum())
    if short:
        return f"no: {short} groups with fewer than 2 zeros"
    return "yes"

