"""Datasets and loaders: an ImageFolder tree, the embedded digits, Fashion-MNIST IDX files, fake data.

Small datasets live in memory as tensors; only ImageFolder decodes images on the fly.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sparsify.data.cifar import CIFAR_CLASSES, check_cifar_files, cifar_datasets
from sparsify.config import DataConfig
from sparsify.errors import DataError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
DIGITS_SPLIT_SEED = 0  # fixed, so validation is the same images whatever the run seed
IMAGEFOLDER_LAYOUT = "imagefolder expects root/train/<class>/<image> and root/val/<class>/<image>"
TORCHVISION_DECODES = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # torchvision.io; others go to PIL
AUTO_DECODER = "torchvision"  # data.decoder auto: see bench/imagefolder_decode.py and the README


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


def dataset_info(cfg: DataConfig, *, num_classes: int | None = None) -> DatasetInfo:
    """Describe the configured dataset without loading it (imagefolder counts class folders)."""
    if cfg.dataset == "digits":
        return DatasetInfo(num_classes=10, in_channels=1, input_size=8)
    if cfg.dataset == "fashion-mnist":
        return DatasetInfo(num_classes=10, in_channels=1, input_size=28)
    if cfg.dataset == "fake":
        return DatasetInfo(num_classes=num_classes or 10, in_channels=3, input_size=32)
    if cfg.dataset in ("cifar10", "cifar100"):
        return DatasetInfo(num_classes=CIFAR_CLASSES[cfg.dataset], in_channels=3, input_size=32)
    if cfg.dataset == "imagefolder":
        train_dir, _ = imagefolder_dirs(cfg.root)
        return DatasetInfo(num_classes=len(class_folders(train_dir)), in_channels=3, input_size=224)
    raise DataError(f"unknown dataset {cfg.dataset!r}; use imagefolder, digits, fashion-mnist or fake")


def check_data(cfg: DataConfig, *, num_classes: int | None) -> DatasetInfo:
    """What `download` checks before it writes anything: the refusals of the train stage's loaders,
    without loading the data.

    The fashion-mnist files exist; the CIFAR files exist (unless data.download lets torchvision
    fetch them); train/ and val/ of an ImageFolder tree have the same class folders and each holds
    an image; model.num_classes is not below the dataset's class count.
    """
    info = dataset_info(cfg, num_classes=num_classes)
    if cfg.dataset == "fashion-mnist":
        for stem in FASHION_MNIST_FILES.values():
            find_idx_file(Path(cfg.root or FASHION_MNIST_ROOT), stem)
    elif cfg.dataset in ("cifar10", "cifar100"):
        check_cifar_files(cfg.dataset, cfg.root, download=cfg.download)
    elif cfg.dataset == "imagefolder":
        check_imagefolder_images(cfg.root)
    if cfg.dataset != "fake" and num_classes is not None:
        check_num_classes(num_classes, info.num_classes, dataset=cfg.dataset)
    return info


def build_loaders(
    cfg: DataConfig,
    *,
    input_size: int,
    num_classes: int,
    in_channels: int,
    seed: int,
    pin_memory: bool = False,
    preset: ImagePreset | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a generator seeded with `seed`) and val loader (in order).

    `preset` sets the imagefolder transforms (the model's own eval resize, crop, mean, std).
    `rank` / `world_size`: each process of a torchrun job loads its own shard of both splits.
    """
    check_augment_options(cfg)
    if cfg.dataset == "fake":
        # the images do not follow `seed` (it changes from stage to stage): see FakeImages
        train, val = fake_datasets(
            samples=cfg.fake_samples,
            input_size=input_size,
            num_classes=num_classes,
            in_channels=in_channels,
        )
    elif cfg.dataset == "digits":
        check_in_channels(in_channels, dataset="digits")
        train, val = digits_datasets(
            val_fraction=cfg.val_fraction, input_size=input_size, in_channels=in_channels
        )
    elif cfg.dataset == "fashion-mnist":
        check_in_channels(in_channels, dataset="fashion-mnist")
        train, val = fashion_mnist_datasets(
            cfg.root or FASHION_MNIST_ROOT, input_size=input_size, in_channels=in_channels
        )
    elif cfg.dataset in ("cifar10", "cifar100"):
        check_in_channels(in_channels, dataset=cfg.dataset)
        train, val = cifar_datasets(cfg.dataset, cfg.root, input_size=input_size, in_channels=in_channels,
                                    download=cfg.download, verify_checksums=cfg.verify_checksums)
    elif cfg.dataset == "imagefolder":
        check_in_channels(in_channels, dataset="imagefolder")
        train, val = imagefolder_datasets(
            cfg, preset=preset or default_preset(input_size), in_channels=in_channels
        )
    else:
        raise DataError(
            f"unknown dataset {cfg.dataset!r}; use imagefolder, digits, fashion-mnist or fake"
        )
    if cfg.dataset != "fake":
        check_num_classes(num_classes, dataset_classes(train), dataset=cfg.dataset)
    collate = batch_mixer(cfg, num_classes=num_classes)
    return (
        make_loader(train, cfg, shuffle=True, seed=seed, pin_memory=pin_memory, collate_fn=collate,
                    rank=rank, world_size=world_size),
        make_loader(val, cfg, shuffle=False, seed=seed, pin_memory=pin_memory, rank=rank, world_size=world_size),
    )


