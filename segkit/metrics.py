"""Segmentation metrics from one confusion matrix kept on the device by torchmetrics.

IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN), pixel accuracy = trace / total.
ignore_index pixels are excluded; a class absent from both prediction and target has no IoU
(NaN in the per-class list) and is left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationMetrics:
    def __init__(self, num_classes: int, ignore_index: int, class_names: Sequence[str], device: torch.device):
        self.class_names = list(class_names)
        # sync_on_compute: with several processes (torch.distributed initialised) compute() sums every
        # process's matrix, so each process gets the metrics of the whole validation set.
        self.confusion = MulticlassConfusionMatrix(
            num_classes, ignore_index=ignore_index, validate_args=False, sync_on_compute=True
        ).to(device)

    def reset(self) -> None:
        self.confusion.reset()

    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = logits_or_preds.argmax(1) if logits_or_preds.ndim == 4 else logits_or_preds
        self.confusion.update(preds, target)

    def compute(self) -> dict[str, object]:
        return summarize_confusion(self.confusion.compute(), self.class_names)


def summarize_confusion(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, object]:
    """Rows are targets, columns predictions. Returns plain Python numbers."""
    cm = confusion.double().cpu()
    tp = cm.diag()
    target_count, pred_count = cm.sum(1), cm.sum(0)
    union = target_count + pred_count - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    dice = torch.where(present, 2 * tp / (target_count + pred_count).clamp_min(1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "mdice": float(dice[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": dict(zip(class_names, iou.tolist(), strict=True)),
        "per_class_dice": dict(zip(class_names, dice.tolist(), strict=True)),
        "confusion_matrix": cm.long().tolist(),
    }
