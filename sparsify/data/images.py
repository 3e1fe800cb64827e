"""Datasets held in memory as tensors: the embedded digits, Fashion-MNIST IDX files, fake images."""

from __future__ import annotations

import gzip
import math
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sparsify.errors import DataError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
DIGITS_SPLIT_SEED = 0  # fixed, so validation is the same images whatever the run seed


# ----------------------------------------------------------------------------- in-memory images


class ImageTensorDataset(Dataset):
    """Normalised images held in memory as (N, C, H, W) float32, resized per item when needed."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, input_size: int, in_channels: int
    ) -> None:
        self.images = images
        self.labels = labels
        self.input_size = input_size
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if image.shape[-1] != self.input_size or image.shape[-2] != self.input_size:
            image = resize_images(image[None], self.input_size)[0]
        if image.shape[0] != self.in_channels:
            image = image.expand(self.in_channels, -1, -1)
        return image, self.labels[index]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an (N, C, H, W) batch to size x size."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def normalise(images: torch.Tensor, *, mean: float, std: float) -> torch.Tensor:
    """(images - mean) / std as float32."""
    return ((images - mean) / std).float()


# ----------------------------------------------------------------------------- digits


def check_val_fraction(labels: np.ndarray, val_fraction: float) -> None:
    """A stratified split needs at least one image of every class on both sides."""
    total, classes = len(labels), len(np.unique(labels))
    held_out = math.ceil(val_fraction * total)  # as scikit-learn's train_test_split counts it
    if not classes <= held_out <= total - classes:
        low, high = classes / total, (total - classes) / total
        raise DataError(f"data.val_fraction {val_fraction} leaves a split without every class ({total} images, "
                        f"{classes} classes); choose a value from {low:.3f} to {high:.3f}")


def digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def split_digits(labels: np.ndarray, *, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices from a fixed permutation (the same for every run seed)."""
    from sklearn.model_selection import train_test_split

    check_val_fraction(labels, val_fraction)
    indices = np.arange(len(labels))
    train, val = train_test_split(
        indices, test_size=val_fraction, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return np.sort(train), np.sort(val)


def digits_datasets(
    *, val_fraction: float, input_size: int, in_channels: int
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """scikit-learn's 1,797 8x8 digits, split stratified, normalised by the train split's stats."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, val_idx = split_digits(digits.target, val_fraction=val_fraction)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    images = normalise(images, mean=mean, std=std)
    if input_size != images.shape[-1]:
        images = resize_images(images, input_size)
    return (
        ImageTensorDataset(
            images[train_idx], labels[train_idx], input_size=input_size, in_channels=in_channels
        ),
        ImageTensorDataset(
            images[val_idx], labels[val_idx], input_size=input_size, in_channels=in_channels
        ),
    )


# ----------------------------------------------------------------------------- fashion-mnist


def find_idx_file(root: Path, stem: str) -> Path:
    """`stem.gz` or `stem` inside root; DataError naming the folder and the expected files."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{name}.gz" for name in FASHION_MNIST_FILES.values())
    if root.exists() and not root.is_dir():
        raise DataError(f"fashion-mnist data.root {root} is a file, not a folder; it must be the folder holding "
                        f"{expected}")
    raise DataError(
        f"fashion-mnist file {root / stem}.gz is missing; data.root must hold {expected} "
        "(install them with `apt-get install dataset-fashion-mnist` or set data.root)"
    )


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzip'd): uint8 labels (N,) or images (N, rows, cols)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}); replace it with an intact IDX file") from None
    dims = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + dims)
    if len(data) < header:
        raise DataError(f"{path} is too short for an IDX header; replace it with an intact IDX file")
    found, *shape = np.frombuffer(data, dtype=">u4", count=1 + dims).tolist()
    if found != magic:
        raise DataError(
            f"{path} has IDX magic number {found}, expected {magic}; "
            "check the file name and replace it with an intact IDX file"
        )
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise DataError(
            f"{path} holds {len(data) - header} data bytes, its header says {size}; "
            "the file is truncated or corrupt, replace it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) normalised float32 and int64 labels of `train` or `val`."""
    images_path = find_idx_file(root, FASHION_MNIST_FILES[f"{split}_images"])
    labels_path = find_idx_file(root, FASHION_MNIST_FILES[f"{split}_labels"])
    images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "replace the pair with matching files"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} has label {labels.max()}, allowed 0-9; replace the file")
    pixels = torch.from_numpy(images.copy())[:, None].float().div_(255.0)
    normalised = pixels.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return normalised, torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_datasets(
    root: str | Path, *, input_size: int, in_channels: int
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Fashion-MNIST from IDX files: train = 60k train images, val = the 10k t10k images."""
    root = Path(root)
    if not root.is_dir():
        expected = ", ".join(f"{name}.gz" for name in FASHION_MNIST_FILES.values())
        raise DataError(
            f"fashion-mnist folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}; "
            f"it must hold {expected} "
            "(install them with `apt-get install dataset-fashion-mnist` or set data.root)"
        )
    splits = [load_fashion_mnist_split(root, split) for split in ("train", "val")]
    return tuple(
        ImageTensorDataset(images, labels, input_size=input_size, in_channels=in_channels)
        for images, labels in splits
    )


# ----------------------------------------------------------------------------- fake


FAKE_DATA_SEED = 0  # fixed, like DIGITS_SPLIT_SEED: every stage of every run sees the same fake images
FAKE_SPLITS = ("train", "val")


def fake_item_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of one fake image: a hash of (seed, split, index), 63 bits."""
    digest = hashlib.blake2b(f"sparsify-fake:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class FakeImages(Dataset):
    """Random normal images with uniform labels; item i is a pure function of (seed, split, i).

    Neither the global RNG, the loader's seed, the order of reads nor worker processes change an
    item, so a checkpoint evaluated by `eval` sees the images its train stage saw.
    """

    def __init__(self, *, samples: int, split: str, seed: int, input_size: int, num_classes: int,
                 in_channels: int) -> None:
        if split not in FAKE_SPLITS:
            raise DataError(f"unknown fake split {split!r}; use train or val")
        self.split, self.seed = split, seed
        self.shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.labels = torch.tensor([int(self._draw(index)[1]) for index in range(samples)], dtype=torch.int64)

    def _draw(self, index: int, *, image: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        generator = torch.Generator().manual_seed(fake_item_seed(self.seed, self.split, index))
        label = torch.randint(self.num_classes, (), generator=generator)
        return (torch.randn(self.shape, generator=generator) if image else None), label

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self.labels):
            raise IndexError(f"fake {self.split} index {index} out of range 0..{len(self.labels) - 1}")
        image, label = self._draw(index, image=True)
        return image, label


def fake_datasets(
    *, samples: int, input_size: int, num_classes: int, in_channels: int, seed: int = FAKE_DATA_SEED
) -> tuple[FakeImages, FakeImages]:
    """Train and val splits of `samples` fake images each; the same (seed, split, index), the same item."""
    return tuple(
        FakeImages(samples=samples, split=split, seed=seed, input_size=input_size, num_classes=num_classes,
                   in_channels=in_channels)
        for split in FAKE_SPLITS
    )
