"""dataset.cache=device: the whole decoded split lives on the training device; epochs need no DataLoader.

The split is read once (through a DataLoader with the configured workers, or in this process with
nvjpeg when `dataset.gpu_decode`), letterboxed as always, and stacked into uint8 tensors on the
device. Batches are then index gathers in the `EpochSampler`'s order, so the sample order, the
`start` offset of a resumed epoch and the batch count match the DataLoader path exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from segkit.data.base import SegmentationDataset
from segkit.data.loader import EpochSampler


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
