"""How a model wants its images (eval resize and crop, normalisation, interpolation)."""

from __future__ import annotations

import math
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


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def timm_preset(data_config: dict, input_size: int) -> ImagePreset:
    """A timm preprocessing config (timm.data.resolve_data_config: crop_pct, interpolation, mean, std) at
    `input_size`: resize to floor(input_size / crop_pct), then center crop, as timm's eval transform does."""
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    interpolation = data_config.get("interpolation")
    return ImagePreset(
        crop_size=input_size,
        resize_size=math.floor(input_size / crop_pct),
        mean=tuple(float(v) for v in data_config.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in data_config.get("std", IMAGENET_STD)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset: classes, channels, native image size."""

    num_classes: int
    in_channels: int
    input_size: int
