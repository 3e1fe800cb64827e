"""The built-in small ResNets (tiny_resnet, small_resnet), registered in MODELS."""

from __future__ import annotations

import torch
from torch import nn

from sparsify.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small images: 3x3 stem, no max-pool, stride 2 between stages, Linear `fc`."""

    def __init__(
        self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], blocks: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stage = [BasicBlock(previous, width, stride=stride)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            previous = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        init_small_resnet_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_small_resnet_(model: SmallResNet) -> None:
    """Kaiming-initialise the convs (BatchNorm and Linear keep PyTorch's defaults)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@MODELS.register("tiny_resnet")
def tiny_resnet(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet with stages of 16, 32, 64 channels, one basic block each (about 78k parameters)."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, widths=(16, 32, 64), blocks=1)


@MODELS.register("small_resnet")
def small_resnet(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet with stages of 32, 64, 128 channels, two basic blocks each (about 0.7M parameters)."""
    return SmallResNet(
        num_classes=num_classes, in_channels=in_channels, widths=(32, 64, 128), blocks=2
    )
