"""ImageFolder trees decoded on the fly (torchvision.io or PIL), with the training augmentations."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from sparsify.config import DataConfig
from sparsify.data.presets import ImagePreset
from sparsify.errors import DataError

IMAGEFOLDER_LAYOUT = "imagefolder expects root/train/<class>/<image> and root/val/<class>/<image>"
# torchvision.io decodes these; others go to PIL. Not PNG: torchvision 0.29's decode_png crashes the process
# (SIGSEGV) on a damaged PNG (any libpng error, e.g. a bad chunk CRC) instead of raising, so PIL reads PNGs.
TORCHVISION_DECODES = (".jpg", ".jpeg", ".webp", ".gif")
AUTO_DECODER = "torchvision"  # data.decoder auto: see bench/imagefolder_decode.py and the README


# ----------------------------------------------------------------------------- imagefolder


def imagefolder_dirs(root: str | None) -> tuple[Path, Path]:
    """root/train and root/val, or a DataError describing the expected layout."""
    if root is None:
        raise DataError(f"data.root is not set; {IMAGEFOLDER_LAYOUT}")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.root {root!r} {folder_problem(base)}; {IMAGEFOLDER_LAYOUT}")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            problem = f"has a file {split}, not a folder" if (base / split).exists() else f"has no {split}/ folder"
            raise DataError(f"data.root {root!r} {problem}; {IMAGEFOLDER_LAYOUT}")
    return base / "train", base / "val"


def folder_problem(path: Path) -> str:
    """Why `path` is not a folder: 'does not exist' or 'is a file, not a folder'."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the class sub-folders of `folder`."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; {IMAGEFOLDER_LAYOUT}")
    return classes


def check_imagefolder_images(root: str | None) -> None:
    """train/ and val/ have the same class folders, and every one of them holds at least one image."""
    import os

    from torchvision.datasets.folder import IMG_EXTENSIONS

    train_dir, val_dir = imagefolder_dirs(root)
    train_classes, val_classes = class_folders(train_dir), class_folders(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"train/ and val/ under {root} have different classes (only in train: {only_train[:5]}, "
            f"only in val: {only_val[:5]}); give both the same class folders"
        )
    for folder in (train_dir, val_dir):
        for name in train_classes:
            images = (f for _, _, files in os.walk(folder / name, followlinks=True) for f in files
                      if f.lower().endswith(IMG_EXTENSIONS))
            if next(images, None) is None:
                raise DataError(
                    f"class folder {folder / name} holds no image ({', '.join(IMG_EXTENSIONS)}); "
                    "put its images there or remove the folder from both train/ and val/"
                )


def imagefolder_transforms(
    preset: ImagePreset,
    *,
    in_channels: int,
    train: bool,
    auto_augment: str | None = None,
    random_erase: float = 0.0,
):
    """Train: random resized crop, flip, optional policy and erasing; val: resize + center crop."""
    from torchvision.transforms import v2

    mode = v2.InterpolationMode(preset.interpolation)
    if train:
        steps = [v2.RandomResizedCrop(preset.crop_size, interpolation=mode, antialias=True),
                 v2.RandomHorizontalFlip()]
        if auto_augment is not None:
            steps.append(augment_policy(auto_augment, interpolation=mode))
    else:
        steps = [v2.Resize(preset.resize_size, interpolation=mode, antialias=True),
                 v2.CenterCrop(preset.crop_size)]
    mean, std = preset.mean, preset.std
    if in_channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase))
    return v2.Compose(steps)


def augment_policy(name: str, *, interpolation):
    """torchvision's AutoAugment (imagenet), RandAugment (rand), TrivialAugmentWide or AugMix."""
    from torchvision.transforms import v2

    if name == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    if name == "rand":
        return v2.RandAugment(interpolation=interpolation)
    if name == "trivial":
        return v2.TrivialAugmentWide(interpolation=interpolation)
    if name == "augmix":
        return v2.AugMix(interpolation=interpolation)
    raise DataError(f"unknown data.auto_augment {name!r}; choose imagenet, rand, trivial, augmix or null")


def read_image_tensor(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (C, H, W) with torchvision.io, else with PIL."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    if path.lower().endswith(TORCHVISION_DECODES):
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return decode_image(read_file(path), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # a file torchvision.io cannot decode (e.g. an odd JPEG) falls back to PIL
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(read_pil_image(path))


def read_pil_image(path: str):
    """torchvision's ImageFolder loader (PIL, RGB); a file it cannot read is one DataError naming it.

    The stage stops there rather than skip the image (a skipped image changes the epoch's batches,
    and a folder of broken files would train on nothing). In a DataLoader worker the error reaches
    the main process as the same DataError and message (see `SparsifyError`).
    """
    from torchvision.datasets.folder import pil_loader

    try:
        return pil_loader(path)
    except decode_errors() as exc:
        raise DataError(unreadable_image(path, exc)) from None


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that is not a whole image (or cannot be opened)."""
    import struct

    from PIL import Image

    return OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError


def unreadable_image(path: str, exc: BaseException) -> str:
    """One line: the file, why it cannot be read, and the fix."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, PermissionError):
        return f"cannot read image {path} (permission denied); make it readable for this user"
    if isinstance(exc, FileNotFoundError):
        return f"image {path} was removed while the stage ran; run the command again"
    if isinstance(exc, UnidentifiedImageError):
        why = "not an image format PIL can read"
    else:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"cannot decode image {path} ({why}); remove that file or replace it with an intact image, "
            "then run the command again")


def image_reader(decoder: str):
    """The ImageFolder loader for data.decoder (auto: the faster one on our measurements)."""
    choice = AUTO_DECODER if decoder == "auto" else decoder
    if choice == "torchvision":
        return read_image_tensor
    if choice == "pil":
        return read_pil_image
    raise DataError(f"unknown data.decoder {decoder!r}; choose auto, pil or torchvision")


def open_imagefolder(folder: Path, transform, *, loader):
    """torchvision's ImageFolder over `folder`, its errors turned into DataError."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform, loader=loader)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot read image folder {folder}: {exc}; {IMAGEFOLDER_LAYOUT}") from None


def imagefolder_datasets(cfg: DataConfig, *, preset: ImagePreset, in_channels: int):
    """ImageFolder train/val datasets; their class lists must be the same."""
    train_dir, val_dir = imagefolder_dirs(cfg.root)
    loader = image_reader(cfg.decoder)
    train_tf = imagefolder_transforms(preset, in_channels=in_channels, train=True,
                                      auto_augment=cfg.auto_augment, random_erase=cfg.random_erase)
    val_tf = imagefolder_transforms(preset, in_channels=in_channels, train=False)
    train = open_imagefolder(train_dir, train_tf, loader=loader)
    val = open_imagefolder(val_dir, val_tf, loader=loader)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"train/ and val/ under {cfg.root} have different classes (only in train: {only_train[:5]}, "
            f"only in val: {only_val[:5]}); give both the same class folders"
        )
    return train, val
