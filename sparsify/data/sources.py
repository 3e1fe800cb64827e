"""The built-in datasets, one registered DataSource class each (`data.dataset: <name>`).

A data source says what it holds without loading it (`info`), what `download` checks before
anything is written (`check`), and builds the train and val splits (`build`). A new dataset is
one DataSource subclass registered with `@DATASETS.register(name)` in a module named under
`plugins:`; the `data:` keys (root, val_fraction, ...) are shared by all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset

from sparsify.data.cifar import CIFAR_CLASSES, check_cifar_files, cifar_datasets
from sparsify.data.imagefolder import check_imagefolder_images, class_folders, imagefolder_datasets, imagefolder_dirs
from sparsify.data.images import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, check_val_fraction, digits_datasets
from sparsify.data.images import digits_labels, fake_datasets
from sparsify.data.images import fashion_mnist_datasets, find_idx_file
from sparsify.data.presets import DatasetInfo, ImagePreset, default_preset
from sparsify.registry import DATASETS


class DataSource:
    """One value of `data.dataset` (class attributes and classmethods; nothing is instantiated)."""

    name: ClassVar[str]
    fixed_classes: ClassVar[bool] = True  # False: the labels follow model.num_classes (fake)
    decodes_files: ClassVar[bool] = False  # images decoded from files: auto_augment and random_erase apply,
    # and the input size follows the model's weights (their eval crop) unless model.input_size is set

    @classmethod
    def info(cls, cfg, *, num_classes: int | None) -> DatasetInfo:
        """Classes, channels and native image size, without loading the data."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (DataError) what the loaders would refuse, before `download` writes anything."""

    @classmethod
    def build(cls, cfg, *, input_size: int, num_classes: int, in_channels: int,
              preset: ImagePreset | None) -> tuple[Dataset, Dataset]:
        """The train and val splits, shaped for the model."""
        raise NotImplementedError


@DATASETS.register("digits")
class Digits(DataSource):
    """scikit-learn's 1,797 real 8x8 digits, embedded: no download, no folder."""

    name = "digits"

    @classmethod
    def info(cls, cfg, *, num_classes):
        return DatasetInfo(num_classes=10, in_channels=1, input_size=8)

    @classmethod
    def check(cls, cfg):
        check_val_fraction(digits_labels(), cfg.val_fraction)

    @classmethod
    def build(cls, cfg, *, input_size, num_classes, in_channels, preset):
        return digits_datasets(val_fraction=cfg.val_fraction, input_size=input_size, in_channels=in_channels)


@DATASETS.register("fashion-mnist")
class FashionMnist(DataSource):
    """Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist, or data.root)."""

    name = "fashion-mnist"

    @classmethod
    def info(cls, cfg, *, num_classes):
        return DatasetInfo(num_classes=10, in_channels=1, input_size=28)

    @classmethod
    def check(cls, cfg):
        for stem in FASHION_MNIST_FILES.values():
            find_idx_file(Path(cfg.root or FASHION_MNIST_ROOT), stem)

    @classmethod
    def build(cls, cfg, *, input_size, num_classes, in_channels, preset):
        return fashion_mnist_datasets(cfg.root or FASHION_MNIST_ROOT, input_size=input_size, in_channels=in_channels)


class Cifar(DataSource):
    """CIFAR-10 / CIFAR-100 from torchvision's files."""

    @classmethod
    def info(cls, cfg, *, num_classes):
        return DatasetInfo(num_classes=CIFAR_CLASSES[cls.name], in_channels=3, input_size=32)

    @classmethod
    def check(cls, cfg):
        check_cifar_files(cls.name, cfg.root, download=cfg.download)

    @classmethod
    def build(cls, cfg, *, input_size, num_classes, in_channels, preset):
        return cifar_datasets(cls.name, cfg.root, input_size=input_size, in_channels=in_channels,
                              download=cfg.download, verify_checksums=cfg.verify_checksums)


@DATASETS.register("cifar10")
class Cifar10(Cifar):
    name = "cifar10"


@DATASETS.register("cifar100")
class Cifar100(Cifar):
    name = "cifar100"


@DATASETS.register("imagefolder")
class ImageFolder(DataSource):
    """data.root/train/<class>/<image> and data.root/val/<class>/<image>, decoded on the fly."""

    name = "imagefolder"
    decodes_files = True

    @classmethod
    def info(cls, cfg, *, num_classes):
        train_dir, _ = imagefolder_dirs(cfg.root)
        return DatasetInfo(num_classes=len(class_folders(train_dir)), in_channels=3, input_size=224)

    @classmethod
    def check(cls, cfg):
        check_imagefolder_images(cfg.root)

    @classmethod
    def build(cls, cfg, *, input_size, num_classes, in_channels, preset):
        return imagefolder_datasets(cfg, preset=preset or default_preset(input_size), in_channels=in_channels)


@DATASETS.register("fake")
class Fake(DataSource):
    """Random images, a pure function of (seed, split, index): for smoke tests."""

    name = "fake"
    fixed_classes = False

    @classmethod
    def info(cls, cfg, *, num_classes):
        return DatasetInfo(num_classes=num_classes or 10, in_channels=3, input_size=32)

    @classmethod
    def build(cls, cfg, *, input_size, num_classes, in_channels, preset):
        # the images do not follow the stage's seed (it changes from stage to stage): see FakeImages
        return fake_datasets(samples=cfg.fake_samples, input_size=input_size, num_classes=num_classes,
                             in_channels=in_channels)
