"""Samplers for one process of many: a resumable shuffled one for training, an exact shard for evaluation."""

from __future__ import annotations

from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start an epoch after `start` samples.

    Skipping happens on indices, so a resumed epoch neither loads nor decodes the batches it
    has already trained on, and sees the rest in the same order as the uninterrupted run.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank in the next iteration (0: a full epoch)."""
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Every `num_replicas`-th index in order, without padding (exact sums for evaluation)."""

    def __init__(self, dataset, *, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
