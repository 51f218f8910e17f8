"""Joint image + mask augmentation on the training device with Kornia.

Kornia resamples masks nearest but fills the pixels a geometric op invents (padding, rotated
corners) with 0 and works on float masks. So masks enter shifted by one (class c -> c + 1,
ignore -> 0): invented pixels come out as 0 and map back to ignore_index, never to class 0.
Everything runs in float32 with autocast off, so labels stay exact under fp16/bf16 training.

The crop comes last. With `class_uniform` > 0, that fraction of the crops is centred on a pixel of a
class drawn uniformly from the classes present in the sample (after the geometric ops): a pole that
covers 0.5 % of the image is the centre as often as the road, where a random crop would almost never
frame it (class-uniform sampling, Zhu et al. 2019, the Cityscapes recipes' rare-class crops).
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
        class_uniform: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= class_uniform <= 1.0:
            raise ValueError(f"augmentation.class_uniform must be in [0, 1], got {class_uniform}")
        if class_uniform and (crop_size is None or num_classes is None):
            raise ValueError("augmentation.class_uniform centres crops: it needs augmentation.crop_size and "
                             "augmentation.num_classes")
        self.ignore_index = ignore_index
        self.crop_size = list(crop_size) if crop_size is not None else None
        self.class_uniform, self.num_classes = class_uniform, num_classes
        ops: list[Any] = list(transforms)  # Kornia augmentations
        if self.crop_size is not None and not class_uniform:
            height, width = self.crop_size
            ops.append(K.RandomCrop((height, width), pad_if_needed=True))
        self.pipeline = K.AugmentationSequential(*ops, data_keys=["input", "mask"]) if ops else None

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float (B, 3, H, W) in [0, 1]; masks: int64 (B, H, W). Returns the same kinds."""
        if self.pipeline is not None:
            shifted = torch.where(masks == self.ignore_index, 0, masks + 1).unsqueeze(1).float()
            images, shifted = self.pipeline(images.float(), shifted)
            labels = shifted.squeeze(1).round().long() - 1
            masks = torch.where(labels < 0, self.ignore_index, labels)
        if self.class_uniform:
            assert self.crop_size is not None and self.num_classes is not None
            images, masks = class_uniform_crop(images, masks, self.crop_size, self.class_uniform, self.num_classes,
                                               self.ignore_index)
        return images.clamp_(0, 1), masks


def class_uniform_crop(images: torch.Tensor, masks: torch.Tensor, size: Sequence[int], fraction: float,
                       num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop each sample to `size`: a `fraction` of them centred on a pixel of a class drawn uniformly from
    the classes in that sample (a pixel drawn uniformly from that class), the rest at a uniform position.
    Samples smaller than `size` are padded first (image 0, mask ignore). No host read: every choice is an
    argmax of uniform random keys over the allowed entries (uniform among them), drawn from torch's global
    RNG on the masks' device, so a seeded run, and its resume, crops the same."""
    height, width = size
    pad_h, pad_w = max(0, height - masks.shape[-2]), max(0, width - masks.shape[-1])
    if pad_h or pad_w:
        images = nn.functional.pad(images, (0, pad_w, 0, pad_h), value=0.0)
        masks = nn.functional.pad(masks, (0, pad_w, 0, pad_h), value=ignore_index)
    batch, rows, cols = masks.shape
    device = masks.device
    labels = masks.flatten(1)
    valid = (labels >= 0) & (labels < num_classes)  # ignore_index and invented pixels are never a centre
    safe = torch.where(valid, labels, 0)
    present = torch.zeros(batch, num_classes, device=device).scatter_add_(1, safe, valid.float()) > 0
    chosen = _uniform_choice(present).unsqueeze(1)  # a class per sample
    pixel = _uniform_choice(valid & (safe == chosen))  # a pixel of it
    centred = (torch.rand(batch, device=device) < fraction) & present.any(1)
    top = torch.where(centred, (pixel // cols - height // 2).clamp(0, rows - height),
                      (torch.rand(batch, device=device) * (rows - height + 1)).long())
    left = torch.where(centred, (pixel % cols - width // 2).clamp(0, cols - width),
                       (torch.rand(batch, device=device) * (cols - width + 1)).long())
    # Gather the windows: row and column indices per sample, no per-sample slicing on the host.
    row_index = (top[:, None] + torch.arange(height, device=device))[:, :, None]  # (B, h, 1)
    col_index = (left[:, None] + torch.arange(width, device=device))[:, None, :]  # (B, 1, w)
    sample = torch.arange(batch, device=device)[:, None, None]
    cropped_masks = masks[sample, row_index, col_index]
    cropped_images = images.permute(0, 2, 3, 1)[sample, row_index, col_index].permute(0, 3, 1, 2)
    return cropped_images.contiguous(), cropped_masks


def _uniform_choice(allowed: torch.Tensor) -> torch.Tensor:
    """Per row, the index of an entry drawn uniformly from the allowed ones (the argmax of uniform keys
    where allowed; index of a uniform key over all entries when a row allows none)."""
    keys = torch.rand(allowed.shape, device=allowed.device)
    return torch.where(allowed, keys + 1.0, keys).argmax(1)
