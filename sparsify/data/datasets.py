"""Datasets and loaders: an ImageFolder tree, the embedded digits, Fashion-MNIST IDX files, fake data.

Small datasets live in memory as tensors; only ImageFolder decodes images on the fly.
"""

from __future__ import annotations


import torch
from torch.utils.data import DataLoader, Dataset

from sparsify.config import DataConfig
from sparsify.data.presets import DatasetInfo, ImagePreset
from sparsify.errors import DataError
from sparsify.registry import DATASETS


def dataset_info(cfg: DataConfig, *, num_classes: int | None = None) -> DatasetInfo:
    """Describe the configured dataset without loading it (imagefolder counts class folders)."""
    return DATASETS.get(cfg.dataset).info(cfg, num_classes=num_classes)


def check_data(cfg: DataConfig, *, num_classes: int | None) -> DatasetInfo:
    """What `download` checks before it writes anything: the refusals of the train stage's loaders,
    without loading the data (files present, image folders that hold images, model.num_classes not
    below the dataset's class count)."""
    source = DATASETS.get(cfg.dataset)
    info = source.info(cfg, num_classes=num_classes)
    source.check(cfg)
    if source.fixed_classes and num_classes is not None:
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
    source = DATASETS.get(cfg.dataset)
    if source.fixed_classes:
        check_in_channels(in_channels, dataset=cfg.dataset)
    train, val = source.build(cfg, input_size=input_size, num_classes=num_classes, in_channels=in_channels,
                              preset=preset)
    if source.fixed_classes:
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
    if DATASETS.get(cfg.dataset).decodes_files:
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


