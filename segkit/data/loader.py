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

    `start` skips the samples already consumed when resuming in the middle of an epoch.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.length - self.start


def build_loader(
    dataset: SegmentationDataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    seed: int,
    pin_memory: bool,
) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed)
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