def make_loader(
    dataset: Dataset,
    cfg: DataConfig,
    *,
    shuffle: bool,
    seed: int,
    pin_memory: bool,
    collate_fn=None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader with the config's batch size and workers; the shuffle order follows `seed`.

    Train: a resumable DistributedSampler (order from seed + epoch, this rank's share); val: this
    rank's shard in order.
    """
    from sparsify.data.samplers import ResumableDistributedSampler, ShardSampler

    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    else:
        sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank) if world_size > 1 else None
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=cfg.prefetch if cfg.workers > 0 else None,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_fn,
    )


def check_augment_options(cfg: DataConfig) -> None:
    """Refuse image augmentations on datasets that are not decoded from image files."""
    if cfg.dataset == "imagefolder":
        return
    for key, value, off in (("auto_augment", cfg.auto_augment, None), ("random_erase", cfg.random_erase, 0.0)):
        if value != off:
            raise DataError(
                f"data.{key}={value!r} applies to imagefolder only, not dataset {cfg.dataset}; "
                f"set data.{key}: {'null' if off is None else off} (mixup_alpha/cutmix_alpha work on any dataset)"
            )


class MixBatch:
    """Collate a batch, then apply MixUp or CutMix (one of them picked per batch): soft targets."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> None:
        from torchvision.transforms import v2

        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import default_collate

        images, labels = default_collate(batch)
        return self.mix(images, labels)


def batch_mixer(cfg: DataConfig, *, num_classes: int) -> MixBatch | None:
    """The train loader's collate_fn when mixup_alpha or cutmix_alpha is on, else None."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return MixBatch(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, num_classes=num_classes)


def check_in_channels(in_channels: int, *, dataset: str) -> None:
    """Allow 1 (gray) or 3 (RGB; gray images are repeated) input channels."""
    if in_channels not in (1, 3):
        raise DataError(
            f"{dataset} gives 1 or 3 image channels, not model.in_channels={in_channels}; "
            "set model.in_channels to 1, 3 or null"
        )


def check_num_classes(num_classes: int, found: int, *, dataset: str) -> None:
    """Refuse a model with fewer outputs than the dataset has classes."""
    if num_classes < found:
        raise DataError(
            f"{dataset} has {found} classes but the model has {num_classes} outputs; "
            f"set model.num_classes to {found} or null"
        )


def dataset_classes(dataset: Dataset) -> int:
    """Number of classes of one of this module's datasets."""
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(dataset.labels.max()) + 1


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


def split_digits(labels: np.ndarray, *, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices from a fixed permutation (the same for every run seed)."""
    from sklearn.model_selection import train_test_split

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
            f"fashion-mnist folder {root} does not exist; it must hold {expected} "
            "(install them with `apt-get install dataset-fashion-mnist` or set data.root)"
        )
    splits = [load_fashion_mnist_split(root, split) for split in ("train", "val")]
    return tuple(
        ImageTensorDataset(images, labels, input_size=input_size, in_channels=in_channels)
        for images, labels in splits
    )


# ----------------------------------------------------------------------------- imagefolder


def imagefolder_dirs(root: str | None) -> tuple[Path, Path]:
    """root/train and root/val, or a DataError describing the expected layout."""
    if root is None:
        raise DataError(f"data.root is not set; {IMAGEFOLDER_LAYOUT}")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.root {root!r} does not exist; {IMAGEFOLDER_LAYOUT}")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataError(f"data.root {root!r} has no {split}/ folder; {IMAGEFOLDER_LAYOUT}")
    return base / "train", base / "val"


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
    from torchvision.datasets.folder import pil_loader
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(pil_loader(path))


def image_reader(decoder: str):
    """The ImageFolder loader for data.decoder (auto: the faster one on our measurements)."""
    from torchvision.datasets.folder import pil_loader

    choice = AUTO_DECODER if decoder == "auto" else decoder
    if choice == "torchvision":
        return read_image_tensor
    if choice == "pil":
        return pil_loader
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
