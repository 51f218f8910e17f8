"""Turn a trained Segmenter into predictions: whole image, sliding window, test-time augmentation.

Everything here takes float images in [0, 1] shaped (B, 3, H, W), like the model, and returns
per-pixel scores at the input size: the images are already at the training scale (the Predictor
letterboxes them, segkit/data/geometry.py). Sliding windows run a model trained on crops over the
whole letterboxed image; TTA averages softmax probabilities over flips and scales of it.
`clean_mask` is the optional post-processing step (small islands and holes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F

from segkit.metrics import class_scores

MODES = ("whole", "slide", "auto")
Network = Callable[[torch.Tensor], torch.Tensor]  # a model, or an exported one's runtime
DEFAULT_TTA_SCALES = (0.75, 1.0, 1.25)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Offsets of windows of `crop` every `stride` covering [0, length); the last one ends at the edge."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    return [*starts, length - crop]


def default_stride(crop_size: Sequence[int]) -> tuple[int, int]:
    """One third overlap: enough for the seams to disappear, few enough windows to stay cheap."""
    return (max(1, math.ceil(crop_size[0] * 2 / 3)), max(1, math.ceil(crop_size[1] * 2 / 3)))


@torch.no_grad()
def slide_logits(
    model: Network,
    images: torch.Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int] | None = None,
    windows_per_batch: int = 8,
) -> torch.Tensor:
    """Logits from overlapping windows, averaged where they overlap.

    Windows are clamped to the image: edge windows are shifted inwards to end at the border
    (every pixel is covered without padding the image with a fake colour), and an image smaller
    than the crop is one window (the model pads it to its stride internally).
    """
    batch, _, height, width = images.shape
    crop_h, crop_w = min(int(crop_size[0]), height), min(int(crop_size[1]), width)
    stride_h, stride_w = stride if stride is not None else default_stride((crop_h, crop_w))
    boxes = [
        (y, x)
        for y in window_starts(height, crop_h, int(stride_h))
        for x in window_starts(width, crop_w, int(stride_w))
    ]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for first in range(0, len(boxes), windows_per_batch):
        chunk = boxes[first : first + windows_per_batch]
        crops = torch.cat([images[..., y : y + crop_h, x : x + crop_w] for y, x in chunk])
        logits = model(crops).float()
        if total is None:
            total = torch.zeros(batch, logits.shape[1], height, width, device=images.device)
        for i, (y, x) in enumerate(chunk):
            total[..., y : y + crop_h, x : x + crop_w] += logits[i * batch : (i + 1) * batch]
            count[..., y : y + crop_h, x : x + crop_w] += 1
    assert total is not None
    return total / count


def resolve_mode(mode: str, height: int, width: int, crop_size: Sequence[int] | None) -> str:
    """`auto` slides only when the image is larger than the crop (the training size) in some direction."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if crop_size is None:
        return "whole"
    return "slide" if height > crop_size[0] or width > crop_size[1] else "whole"


@torch.no_grad()
def forward_logits(
    model: Network,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
) -> torch.Tensor:
    """One pass of the model, whole image or sliding window; logits (B, C, H, W) in float32.

    A binary model's single logit comes back as two-class logits (segkit.metrics.class_scores).
    """
    mode = resolve_mode(mode, images.shape[-2], images.shape[-1], crop_size)
    if mode == "slide":
        if crop_size is None:
            raise ValueError("mode='slide' needs crop_size")
        return class_scores(slide_logits(model, images, crop_size, stride))
    return class_scores(model(images).float())


@torch.no_grad()
def tta_views(
    model: Network,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta_scales: Sequence[float] = (1.0,),
    tta_flip: bool = False,
) -> Iterator[torch.Tensor]:
    """Softmax probabilities of each scale x flip variant, one at a time, brought back to the input size."""
    height, width = images.shape[-2:]
    for scale in tta_scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
            )
        for flip in (False, True) if tta_flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            logits = forward_logits(model, view, mode, crop_size, stride)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            yield logits.softmax(1)


@torch.no_grad()
def predict_probs(
    model: Network,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta_scales: Sequence[float] = (1.0,),
    tta_flip: bool = False,
) -> torch.Tensor:
    """Softmax probabilities averaged over every scale x flip variant, at the input size."""
    total: torch.Tensor | None = None
    variants = 0
    for probs in tta_views(model, images, mode, crop_size, stride, tta_scales, tta_flip):
        total = probs if total is None else total + probs
        variants += 1
    if total is None:
        raise ValueError("tta_scales is empty")
    return total / variants


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """The log of probabilities: valid logits (softmax gives the probabilities back), never -inf."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


@torch.no_grad()
def predict_logits(
    model: Network,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta_scales: Sequence[float] = (1.0,),
    tta_flip: bool = False,
) -> torch.Tensor:
    """Scores (B, C, H, W) whose argmax is the prediction.

    Without TTA these are the model's logits. With TTA they are the log of the averaged
    probabilities: still valid logits (softmax gives the averaged probabilities back).
    """
    if tuple(tta_scales) == (1.0,) and not tta_flip:
        return forward_logits(model, images, mode, crop_size, stride)
    return probs_to_logits(predict_probs(model, images, mode, crop_size, stride, tta_scales, tta_flip))


@overload
def clean_mask(mask: np.ndarray, min_region: int = ..., max_hole: int = ..., ignore_index: int | None = ...
               ) -> np.ndarray: ...
@overload
def clean_mask(mask: torch.Tensor, min_region: int = ..., max_hole: int = ..., ignore_index: int | None = ...
               ) -> torch.Tensor: ...
def clean_mask(
    mask: np.ndarray | torch.Tensor, min_region: int = 0, max_hole: int = 0, ignore_index: int | None = None
) -> np.ndarray | torch.Tensor:
    """Remove connected regions smaller than `min_region` pixels and fill holes up to `max_hole` pixels.

    Removed pixels take the class of the nearest kept pixel (so no pixel is left unlabelled);
    a hole is a region of other classes entirely enclosed by one class and becomes that class.
    Returns the same type it was given.
    """
    from scipy import ndimage  # imported here: only post-processing needs scipy

    is_tensor = isinstance(mask, torch.Tensor)
    array = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    out = array.copy()
    classes = [int(c) for c in np.unique(array) if ignore_index is None or c != ignore_index]
    if max_hole > 0:
        for cls in classes:
            region = out == cls
            holes, count = ndimage.label(ndimage.binary_fill_holes(region) & ~region)
            if count:
                sizes = np.bincount(holes.ravel())
                small = np.flatnonzero(sizes <= max_hole)
                out[np.isin(holes, small[small > 0])] = cls
    if min_region > 0:
        drop = np.zeros(out.shape, dtype=bool)
        for cls in classes:
            labels, count = ndimage.label(out == cls)
            if count:
                sizes = np.bincount(labels.ravel())
                small = np.flatnonzero(sizes < min_region)
                drop |= np.isin(labels, small[small > 0])
        if drop.any() and not drop.all():
            keep_from = ndimage.distance_transform_edt(drop, return_distances=False, return_indices=True)
            out = out[tuple(keep_from)]
    return torch.from_numpy(out).to(mask.device) if is_tensor else out
