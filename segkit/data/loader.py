"""Build datasets and DataLoaders from the config; a sampler whose order can be resumed exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from segkit.config import build
from segkit.data.base import SegmentationDataset


def build_dataset(dataset_cfg: DictConfig, split: str) -> SegmentationDataset:
    return build(dataset_cfg, "dataset", split=split)


class EpochSampler(Sampler[int]):
    """Shuffles with a seed derived from (seed, epoch), so any epoch's order can be rebuilt.

    `start` skips the samples already consumed when resuming in the middle of an epoch. With several
    processes (`rank`, `world_size`) each walks the same global order and takes every world_size-th
    sample from its rank on (DistributedSampler's sharding): one step's batches on all processes form
    the global batch a single process would take, and `start` counts global samples, so a run resumes
    with a different number of processes where it stopped. `even` (training) cuts the order to a
    multiple of world_size so every process makes the same number of steps; without it (validation)
    every sample is seen exactly once, with no padding duplicates.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 even: bool = False) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=gen).tolist()

    def _remaining(self) -> int:
        remaining = max(0, self.length - self.start)
        return remaining - remaining % self.world_size if self.even else remaining

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.start : self.start + self._remaining()]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return max(0, self._remaining() - self.rank + self.world_size - 1) // self.world_size


def build_loader(
    dataset: SegmentationDataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    seed: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """`batch_size` is per process; with several processes the loader reads this process's shard."""
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, even=train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,  # fixed-size training batches keep BatchNorm and step timing stable
        persistent_workers=num_workers > 0,
        # Its own generator keeps worker seeding off the global RNG, so a resumed run draws
        # the same augmentation and dropout randomness as an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
