"""The training geometry: how an image of any size is brought to `dataset.image_size`, and back.

Training letterboxes every sample (resize to fit, keep the aspect ratio, pad bottom/right); inference
uses the same functions so a model sees at prediction time what it saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


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


def unletterbox(mask: torch.Tensor, original_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Undo letterbox on a predicted (H, W) mask: crop the padding, resize to the original."""
    height, width = int(original_size[0]), int(original_size[1])
    if (height, width) == tuple(size):
        return mask
    scale = min(size[0] / height, size[1] / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    cropped = mask[:new_h, :new_w]
    resized = F.interpolate(cropped[None, None].float(), size=(height, width), mode="nearest-exact")
    return resized[0, 0].to(mask.dtype)
