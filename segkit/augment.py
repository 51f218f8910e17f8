"""Joint image + mask augmentation on the training device with Kornia.

Kornia resamples masks nearest but fills the pixels a geometric op invents (padding, rotated
corners) with 0 and works on float masks. So masks enter shifted by one (class c -> c + 1,
ignore -> 0): invented pixels come out as 0 and map back to ignore_index, never to class 0.
Everything runs in float32 with autocast off, so labels stay exact under fp16/bf16 training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

from segkit.registry import register


@register("augmentation")
class JointAugment(nn.Module):
    def __init__(
        self,
        transforms: Sequence[nn.Module],
        ignore_index: int,
        crop_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.crop_size = list(crop_size) if crop_size is not None else None
        ops: list[Any] = list(transforms)  # Kornia augmentations
        if self.crop_size is not None:
            height, width = self.crop_size
            ops.append(K.RandomCrop((height, width), pad_if_needed=True))
        self.pipeline = K.AugmentationSequential(*ops, data_keys=["input", "mask"]) if ops else None

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float (B, 3, H, W) in [0, 1]; masks: int64 (B, H, W). Returns the same kinds."""
        if self.pipeline is None:
            return images, masks
        shifted = torch.where(masks == self.ignore_index, 0, masks + 1).unsqueeze(1).float()
        images, shifted = self.pipeline(images.float(), shifted)
        labels = shifted.squeeze(1).round().long() - 1
        masks = torch.where(labels < 0, self.ignore_index, labels)
        return images.clamp_(0, 1), masks
