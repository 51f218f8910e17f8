"""Our metrics equal torchmetrics' own computations, with ignore pixels and absent classes."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from segkit.metrics import SegmentationMetrics, summarize_confusion

NUM_CLASSES, IGNORE = 5, 255


def random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    preds = torch.randint(0, NUM_CLASSES - 1, (3, 16, 16), generator=gen)  # class 4 never predicted
    target = torch.randint(0, NUM_CLASSES - 1, (3, 16, 16), generator=gen)  # ... nor present
    target[torch.rand(target.shape, generator=gen) < 0.2] = IGNORE
    return preds, target


def test_metrics_match_torchmetrics_with_ignore_and_absent_class():
    metrics = SegmentationMetrics(NUM_CLASSES, IGNORE, [f"c{i}" for i in range(NUM_CLASSES)], torch.device("cpu"))
    jaccard = MulticlassJaccardIndex(NUM_CLASSES, average="none", ignore_index=IGNORE)
    accuracy = MulticlassAccuracy(NUM_CLASSES, average="micro", ignore_index=IGNORE)
    for seed in range(3):
        preds, target = random_batch(seed)
        metrics.update(preds, target)
        jaccard.update(preds, target)
        accuracy.update(preds, target)
    result = metrics.compute()

    expected_iou = jaccard.compute()
    ours = list(result["per_class_iou"].values())
    for c in range(NUM_CLASSES - 1):
        assert ours[c] == pytest.approx(float(expected_iou[c]), abs=1e-6)
    assert math.isnan(ours[NUM_CLASSES - 1])  # absent from prediction and target: no IoU ...
    assert result["miou"] == pytest.approx(float(expected_iou[:-1].mean()), abs=1e-6)  # ... and not averaged
    assert result["pixel_acc"] == pytest.approx(float(accuracy.compute()), abs=1e-6)


def test_logits_are_reduced_with_argmax():
    metrics = SegmentationMetrics(3, IGNORE, ["a", "b", "c"], torch.device("cpu"))
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 3).permute(0, 3, 1, 2).float()
    metrics.update(logits, target)
    result = metrics.compute()
    assert result["pixel_acc"] == pytest.approx(2 / 3)  # the ignored pixel counts for nothing
    assert result["per_class_iou"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})


def test_dice_from_confusion():
    cm = torch.tensor([[8, 2], [2, 8]])
    result = summarize_confusion(cm, ["a", "b"])
    assert result["per_class_dice"]["a"] == pytest.approx(2 * 8 / (10 + 10))
    assert result["mdice"] == pytest.approx(0.8)
