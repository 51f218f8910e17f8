"""The common alternative to segkit's input path, for the benchmark: CPU-side joint transforms.

A DataLoader whose workers decode (the same reader and letterbox as segkit), apply
torchvision.transforms.v2 equivalents of the configured Kornia augmentation list to image and
mask together, and convert the image to float, as most segmentation code does today.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from segkit.data.readers.base import SegmentationDataset
from segkit.errors import ConfigError


def torchvision_transforms(
    kornia_transforms: Sequence[Mapping[str, Any]], crop_size: Sequence[int] | None, ignore_index: int
) -> v2.Compose:
    """The v2 equivalent of an augmentation config's `transforms` list (+ its random crop)."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}  # invented mask pixels are ignored
    ops: list[v2.Transform] = []
    for node in kornia_transforms:
        name = str(node["_target_"]).rsplit(".", 1)[-1]
        args = {k: v for k, v in node.items() if k not in ("_target_", "p")}
        p = float(node.get("p", 0.5))
        if name == "RandomHorizontalFlip":
            ops.append(v2.RandomHorizontalFlip(p))
            continue
        if name == "RandomAffine":
            op = v2.RandomAffine(args["degrees"], scale=args.get("scale"), shear=args.get("shear"), fill=fill)
        elif name in ("ColorJiggle", "ColorJitter"):
            op = v2.ColorJitter(args.get("brightness", 0), args.get("contrast", 0), args.get("saturation", 0),
                                args.get("hue", 0))
        elif name == "RandomGaussianBlur":
            op = v2.GaussianBlur(args["kernel_size"], args["sigma"])
        else:
            raise ConfigError("augmentation", f"the reference pipeline has no torchvision equivalent of {name}; "
                                              "benchmark with augmentation=default or light")
        ops.append(op if p >= 1 else v2.RandomApply([op], p=p))
    if crop_size is not None:
        ops.append(v2.RandomCrop(list(crop_size), pad_if_needed=True, fill=fill))
    ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True))
    return v2.Compose(ops)


class TransformedDataset(Dataset):
    """(float image in [0, 1], int64 mask) after the CPU transforms, read in the worker."""

    def __init__(self, dataset: SegmentationDataset, transforms: v2.Compose) -> None:
        self.dataset = dataset
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[index]
        image, mask = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def reference_loader(
    dataset: SegmentationDataset, augmentation: Mapping[str, Any], *, batch_size: int, num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    transforms = torchvision_transforms(augmentation.get("transforms") or [], augmentation.get("crop_size"),
                                        dataset.ignore_index)
    return DataLoader(TransformedDataset(dataset, transforms), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
