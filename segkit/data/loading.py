"""Batches on the training device: one choice between the DataLoader (+ prefetcher) and the device cache.

`device_batches` is what the trainer iterates. With `dataset.cache=device` the whole decoded split lives
on the device and batches are index gathers in the `EpochSampler`'s order (so sample order, the `start`
offset of a resumed epoch and the batch count match the DataLoader path exactly). Otherwise a DataLoader
reads it and, on CUDA, the copy of batch i+1 is issued on a side stream while batch i computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from segkit.config import build
from segkit.data.readers.base import SegmentationDataset


class Shard(torch.utils.data.Dataset):
    """Part of a split (a federated client's shard); everything else (classes, size, cache) is the split's."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[self.indices[index]]

    def __getattr__(self, name: str) -> Any:  # num_classes, ignore_index, image_size, cache, ...
        return getattr(self.__dict__["dataset"], name)


# ---------------------------------------------------------------------------------------------- weights


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


class DeviceCachedBatches:
    """Iterates (uint8 images (B, 3, H, W), int64 masks (B, H, W)) already on `device`."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        sampler: EpochSampler,
        *,
        batch_size: int,
        drop_last: bool,
        device: torch.device,
        num_workers: int,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = device
        self.images, self.masks = decode_split(dataset, device, num_workers, batch_size)

    def __len__(self) -> int:
        count = len(self.sampler) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.device, non_blocking=True)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.images[index], self.masks[index].long()


def decode_split(
    dataset: SegmentationDataset, device: torch.device, num_workers: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of `dataset` in index order, as device tensors (masks uint8 when every id fits)."""
    small = max(dataset.num_classes - 1, dataset.ignore_index) <= 255
    mask_dtype = torch.uint8 if small else torch.int64
    height, width = dataset.image_size
    images = torch.empty(len(dataset), 3, height, width, dtype=torch.uint8, device=device)
    masks = torch.empty(len(dataset), height, width, dtype=mask_dtype, device=device)
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    if dataset.gpu_decode:  # nvjpeg needs CUDA in this process: read here, one sample at a time
        dataset.decode_device = device
        batches = ((img[None], mask[None]) for img, mask in (dataset[i] for i in range(len(dataset))))
    else:
        # Its own generator: a DataLoader draws its worker base seed from the global RNG otherwise,
        # which would shift the augmentation randomness away from the DataLoader path's.
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                             pin_memory=device.type == "cuda", generator=torch.Generator())
    first = 0
    for image_batch, mask_batch in batches:
        last = first + image_batch.shape[0]
        images[first:last].copy_(image_batch, non_blocking=True)
        masks[first:last].copy_(mask_batch.to(mask_dtype), non_blocking=True)
        first = last
    return images, masks


def device_batches(
    dataset: SegmentationDataset, *, batch_size: int, num_workers: int, train: bool, seed: int, device: torch.device,
    rank: int = 0, world_size: int = 1,
) -> DeviceCachedBatches | DevicePrefetcher:
    """Batches of `dataset` on `device`, in the EpochSampler's order (shuffled and drop_last when training);
    with several processes, this process's shard of it."""
    if dataset.cache == "device":
        sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, even=train)
        return DeviceCachedBatches(dataset, sampler, batch_size=batch_size, drop_last=train, device=device,
                                   num_workers=num_workers)
    loader = build_loader(dataset, batch_size=batch_size, num_workers=num_workers, train=train, seed=seed,
                          pin_memory=device.type == "cuda", rank=rank, world_size=world_size)
    return DevicePrefetcher(loader, device)


class DevicePrefetcher:
    """Wraps a DataLoader of (images, masks); keeps its `sampler` and `len` for the training loop."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader = loader
        self.sampler = loader.sampler
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for images, masks in self.loader:
                yield images.to(self.device), masks.to(self.device)
            return
        yield from _cuda_prefetch(self.loader, self.device)


def _cuda_prefetch(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    source = iter(batches)

    def issue_copy() -> tuple[torch.Tensor, torch.Tensor] | None:
        batch = next(source, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    ready = issue_copy()
    while ready is not None:
        compute.wait_stream(stream)
        # The tensors were allocated on the side stream: tell the allocator the compute stream uses them.
        for tensor in ready:
            tensor.record_stream(compute)
        current, ready = ready, issue_copy()
        yield current
