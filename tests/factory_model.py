"""Factories that tests reach through the `module:factory` model spec."""

from torch import nn


def build(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A two-layer CNN with `num_classes` outputs."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def build_classes_only(num_classes: int) -> nn.Module:
    """A linear model on 3x8x8 images that takes no in_channels argument."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))


def not_a_model(num_classes: int) -> str:
    """Returns something other than a module."""
    return "model"


class Scale(nn.Module):
    """Multiplies its input by a constant (no parameters)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def build_exploding(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A CNN fed inputs scaled by 1e20: its first SGD step makes weights of about 1e20, and the
    second forward overflows float32 (the loss becomes NaN), as an unnormalised input does."""
    return nn.Sequential(
        Scale(1e20),
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def build_without_classes(channels: int) -> nn.Module:
    """A factory whose signature has no num_classes."""
    return nn.Conv2d(channels, 4, 3)


def build_empty(num_classes: int) -> nn.Module:
    """A model without parameters."""
    return nn.Sequential(nn.Flatten())


def build_broken(num_classes: int) -> nn.Module:
    """A factory with a bug of its own: it raises an exception that is not a SparsifyError."""
    raise ValueError(f"no layout for {num_classes} classes")


class OverflowsInEval(nn.Module):
    """Multiplies by 1e30 twice in eval mode only: finite weights, a NaN validation loss."""

    def forward(self, x):
        return x if self.training else (x * 1e30) * 1e30 - (x * 1e30) * 1e30


def build_overflowing_in_eval(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A CNN that trains normally but whose validation outputs overflow (weights stay finite)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes), OverflowsInEval())
