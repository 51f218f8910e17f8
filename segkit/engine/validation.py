"""Validation: the metrics and loss of the raw or EMA weights, the epoch's `val/...` record, and the
validation images (prediction, ground truth, errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from segkit.data.geometry import restore_logits
from segkit.engine.build import TrainingParts
from segkit.engine.distributed import global_mean
from segkit.engine.step import to_model_input
from segkit.metrics import class_scores
from segkit.models.sliding import slide_logits
from segkit.reporting.plots import comparison_grid, stable_palette


@torch.no_grad()
def validate(parts: TrainingParts, score_at: str, raw: bool = False) -> dict[str, Any]:
    """Metrics and mean loss (`loss`) of the validated weights: the EMA ones with trainer.ema_decay,
    unless `raw` asks for the trained ones.

    The model runs on the letterboxed batch as inference does (whole, or sliding windows for a
    crop-trained model unless trainer.inference_mode=whole); the loss is the training loss on that
    batch. With score_at=native each image's scores are then resized to its own size and scored
    against its untouched mask, one image at a time (memory stays bounded). The confusion matrix
    syncs across processes.
    """
    forward = validated_forward(parts, raw)
    parts.metrics.reset()
    loss_sum = torch.zeros((), device=parts.device)
    images_seen = torch.zeros((), device=parts.device)
    indices = iter(parts.val_loader.sampler)  # the loader's order: sample ids of every batch
    for images, masks in parts.val_loader:  # on the device already
        logits = window_logits(parts, forward, to_model_input(images, channels_last=parts.channels_last))
        loss_sum += parts.loss_fn(logits.float(), masks) * images.shape[0]
        images_seen += images.shape[0]
        if score_at != "native":
            parts.metrics.update(logits, masks)
            continue
        for scores in logits:
            target = parts.val_set.native_mask(next(indices)).to(parts.device, non_blocking=True)
            parts.metrics.update(restore_logits(scores, target.shape)[None], target[None])
    result = parts.metrics.compute()
    result["loss"] = global_mean(loss_sum, images_seen, parts.dist)
    return result


def validated_forward(parts: TrainingParts, raw: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The EMA weights (always in eval mode), or with `raw` or without EMA the trained network."""
    if parts.ema is not None and not raw:
        return parts.ema.module
    parts.model.eval()
    return parts.step.forward


def window_logits(parts: TrainingParts, forward: Callable[[torch.Tensor], torch.Tensor],
                  images: torch.Tensor) -> torch.Tensor:
    """The network's own output (one logit for binary models: the loss takes it as trained), whole or in
    sliding windows of the training crop, under the training precision."""
    window = parts.geometry.window
    with parts.step.autocast():
        if parts.geometry.mode == "slide" and window is not None:
            return slide_logits(forward, images, window)
        return forward(images)


def validation_record(result: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, Any]:
    """The epoch's `val/...` values (`val_raw/...`: the trained weights beside the EMA ones)."""
    return {
        "val/loss": result["loss"],
        "val/miou": result["miou"],
        "val/mdice": result["mdice"],
        "val/pixel_acc": result["pixel_acc"],
        **{f"val/{key}": value for key, value in result.items() if key.startswith("foreground_")},
        **{f"val/iou_{name}": value for name, value in result["per_class_iou"].items()},
        **{f"val/{name}": value for name, value in result.get("metrics", {}).items()
           if isinstance(value, (int, float))},
        **({"val_raw/loss": raw["loss"], "val_raw/miou": raw["miou"], "val_raw/pixel_acc": raw["pixel_acc"]}
           if raw is not None else {}),
    }


@torch.no_grad()
def validation_images(parts: TrainingParts, count: int) -> np.ndarray:
    """The first `count` validation images beside their prediction, ground truth and errors, as validation
    sees them."""
    images, masks = zip(*(parts.val_set[i] for i in range(count)), strict=True)
    model = parts.ema.module if parts.ema is not None else parts.model  # bare: DDP would wait for peers
    model.eval()
    logits = window_logits(parts, model, to_model_input(torch.stack(images), parts.device, parts.channels_last))
    preds = class_scores(logits.float()).argmax(1).cpu()
    palette = stable_palette(parts.val_set.num_classes, parts.val_set.colors)
    return comparison_grid(images, preds, masks, palette, parts.val_set.ignore_index)
