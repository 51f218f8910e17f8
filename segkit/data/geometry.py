"""The training geometry: how an image of any size is brought to the training scale, and back.

Training letterboxes every sample into the box `dataset.image_size` (resize to fit, keep the
aspect ratio, pad bottom/right) and then, if `augmentation.crop_size` is smaller than the box,
trains on crops of it. `TrainingGeometry` records that (the checkpoint stores it), and every
inference path (validation, evaluate, predict, `segkit.load(...).predict`, ONNX) reproduces it:

    letterbox_images  the image at the training scale, padded to the box
    (the model)       whole box, or sliding windows of the crop size for crop-trained models
                      (trainer.inference_mode: auto | whole | slide)
    restore_logits    strip the padding, resize the logits bilinearly to the original size
    argmax            the prediction at the original size, scored against the untouched mask
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from segkit.config import INFERENCE_MODES

Size = tuple[int, int]


def fitted_size(original: Sequence[int], box: Sequence[int]) -> Size:
    """The size an image of `original` (H, W) takes inside `box` once letterboxed (aspect kept)."""
    height, width = int(original[0]), int(original[1])
    scale = min(box[0] / height, box[1] / width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def letterbox_images(images: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """Images (..., 3, H, W), uint8 or float: resized to fit `box` (bilinear, antialiased), padded with 0."""
    box = (int(box[0]), int(box[1]))
    if tuple(images.shape[-2:]) == box:
        return images
    new_h, new_w = fitted_size(images.shape[-2:], box)
    images = TF.resize(images, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.pad(images, [0, box[1] - new_w, 0, box[0] - new_h], value=0)  # left, right, top, bottom


def letterbox(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training sample into the box `size`: the image as `letterbox_images`, the mask nearest.

    The mask is padded with ignore_index so padding never becomes a class. A sample already at
    `size` is returned untouched.
    """
    if tuple(mask.shape) == tuple(size):
        return image, mask
    new_h, new_w = fitted_size(mask.shape, size)
    mask = TF.resize(mask[None], [new_h, new_w], interpolation=InterpolationMode.NEAREST_EXACT)[0]
    pad = [0, size[1] - new_w, 0, size[0] - new_h]
    return letterbox_images(image, size), F.pad(mask, pad, value=ignore_index)


def restore_logits(logits: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
    """Scores (..., C, h, w) computed on a letterboxed box -> (..., C, H, W) at the original size.

    The padding is cropped off, the rest resized bilinearly (half-pixel centres, as the letterbox
    resize): the argmax of the result is the prediction at the original resolution.
    """
    height, width = int(original_size[0]), int(original_size[1])
    box = logits.shape[-2:]
    if tuple(box) == (height, width):
        return logits
    new_h, new_w = fitted_size((height, width), box)
    cropped = logits[..., :new_h, :new_w]
    flat = cropped.reshape(-1, *cropped.shape[-3:])
    resized = F.interpolate(flat.float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized.reshape(*cropped.shape[:-2], height, width)


def unletterbox(mask: torch.Tensor, original_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Undo letterbox on a predicted (H, W) mask: crop the padding, resize nearest to the original.

    Only for masks predicted at the input size (`score_at=input`); predictions at the native size
    come from `restore_logits`, which resizes scores, not labels.
    """
    height, width = int(original_size[0]), int(original_size[1])
    if (height, width) == tuple(size):
        return mask
    new_h, new_w = fitted_size((height, width), size)
    cropped = mask[:new_h, :new_w]
    resized = F.interpolate(cropped[None, None].float(), size=(height, width), mode="nearest-exact")
    return resized[0, 0].to(mask.dtype)


@dataclass(frozen=True)
class TrainingGeometry:
    """How training saw images: letterboxed into `image_size`, then (maybe) cropped to `crop_size`,
    and how the trained model is run on the box (`inference`, from `trainer.inference_mode`).

    inference `auto`: a model trained on crops smaller than the box is run on the box in sliding
    windows of the crop size (MMSeg's `slide` after its test-time resize), any other on the whole box.
    `whole` runs a crop-trained model on the whole box at once (it is fully convolutional: each pixel
    then sees the whole image's context, not one window's); `slide` insists on windows.
    """

    image_size: Size
    crop_size: Size | None = None
    inference: str = "auto"  # one of INFERENCE_MODES

    def __post_init__(self) -> None:
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE_MODES)}, got {self.inference!r}")

    @property
    def window(self) -> Size | None:
        """The training crop when it is smaller than the box (the sliding window); None otherwise."""
        crop = self.crop_size
        if crop is None or (crop[0] >= self.image_size[0] and crop[1] >= self.image_size[1]):
            return None
        return crop

    @property
    def mode(self) -> str:
        """What `mode=auto` resolves to: `inference`, where `auto` means `slide` for crop-trained models."""
        if self.window is None or self.inference == "whole":
            return "whole"
        return "slide"

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size),
                "crop_size": list(self.crop_size) if self.crop_size is not None else None,
                "inference": self.inference}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingGeometry:
        """As `as_dict` wrote it; files written before `inference` existed ran crop-trained models in windows."""
        crop = data.get("crop_size")
        return cls(_size(data["image_size"]), _size(crop) if crop is not None else None,
                   str(data.get("inference", "auto")))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrainingGeometry:
        """From a run's config: `dataset.image_size`, `augmentation.crop_size` (null: no crop) and
        `trainer.inference_mode` (absent: auto)."""
        augmentation = cfg.get("augmentation") or {}
        crop = augmentation.get("crop_size") if isinstance(augmentation, Mapping) else None
        trainer = cfg.get("trainer") or {}
        inference = trainer.get("inference_mode", "auto") if isinstance(trainer, Mapping) else "auto"
        return cls(_size(cfg["dataset"]["image_size"]), _size(crop) if crop is not None else None, str(inference))


def _size(value: Sequence[int]) -> Size:
    return int(value[0]), int(value[1])
