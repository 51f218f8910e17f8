"""Segmentation metrics from one confusion matrix kept on the device by torchmetrics, plus the
torchmetrics metrics a config names (`metrics:`), updated on the device next to it.

IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN), precision_c = TP / (TP + FP),
recall_c = TP / (TP + FN), pixel accuracy = trace / total. ignore_index pixels are excluded; a class
absent from both prediction and target has no IoU, Dice, precision or recall (NaN in the per-class
lists) and is left out of the means. Binary models (one output channel) predict foreground where sigmoid(logit) > 0.5.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from segkit.errors import ConfigError

# Where the metric classes a config names may live: a config may come from someone else's checkpoint,
# and these compute from the tensors given (others in torchmetrics load networks, e.g. FID, CLIPScore).
METRIC_MODULES = ("torchmetrics.classification", "torchmetrics.segmentation", "segkit.metrics")
STAGES = ("val", "test")  # val: validation during training; test: segkit-evaluate
INPUTS = ("labels", "probs")


def class_scores(logits: torch.Tensor) -> torch.Tensor:
    """Two-class logits (0, z) for a binary model's single logit z (B, 1, H, W); others unchanged.

    softmax(0, z) = (1 - sigmoid(z), sigmoid(z)) and argmax picks the foreground where sigmoid(z) > 0.5,
    so everything downstream (argmax, probabilities, TTA, sliding windows) treats it as two classes.
    """
    if logits.ndim == 4 and logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


@dataclass
class ConfiguredMetric:
    name: str
    metric: Metric
    input: str
    prog_bar: bool


def build_metrics(node: Mapping[str, Any] | None, stage: str, device: torch.device) -> list[ConfiguredMetric]:
    """The metrics of `node` (the `metrics:` config) that run at `stage`, on `device`."""
    built = []
    for name, entry in (node or {}).items():
        if entry is None:
            continue
        key = f"metrics.{name}"
        entry = dict(entry)
        path = str(entry.get("metric", ""))
        stages, source = list(entry.get("stages", STAGES)), entry.get("input", "labels")
        if unknown := set(stages) - set(STAGES):
            raise ConfigError(f"{key}.stages", f"{sorted(unknown)} are not stages; use {', '.join(STAGES)}")
        if source not in INPUTS:
            raise ConfigError(f"{key}.input", f"must be one of {', '.join(INPUTS)}, got {source!r}")
        if stage not in stages:
            continue
        metric_class = _metric_class(path, f"{key}.metric")
        try:
            metric = metric_class(**dict(entry.get("params") or {}))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{key}.params", str(error).splitlines()[0]) from None
        built.append(ConfiguredMetric(name, metric.to(device), source, bool(entry.get("prog_bar", False))))
    return built


def _metric_class(path: str, key: str) -> type[Metric]:
    module_name, _, class_name = path.rpartition(".")
    refusal = f"{path!r} is not a Metric class in {', '.join(METRIC_MODULES)}"
    if not _in_metric_modules(module_name):  # decided before importing anything the config names
        raise ConfigError(key, refusal)
    try:
        metric_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ConfigError(key, f"{path!r} does not exist") from None
    if not (isinstance(metric_class, type) and issubclass(metric_class, Metric)
            and _in_metric_modules(metric_class.__module__)):  # a re-exported name is judged by its origin
        raise ConfigError(key, refusal)
    return metric_class


def _in_metric_modules(module_name: str) -> bool:
    return any(module_name == m or module_name.startswith(m + ".") for m in METRIC_MODULES)


def confusion_counts(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> torch.Tensor:
    """(C, C) pixel counts, rows the true class and columns the predicted one; ignore_index pixels (if any)
    left out.

    Ignored pixels go to one extra bin instead of being masked out, so the output size is known up front:
    no host sync (boolean masking and bincount both wait for the device), deterministic on every device,
    and memory linear in the pixels.
    """
    n = num_classes
    target, preds = target.reshape(-1), preds.reshape(-1)
    codes = target * n + preds
    if ignore_index is not None:
        codes = torch.where(target == ignore_index, n * n, codes)
    counts = torch.zeros(n * n + 1, dtype=torch.long, device=codes.device)
    counts.scatter_add_(0, codes, codes.new_ones(()).expand_as(codes))  # a view: no second pixel-sized tensor
    return counts[:-1].view(n, n)


class ConfusionMatrix(MulticlassConfusionMatrix):
    """torchmetrics' matrix (state, reset, distributed sum), counted by `confusion_counts`.

    Its own update falls back, under torch.use_deterministic_algorithms (trainer.deterministic=true),
    to comparing every pixel with every one of the C² cells: 16 GB for 81 classes on 8 COCO images.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_counts(preds, target, self.num_classes, self.ignore_index)


