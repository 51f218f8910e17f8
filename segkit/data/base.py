"""The dataset contract every reader follows, and the fixed-size step that makes batches possible."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from segkit.errors import DataError


class SegmentationDataset(Dataset):
    """A split of a data set yielding (uint8 image (3, H, W), int64 mask (H, W)) at `image_size`.

    Subclasses implement `__len__`, `read(index)` (native size) and `describe(index)` (the file
    names, for error messages). This class letterboxes every sample to `image_size` so that
    any batch can be stacked, and checks the mask values so a wrong `num_classes` or a missing
    remap is reported with its file at the first bad sample, inside the worker that read it.
    """

    def __init__(
        self,
        *,
        split: str,
        name: str,
        num_classes: int,
        ignore_index: int,
        image_size: Sequence[int],
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.split = split
        self.name = name
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.mean = list(mean)
        self.std = list(std)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{self.name}[{self.split}][{index}]"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(index)
        if image.shape[-2:] != mask.shape:
            raise DataError(
                f"{self.describe(index)}: image size {tuple(image.shape[-2:])} != mask size {tuple(mask.shape)}"
            )
        self.check_mask_values(mask, index)
        return letterbox(image, mask, self.image_size, self.ignore_index)

    def check_mask_values(self, mask: torch.Tensor, index: int) -> None:
        bad = (mask < 0) | ((mask >= self.num_classes) & (mask != self.ignore_index))
        if bad.any():
            values = sorted(mask[bad].unique().tolist())[:8]
            raise DataError(
                f"{self.describe(index)}: mask values {values} are outside [0, {self.num_classes}) "
                f"and not ignore_index={self.ignore_index}; fix dataset.num_classes or map them with dataset.remap"
            )


def letterbox(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to fit inside `size` keeping the aspect ratio, then pad bottom/right.

    Image: bilinear (antialiased), padded with 0. Mask: nearest, padded with ignore_index so
    padding never becomes a class. A sample already at `size` is returned untouched.
    """
    height, width = mask.shape
    if (height, width) == size:
        return image, mask
    scale = min(size[0] / height, size[1] / width)
    new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
    image = TF.resize(image, new_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], new_size, interpolation=InterpolationMode.NEAREST_EXACT)[0]
    pad = [0, size[1] - new_size[1], 0, size[0] - new_size[0]]  # left, right, top, bottom
    return F.pad(image, pad, value=0), F.pad(mask, pad, value=ignore_index)
