"""Batches on the training device: the next one is copied while the current one computes.

`device_batches` is what the trainer iterates: the device-resident cache (dataset.cache=device)
or the DataLoader behind a `DevicePrefetcher`.

On CUDA the copy of batch i+1 is issued on a side stream as soon as batch i is handed out, so
the host-to-device transfer (from pinned memory) overlaps the forward/backward of batch i. On
any other device it only moves each batch there (a no-op for the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from segkit.data.base import SegmentationDataset
from segkit.data.device_cache import DeviceCachedBatches
from segkit.data.loader import EpochSampler, build_loader


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
