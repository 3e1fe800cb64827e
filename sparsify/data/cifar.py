"""CIFAR-10 and CIFAR-100 from a local folder in torchvision's layout, read by torchvision.

`data.root` holds `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
`cifar-100-python/` (train, test, meta). Those files are Python pickles: torchvision unpickles
them, and by default only after their md5 matches the official release, so nothing else is ever
unpickled. `data.verify_checksums: false` accepts other files in that layout (a subsample, a
generated test folder): use it only for files you trust. `data.download: true` lets torchvision
fetch the official archive when the files are missing.
"""

from __future__ import annotations

from pathlib import Path

from sparsify.errors import DataError

CIFAR_ROOT = "data"
CIFAR_STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def cifar_class(name: str, *, verify_checksums: bool):
    """torchvision's CIFAR10/CIFAR100 class, or a subclass that checks only that the files exist."""
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    if verify_checksums:
        return base
    return type(f"Unverified{base.__name__}", (base,), {
        "train_list": [[file, None] for file, _ in base.train_list],
        "test_list": [[file, None] for file, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    })


def cifar_transforms(name: str, *, input_size: int, in_channels: int, train: bool):
    """Train: random crop 32 with padding 4 + horizontal flip; both: (resize,) normalise."""
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    if input_size != 32:
        steps.append(T.Resize(input_size))
    mean, std = CIFAR_STATS[name]
    if in_channels == 1:
        steps.append(T.Grayscale(num_output_channels=1))
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def open_cifar(name: str, root: str, *, train: bool, download: bool, verify_checksums: bool, transform):
    """One split through torchvision; missing or altered files become a DataError."""
    cls = cifar_class(name, verify_checksums=verify_checksums)
    folder = Path(root) / cls.base_folder
    try:
        return cls(root, train=train, transform=transform, download=download)
    except RuntimeError as exc:
        if not verify_checksums:
            raise DataError(f"{name} files under {folder} are missing ({exc}); "
                            "put torchvision's CIFAR python batches there or set data.download: true") from None
        raise DataError(
            f"{name} files under {folder} are missing or are not the official release (md5 check); "
            "put the official python batches there, set data.download: true, or for files you trust "
            "data.verify_checksums: false"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read or download {name} into {folder} ({exc}); "
                        "copy the python batches there by hand") from None
    except Exception as exc:  # unpickling and reshape errors of altered files alike
        raise DataError(f"{name} files under {folder} cannot be read ({type(exc).__name__}: {exc}); "
                        "replace them with torchvision's CIFAR python batches") from None


def check_cifar_files(name: str, root: str | None, *, download: bool) -> None:
    """The python batches of `name` are under root (nothing to check when torchvision may download them)."""
    if download:
        return
    cls = cifar_class(name, verify_checksums=False)
    folder = Path(root or CIFAR_ROOT) / cls.base_folder
    files = [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        raise DataError(f"{name} files under {folder} are missing ({', '.join(missing)}); put torchvision's "
                        "CIFAR python batches there, or set data.download: true")


def cifar_datasets(name: str, root: str | None, *, input_size: int, in_channels: int,
                   download: bool, verify_checksums: bool):
    """Train (augmented) and val (the test batch) datasets of cifar10 or cifar100."""
    root = root or CIFAR_ROOT
    splits = []
    for train in (True, False):
        transform = cifar_transforms(name, input_size=input_size, in_channels=in_channels, train=train)
        splits.append(open_cifar(name, root, train=train, download=download and train,
                                 verify_checksums=verify_checksums, transform=transform))
    return splits[0], splits[1]