class SegmentationMetrics:
    def __init__(self, num_classes: int, ignore_index: int, class_names: Sequence[str], device: torch.device,
                 extra: Sequence[ConfiguredMetric] = ()):
        self.class_names = list(class_names)
        # sync_on_compute: with several processes (torch.distributed initialised) compute() sums every
        # process's matrix, so each process gets the metrics of the whole validation set.
        self.confusion = ConfusionMatrix(
            num_classes, ignore_index=ignore_index, validate_args=False, sync_on_compute=True
        ).to(device)
        self.extra = list(extra)

    @property
    def prog_bar_names(self) -> list[str]:
        return [m.name for m in self.extra if m.prog_bar]

    def reset(self) -> None:
        self.confusion.reset()
        for item in self.extra:
            item.metric.reset()

    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor, preds: torch.Tensor | None = None) -> None:
        """Scores (B, C, H, W) or class ids (B, H, W); `preds` overrides the argmax of the scores
        (post-processed masks) while probability metrics still see the scores."""
        scores = class_scores(logits_or_preds) if logits_or_preds.is_floating_point() else None
        if preds is None:
            preds = scores.argmax(1) if scores is not None else logits_or_preds
        self.confusion.update(preds, target)
        for item in self.extra:
            if item.input == "probs":
                if scores is None:
                    raise ValueError(f"metric {item.name!r} needs probabilities, got class ids")
                item.metric.update(scores.float().softmax(1), target)
            else:
                item.metric.update(preds, target)

    def compute(self) -> dict[str, Any]:
        result = summarize_confusion(self.confusion.compute(), self.class_names)
        if self.extra:
            result["metrics"] = {item.name: _plain(item.metric.compute()) for item in self.extra}
        return result


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def summarize_confusion(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Rows are targets, columns predictions. Returns plain Python numbers.

    With two classes (binary tasks) class 1 is the foreground and its scores appear as foreground_*.
    """
    cm = confusion.double().cpu()
    tp = cm.diag()
    target_count, pred_count = cm.sum(1), cm.sum(0)
    union = target_count + pred_count - tp
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(present, tp / union.clamp_min(1), nan)
    dice = torch.where(present, 2 * tp / (target_count + pred_count).clamp_min(1), nan)
    # A zero denominator (never predicted / never present) gives 0, as torchmetrics' zero_division=0,
    # except for classes absent from both, which like their IoU have no value.
    precision = torch.where(present, tp / pred_count.clamp_min(1), nan)
    recall = torch.where(present, tp / target_count.clamp_min(1), nan)
    total = cm.sum()
    result: dict[str, Any] = {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "mdice": float(dice[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": dict(zip(class_names, iou.tolist(), strict=True)),
        "per_class_dice": dict(zip(class_names, dice.tolist(), strict=True)),
        "per_class_precision": dict(zip(class_names, precision.tolist(), strict=True)),
        "per_class_recall": dict(zip(class_names, recall.tolist(), strict=True)),
        "confusion_matrix": cm.long().tolist(),
    }
    if len(class_names) == 2:
        for name, values in (("iou", iou), ("dice", dice), ("precision", precision), ("recall", recall)):
            result[f"foreground_{name}"] = float(values[1])
    return result


def class_boundaries(labels: torch.Tensor, num_classes: int, width: int, valid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) bool: the valid pixels of each class within `width` pixels (chessboard distance) of
    a valid pixel of another class. As the Boundary IoU reference (Cheng et al. 2021) pads with
    background, the image border counts as another class; ignored pixels (valid False) count as nothing,
    so an ignored region neither holds nor creates contours."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    inside = labels.unsqueeze(1) == classes
    valid = valid.unsqueeze(1)
    outside = F.pad((~inside & valid).float(), (width,) * 4, value=1.0)
    near_outside = F.max_pool2d(outside, kernel_size=2 * width + 1, stride=1)  # dilation of the outside
    return inside & valid & (near_outside > 0)


class BoundaryIoU(Metric):
    """Boundary IoU (Cheng et al., CVPR 2021): IoU of the predicted and true class contours, each a
    band `width` pixels wide, per class then averaged over the classes seen. mIoU barely moves when
    edges are wrong; this does. ignore_index pixels count in neither band and make no contour.
    Inputs: class ids (B, H, W) for prediction and target."""

    full_state_update = False
    intersection: torch.Tensor  # states, (num_classes,)
    union: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = 255, width: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if width < 1:
            raise ValueError(f"width must be >= 1 pixel, got {width}")
        self.num_classes, self.ignore_index, self.width = num_classes, ignore_index, width
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        ignore = self.ignore_index
        valid = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        pred_band = class_boundaries(preds, self.num_classes, self.width, valid)
        target_band = class_boundaries(target, self.num_classes, self.width, valid)
        self.intersection += (pred_band & target_band).sum((0, 2, 3))
        self.union += (pred_band | target_band).sum((0, 2, 3))

    def compute(self) -> torch.Tensor:
        seen = self.union > 0
        if not bool(seen.any()):
            return torch.tensor(0.0)
        return (self.intersection[seen].double() / self.union[seen]).mean().float()
