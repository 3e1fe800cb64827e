"""How a model wants its images (eval resize and crop, normalisation, interpolation)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreset:
    """How a model wants its images: eval resize then center crop, normalisation, interpolation."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest


def default_preset(input_size: int) -> ImagePreset:
    """ImageNet statistics, resize to input_size / 0.875 then center crop (the classic recipe)."""
    return ImagePreset(crop_size=input_size, resize_size=int(input_size / 0.875))


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset: classes, channels, native image size."""

    num_classes: int
    in_channels: int
    input_size: int
