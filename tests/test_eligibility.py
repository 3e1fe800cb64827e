"""Which layers a pattern may prune: conv subclasses whose forward transforms the weight are left dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.core.block import BlockPattern
from sparsify.core.prune import find_layers


class StandardisedConv(nn.Conv2d):  # weight standardisation, as in BiT / NFNet convolutions
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5), self.bias, self.stride, self.padding)


class SamePaddedConv(nn.Conv2d):  # its own forward, still linear in the weight: zeros stay zeros
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


def test_a_conv_whose_forward_transforms_its_weight_is_not_pruned():
    model = nn.Sequential(StandardisedConv(16, 16, 3), SamePaddedConv(16, 16, 3), nn.Conv2d(16, 16, 1))
    reasons = {layer.name: layer.reason for layer in find_layers(model, BlockPattern(8, 8), include_linear=False,
                                                                 exclude=[])}
    assert "transforms its weight" in reasons["0.weight"]
    assert reasons["1.weight"] is None and reasons["2.weight"] is None


def test_the_probe_works_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(StandardisedConv(8, 16, 3))
    (layer,) = find_layers(model, BlockPattern(8, 8), include_linear=False, exclude=[])
    assert "transforms its weight" in layer.reason
