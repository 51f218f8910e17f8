"""The evaluation pass: one loop over a split with the training loop's metrics, plus per-image records.

Dataset-level numbers come from `SegmentationMetrics` (the object `Trainer.validate` uses), so
for the same weights and data they are identical to validation. Per-image numbers use the same
`summarize_confusion` on each image's own confusion matrix.

`score_at="native"` (the default, the protocol behind MMSeg's IoUMetric and published CamVid /
Cityscapes figures): each image's scores are resized back to its own size and compared with its
untouched mask. `score_at="input"`: compared at the letterboxed size, with the letterboxed mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from segkit.data.geometry import restore_logits
from segkit.data.readers.base import SegmentationDataset
from segkit.engine.progress import Progress
from segkit.errors import ConfigError
from segkit.inference.calibration import ReliabilityBins, confidence_and_entropy
from segkit.inference.predictor import Predictor
from segkit.inference.uncertainty import DEFAULT_MC_SAMPLES
from segkit.inference.worst_images import WorstImages
from segkit.metrics import ConfiguredMetric, SegmentationMetrics, confusion_counts, summarize_confusion

SCORE_AT = ("native", "input")


@dataclass
class ImageResult:
    """One evaluated image: its record for per_image.jsonl and the tensors for pictures."""

    index: int
    stem: str
    filename: str
    image: torch.Tensor | None  # uint8 (3, H, W) at the scored size (native: read back for the shown images only)
    target: torch.Tensor  # int64 (H, W); the smallest integer type that holds the labels once compact()ed
    pred: torch.Tensor  # as target
    pixel_accuracy: float | None
    miou: float | None
    per_class_iou: dict[str, float | None]
    confidence: torch.Tensor | None = None  # float (H, W) in [0, 1], with uncertainty=True
    entropy: torch.Tensor | None = None  # float (H, W) in [0, 1] (normalised by log C)
    variance: torch.Tensor | None = None  # float (H, W) in [0, 1], uncertainty_method tta_variance / mc_dropout

    def uncertainty_maps(self) -> dict[str, torch.Tensor]:
        """The maps this image has, by name (confidence, entropy, variance), in float32; empty without
        uncertainty."""
        maps = {"confidence": self.confidence, "entropy": self.entropy, "variance": self.variance}
        return {name: values.float() for name, values in maps.items() if values is not None}

    def compact(self, labels: Sequence[int]) -> None:
        """Shrink what a report may still draw: masks to the smallest integer type that holds `labels` (the
        class ids and ignore_index), maps to float16 (drawn as 8-bit grey). A kept Cityscapes-size image then
        holds 4 MB of masks instead of 32, which bounds the memory of worst_per_class x classes images."""
        dtype = next(candidate for candidate in (torch.uint8, torch.int16, torch.int32, torch.int64)
                     if torch.iinfo(candidate).min <= min(labels) and max(labels) <= torch.iinfo(candidate).max)
        self.target, self.pred = self.target.to(dtype), self.pred.to(dtype)
        self.confidence, self.entropy, self.variance = (
            values.half() if values is not None else None for values in (self.confidence, self.entropy, self.variance))


@dataclass
class EvalResult:
    summary: dict[str, Any]  # summarize_confusion over the split
    records: list[dict[str, Any]] = field(default_factory=list)  # per image, in evaluation order (index)
    worst: list[ImageResult] = field(default_factory=list)  # lowest per-image mIoU first
    # class name -> the images where its IoU is lowest (it is in their ground truth or prediction), lowest first
    worst_per_class: dict[str, list[ImageResult]] = field(default_factory=dict)

    def shown(self) -> list[ImageResult]:
        """The images a report draws, each once: the worst overall, then each class's worst."""
        unique = {item.index: item for item in self.worst}
        for items in self.worst_per_class.values():
            for item in items:
                unique.setdefault(item.index, item)
        return list(unique.values())


def image_path(dataset: SegmentationDataset, index: int) -> Path | None:
    """The image file behind a sample, for readers that have files (not generated data)."""
    image = dataset.sample_files(index).get("image")
    return Path(image) if image is not None else None


def nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def per_image_metrics(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, class_names: Sequence[str]
) -> tuple[float | None, float | None, dict[str, float | None]]:
    """(pixel accuracy, mIoU, IoU per class) of one image; None where the image gives no value."""
    confusion = confusion_counts(pred, target, num_classes, ignore_index)
    result = summarize_confusion(confusion, class_names)
    if int(confusion.sum()) == 0:
        return None, None, {name: None for name in class_names}
    ious = {name: nan_to_none(value) for name, value in result["per_class_iou"].items()}
    return result["pixel_acc"], result["miou"], ious


