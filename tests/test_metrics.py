"""Our metrics equal torchmetrics' own computations, with ignore pixels and absent classes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from segkit.errors import ConfigError
from segkit.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    SegmentationMetrics,
    build_metrics,
    class_scores,
    summarize_confusion,
)

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


def test_deterministic_mode_counts_the_same_in_memory_linear_in_the_pixels():
    """trainer.deterministic=true: torchmetrics' own update compares every pixel with all C² cells
    (int64: 8·C²·pixels bytes, 16 GB for 81 classes on 8 COCO images). Ours allocates nothing larger
    than the C²+1 bins or one int64 per pixel."""
    classes, gen = 150, torch.Generator().manual_seed(0)
    preds, target = torch.randint(0, classes, (2, 1, 32, 32), generator=gen).unbind(0)
    target[0, :4] = IGNORE
    expected = MulticlassConfusionMatrix(classes, ignore_index=IGNORE)
    expected.update(preds, target)  # deterministic mode off: torch.bincount
    metrics = SegmentationMetrics(classes, IGNORE, [str(c) for c in range(classes)], torch.device("cpu"))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as trace:
            metrics.update(preds, target)
    finally:
        torch.use_deterministic_algorithms(False)
    largest = max(event.cpu_memory_usage for event in trace.events())
    assert largest <= 8 * max(classes * classes + 1, target.numel())
    assert torch.equal(metrics.confusion.compute(), expected.compute())


def test_confusion_matrix_without_an_ignore_index_counts_every_pixel():
    preds, target = random_batch(0)
    target[target == IGNORE] = NUM_CLASSES - 1  # every pixel a valid class
    ours, expected = ConfusionMatrix(NUM_CLASSES, ignore_index=None), MulticlassConfusionMatrix(NUM_CLASSES)
    ours.update(preds, target)
    expected.update(preds, target)
    assert torch.equal(ours.compute(), expected.compute()) and int(ours.compute().sum()) == target.numel()


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


def test_precision_and_recall_per_class_from_confusion():
    # rows: targets, columns: predictions. Class c never appears anywhere: no values.
    cm = torch.tensor([[6, 2, 0], [1, 3, 0], [0, 0, 0]])
    result = summarize_confusion(cm, ["a", "b", "c"])
    assert result["per_class_precision"]["a"] == pytest.approx(6 / 7)
    assert result["per_class_precision"]["b"] == pytest.approx(3 / 5)
    assert result["per_class_recall"]["a"] == pytest.approx(6 / 8)
    assert result["per_class_recall"]["b"] == pytest.approx(3 / 4)
    assert math.isnan(result["per_class_precision"]["c"]) and math.isnan(result["per_class_recall"]["c"])
    assert "foreground_iou" not in result


def test_two_classes_report_the_foreground():
    cm = torch.tensor([[5, 1], [2, 4]])
    result = summarize_confusion(cm, ["background", "cell"])
    assert result["foreground_iou"] == pytest.approx(4 / 7)
    assert result["foreground_dice"] == pytest.approx(8 / 11)
    assert result["foreground_precision"] == pytest.approx(4 / 5)
    assert result["foreground_recall"] == pytest.approx(4 / 6)


def test_a_single_logit_is_foreground_where_its_sigmoid_exceeds_a_half():
    logit = torch.tensor([-2.0, -0.1, 0.1, 3.0]).view(1, 1, 1, 4)
    scores = class_scores(logit)
    assert scores.argmax(1).tolist() == [[[0, 0, 1, 1]]]
    assert torch.allclose(scores.softmax(1)[:, 1], torch.sigmoid(logit[:, 0]))
    metrics = SegmentationMetrics(2, IGNORE, ["bg", "fg"], torch.device("cpu"))
    metrics.update(logit, torch.tensor([[[0, 1, 1, IGNORE]]]))
    assert metrics.compute()["confusion_matrix"] == [[1, 0], [1, 1]]


def test_boundary_iou_by_hand():
    # 1 x 6 x 6; target: class 1 in the 4x4 square rows/cols 1..4; prediction: that square shifted right by 1.
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 1:5, 1:5] = 1
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[0, 1:5, 2:6] = 1
    metric = BoundaryIoU(num_classes=2, ignore_index=IGNORE, width=1)
    metric.update(pred, target)
    # width 1: a class's band is its pixels with a pixel of another class (or the image edge) in
    # their 3x3 neighbourhood. Class 1 bands: target = the 12-pixel ring of its square; prediction =
    # its ring, which also touches the right image edge. They share rows 1 and 4 at columns 2..4
    # (6 pixels): IoU 6 / (12 + 12 - 6).
    # Class 0 (background): every background pixel touches the image edge or the square, so the bands are
    # the backgrounds themselves (20 pixels each); they share 16: IoU 16 / 24.
    expected = (6 / 18 + 16 / 24) / 2
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)

    perfect = BoundaryIoU(num_classes=2, width=1)
    perfect.update(target, target)
    assert float(perfect.compute()) == pytest.approx(1.0)


def test_boundary_iou_skips_ignored_pixels():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    pred = target.clone()
    pred[0, :, 6:] = 1  # wrong only where the target is ignored
    target[0, :, 6:] = IGNORE
    metric = BoundaryIoU(num_classes=2, ignore_index=IGNORE, width=1)
    metric.update(pred, target)
    plain = BoundaryIoU(num_classes=2, ignore_index=IGNORE, width=1)
    plain.update(torch.where(target == IGNORE, 0, pred), target)
    assert float(metric.compute()) == pytest.approx(float(plain.compute()))


def test_configured_metrics_run_next_to_the_confusion_matrix():
    node = {
        "f1": {"metric": "torchmetrics.classification.MulticlassF1Score",
               "params": {"num_classes": 3, "ignore_index": IGNORE, "average": "macro"}, "stages": ["val", "test"]},
        "ece": {"metric": "torchmetrics.classification.MulticlassCalibrationError",
                "params": {"num_classes": 3, "ignore_index": IGNORE}, "input": "probs", "stages": ["test"],
                "prog_bar": True},
    }
    assert [m.name for m in build_metrics(node, "val", torch.device("cpu"))] == ["f1"]
    extra = build_metrics(node, "test", torch.device("cpu"))
    metrics = SegmentationMetrics(3, IGNORE, ["a", "b", "c"], torch.device("cpu"), extra)
    assert metrics.prog_bar_names == ["ece"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=gen)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[:, 0] = IGNORE
    metrics.update(logits, target)
    result = metrics.compute()["metrics"]
    expected_f1 = MulticlassF1Score(3, ignore_index=IGNORE, average="macro")(logits.argmax(1), target)
    expected_ece = MulticlassCalibrationError(3, ignore_index=IGNORE)(logits.softmax(1), target)
    assert result["f1"] == pytest.approx(float(expected_f1))
    assert result["ece"] == pytest.approx(float(expected_ece))


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"metric": "os.system"}, "metrics.bad.metric"),  # only torchmetrics / segkit.metrics classes
        ({"metric": "torchmetrics.image.fid.FrechetInceptionDistance"}, "metrics.bad.metric"),  # loads a network
        ({"metric": "torchmetrics.NoSuchMetric"}, "metrics.bad.metric"),
        ({"metric": "torchmetrics.classification.MulticlassF1Score", "params": {"classes": 3}}, "metrics.bad.params"),
        ({"metric": "segkit.metrics.BoundaryIoU", "stages": ["train"]}, "metrics.bad.stages"),
        ({"metric": "segkit.metrics.BoundaryIoU", "input": "logits"}, "metrics.bad.input"),
    ],
)
def test_bad_metric_entries_name_the_key(entry, key):
    with pytest.raises(ConfigError) as info:
        build_metrics({"bad": entry}, "val", torch.device("cpu"))
    assert info.value.key == key
