"""The models of the sparse-training papers, registered as built-in models.

- `resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`: He et al. 2016's CIFAR ResNets
  (3 stages of 16/32/64 channels, depth 6n+2) with option A shortcuts: when a stage halves the
  resolution and doubles the channels, the shortcut subsamples by 2 and pads the new channels
  with zeros, so it has no parameters (resnet20: 269,722 parameters for 10 classes).
- `wrn28_2`, `wrn28_4`, `wrn28_8`, `wrn28_10`, `wrn16_8`: Zagoruyko & Komodakis' pre-activation
  wide ResNets, named `wrn<depth>_<k>`; 1x1 projection shortcuts where the width changes, a final
  BatchNorm + ReLU, and a Linear head (wrn28_2: 1,467,610 parameters for 10 classes, the count
  the dst tables give). The 3x3 convs inside blocks are `block<g>.<i>.conv1/conv2`, the stem is
  `conv1` and the shortcuts `block<g>.<i>.shortcut`, so `exclude` globs pick them easily.
- `lenet5`: LeNet-5 (conv 6 and 16 channels 5x5, max-pool, Linear 120-84-classes; 61,706
  parameters on 28x28 gray images, the first conv padded by 2 as usual for MNIST; inputs of 16 px
  or more, pooled to 5x5 before the Linear layers).
- `mnist_mlp`: LeNet-300-100 (Linear 784-300-100-classes with ReLU; 266,610 parameters), the
  input average-pooled to 28x28 first so any image size fits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.models.build import MODELS

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
WIDE_RESNETS = ((28, 2), (28, 4), (28, 8), (28, 10), (16, 8))


def register_once(name: str, factory: Callable[[int, int], nn.Module]) -> None:
    """Register `factory` under `name` unless another module already provides that name."""
    if name not in MODELS:
        MODELS.register(name)(factory)


def kaiming_init_(model: nn.Module) -> None:
    """He-normal convs (fan out) and Linear weights, BatchNorm at 1 and 0, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- CIFAR ResNets


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by `stride` and zero-pad the extra channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        changed = stride != 1 or in_channels != out_channels
        self.shortcut = ShortcutA(out_channels - in_channels, stride) if changed else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: 3x3 stem of 16, stages of 16/32/64 channels with n blocks each."""

    def __init__(self, depth: int, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        previous = 16
        for index, width in enumerate((16, 32, 64), start=1):
            stride = 1 if index == 1 else 2
            stage = [CifarBlock(previous if i == 0 else width, width, stride=stride if i == 0 else 1)
                     for i in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            previous = width
        self.fc = nn.Linear(64, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- wide ResNets


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        # a projected shortcut sees the activated input, an identity one the raw input
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-k: stem conv of 16, three groups of 16k/32k/64k channels, BN-ReLU, pool, Linear."""

    def __init__(self, depth: int, widen: int, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n+4, not {depth}")
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        previous = 16
        for index, width in enumerate((16 * widen, 32 * widen, 64 * widen), start=1):
            stride = 1 if index == 1 else 2
            group = [WideBlock(previous if i == 0 else width, width, stride=stride if i == 0 else 1)
                     for i in range(blocks)]
            self.add_module(f"block{index}", nn.Sequential(*group))
            previous = width
        self.bn = nn.BatchNorm2d(previous)
        self.fc = nn.Linear(previous, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- MNIST models


class LeNet5(nn.Module):
    """LeNet-5: conv 5x5 (6, padded by 2) - pool - conv 5x5 (16) - pool - Linear 120 - 84 - classes."""

    def __init__(self, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_max_pool2d(x, 5)  # the identity on 28x28 inputs; lets other sizes through
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


class MnistMLP(nn.Module):
    """LeNet-300-100: Linear 784-300-100-classes with ReLU, on images pooled to 28x28."""

    def __init__(self, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * 28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            x = F.adaptive_avg_pool2d(x, 28)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


# ----------------------------------------------------------------------------- registration


def cifar_resnet_factory(depth: int) -> Callable[[int, int], nn.Module]:
    """Factory of the CIFAR ResNet of `depth`."""

    def build(num_classes: int, in_channels: int) -> nn.Module:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option A shortcuts)."
    return build


def wide_resnet_factory(depth: int, widen: int) -> Callable[[int, int], nn.Module]:
    """Factory of WRN-depth-widen."""

    def build(num_classes: int, in_channels: int) -> nn.Module:
        return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"Wide ResNet WRN-{depth}-{widen} (pre-activation, Zagoruyko & Komodakis 2016)."
    return build


def register_zoo() -> None:
    """Add this module's models to MODELS (names another module registered first are kept)."""
    for depth in CIFAR_RESNET_DEPTHS:
        register_once(f"resnet{depth}", cifar_resnet_factory(depth))
    for depth, widen in WIDE_RESNETS:
        register_once(f"wrn{depth}_{widen}", wide_resnet_factory(depth, widen))
    register_once("lenet5", lambda num_classes, in_channels: LeNet5(num_classes=num_classes, in_channels=in_channels))
    register_once("mnist_mlp", lambda num_classes, in_channels: MnistMLP(num_classes=num_classes,
                                                                         in_channels=in_channels))


register_zoo()