def evaluate(
    predictor: Predictor,
    dataset: SegmentationDataset,
    loader: DataLoader,
    *,
    mode: str = "auto",
    tta: bool | Mapping[str, Any] | None = False,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    score_at: str = "native",
    worst_n: int = 0,
    worst_per_class: int = 0,
    on_image: Callable[[ImageResult], None] | None = None,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress_bar: bool = True,
    extra_metrics: Sequence[ConfiguredMetric] = (),
    calibration_bins: int = 0,
    uncertainty: bool = False,
    uncertainty_method: str = "softmax",
    mc_samples: int = DEFAULT_MC_SAMPLES,
) -> EvalResult:
    """Run the model over `loader` (built on `dataset`, in order) and collect the metrics.

    `postprocess` maps one predicted (H, W) mask to another (e.g. `clean_mask`); the metrics
    are then those of the post-processed masks. `extra_metrics` (segkit.metrics.build_metrics) are
    updated next to the confusion matrix. `calibration_bins` > 0 adds the expected calibration error
    and its reliability diagram data as summary["calibration"]; `uncertainty` gives every ImageResult
    its confidence and entropy maps, and its variance map for `uncertainty_method` tta_variance / mc_dropout
    (segkit/inference/uncertainty.py; the metrics are then those of the samples' mean). Only one image's
    full-size scores exist at a time; of the ImageResults, only the `worst_n` lowest by mIoU and the
    `worst_per_class` lowest of each class's IoU are kept (segkit.inference.worst_images), with their pictures.
    """
    if score_at not in SCORE_AT:
        raise ConfigError("score_at", f"must be one of {', '.join(SCORE_AT)}, got {score_at!r}")
    num_classes, ignore = dataset.num_classes, dataset.ignore_index
    names = dataset.class_names
    metrics = SegmentationMetrics(num_classes, ignore, names, predictor.device, extra_metrics)
    result = EvalResult(summary={})
    worst: WorstImages[ImageResult] = WorstImages(worst_n, worst_per_class, names)
    progress = Progress(len(loader), "evaluate", enabled=progress_bar)
    reliability = ReliabilityBins(calibration_bins, predictor.device) if calibration_bins else None
    index = 0
    with torch.no_grad():
        for images, masks in loader:
            scores, variances = predictor.box_uncertainty(images, mode, tta, crop_size, stride, uncertainty_method,
                                                          mc_samples)
            masks = masks.to(predictor.device)
            for i, (image, box_scores, box_mask) in enumerate(zip(images, scores, masks, strict=True)):
                variance = variances[i] if variances is not None and uncertainty else None
                if score_at == "native":  # the scores at the image's own size, its untouched mask
                    target = dataset.native_mask(index).to(box_scores.device)
                    full, image = restore_logits(box_scores, target.shape), None
                    if variance is not None:  # brought back as the scores are
                        variance = restore_logits(variance[None], target.shape)[0].clamp(0, 1)
                else:
                    full, target = box_scores, box_mask
                pred = full.argmax(0)
                if postprocess is not None:
                    pred = postprocess(pred)
                metrics.update(full[None], target[None], preds=pred[None])
                probs = full[None].float().softmax(1) if reliability is not None or uncertainty else None
                if reliability is not None and probs is not None:
                    reliability.update(probs, target[None], ignore)
                confidence, entropy = ([m[0].cpu() for m in confidence_and_entropy(probs)]
                                       if uncertainty and probs is not None else (None, None))
                item = _image_result(dataset, index, image, target.cpu(), pred.cpu(), num_classes, ignore, names)
                item.confidence, item.entropy = confidence, entropy
                item.variance = variance.cpu() if variance is not None else None
                result.records.append(_record(item))
                if on_image is not None:
                    on_image(item)
                item.compact((0, num_classes - 1, ignore))
                worst.offer(item)
                index += 1
            progress.advance(1)
    progress.close()
    result.summary = metrics.compute()
    if reliability is not None:
        result.summary["calibration"] = {**reliability.compute(), "temperature": predictor.temperature}
    result.worst, result.worst_per_class = worst.overall(), worst.per_class()
    for item in result.shown():
        if item.image is None:  # scored at the native size: the original image, for the pictures
            item.image = dataset.read(item.index)[0]
    return result


def _image_result(
    dataset: SegmentationDataset, index: int, image: torch.Tensor | None, target: torch.Tensor, pred: torch.Tensor,
    num_classes: int, ignore: int, names: Sequence[str],
) -> ImageResult:
    path = image_path(dataset, index)
    stem = path.stem if path is not None else f"{dataset.split}_{index:05d}"
    filename = path.name if path is not None else f"{dataset.describe(index)}"
    accuracy, miou, ious = per_image_metrics(pred, target, num_classes, ignore, names)
    return ImageResult(index, stem, filename, image, target, pred, accuracy, miou, ious)


def _record(item: ImageResult) -> dict[str, Any]:
    return {
        "filename": item.filename,
        "predicted_mask_path": f"per_image/{item.stem}_pred.png",
        "pixel_accuracy": item.pixel_accuracy,
        "per_class_iou": item.per_class_iou,
        "miou": item.miou,
    }
