"""The images an evaluation report draws, chosen in bounded memory (segkit.inference.worst_images)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from segkit.inference.evaluation import EvalResult, ImageResult
from segkit.inference.worst_images import LowestK, WorstImages


@dataclass
class Scored:
    name: str
    miou: float | None
    per_class_iou: dict[str, float | None] = field(default_factory=dict)


def test_lowest_k_keeps_exactly_the_k_lowest_in_order():
    scores = np.random.default_rng(0).random(500)
    lowest: LowestK[int] = LowestK(7)
    for position, score in enumerate(scores):
        lowest.offer(float(score), position)
    assert lowest.lowest() == [int(i) for i in np.argsort(scores, kind="stable")[:7]]
    assert len(lowest._heap) == 7  # never more than k held


def test_equal_scores_keep_the_first_offered():
    scores = [0.5, 0.2, 0.5, 0.2, 0.2, 0.5, 0.1]
    for k, expected in ((1, [6]), (2, [6, 1]), (4, [6, 1, 3, 4]), (5, [6, 1, 3, 4, 0]), (9, [6, 1, 3, 4, 0, 2, 5])):
        lowest: LowestK[int] = LowestK(k)
        for position, score in enumerate(scores):
            lowest.offer(score, position)
        assert lowest.lowest() == expected, k
    one: LowestK[str] = LowestK(1)
    for name in ("first", "second"):
        one.offer(0.3, name)
    assert one.lowest() == ["first"]


def test_k_zero_keeps_nothing():
    lowest: LowestK[int] = LowestK(0)
    lowest.offer(0.0, 1)
    assert lowest.lowest() == []


def test_a_class_counts_only_where_it_has_an_iou():
    images = [
        Scored("a", 0.5, {"road": 0.9, "car": None}),  # no car in its ground truth or prediction
        Scored("b", 0.2, {"road": 0.1, "car": 0.3}),
        Scored("c", None, {"road": None, "car": None}),  # every pixel ignored: no score at all
        Scored("d", 0.4, {"road": 0.8, "car": 0.0}),
    ]
    worst: WorstImages[Scored] = WorstImages(overall=2, per_class=3, class_names=["road", "car"])
    for image in images:
        worst.offer(image)
    assert [image.name for image in worst.overall()] == ["b", "d"]
    per_class = worst.per_class()
    assert [image.name for image in per_class["road"]] == ["b", "d", "a"]
    assert [image.name for image in per_class["car"]] == ["d", "b"]  # "a" has no car: not a low car IoU
    assert per_class["car"][1] is worst.overall()[0]  # one object, however many lists hold it


def image_result(index: int, miou: float, ious: dict[str, float | None]) -> ImageResult:
    mask = torch.zeros(2, 2, dtype=torch.int64)
    return ImageResult(index, f"img_{index}", f"img_{index}.png", None, mask, mask, 1.0, miou, ious)


def test_the_shown_images_are_each_listed_once():
    a, b, c = (image_result(i, 0.1 * (i + 1), {"road": 0.5}) for i in range(3))
    result = EvalResult(summary={}, worst=[a, b], worst_per_class={"road": [c, a], "car": [b, c]})
    assert [item.index for item in result.shown()] == [0, 1, 2]


def test_a_kept_image_is_compacted_to_the_smallest_type_that_holds_its_labels():
    import torch

    from segkit.inference.evaluation import ImageResult

    def result(values: list[int]) -> ImageResult:
        mask = torch.tensor(values, dtype=torch.int64).view(1, -1)
        return ImageResult(0, "a", "a.png", None, mask.clone(), mask.clone(), 1.0, 1.0, {},
                           confidence=torch.full((1, len(values)), 0.25))

    cityscapes = result([0, 18, 255])
    cityscapes.compact((0, 18, 255))
    assert cityscapes.pred.dtype == cityscapes.target.dtype == torch.uint8
    assert cityscapes.target.tolist() == [[0, 18, 255]]  # exact
    assert cityscapes.confidence is not None and cityscapes.confidence.dtype == torch.float16
    assert cityscapes.uncertainty_maps()["confidence"].dtype == torch.float32  # drawn from float32 copies
    negative_ignore = result([-1, 3])
    negative_ignore.compact((0, 149, -1))
    assert negative_ignore.target.dtype == torch.int16 and negative_ignore.target.tolist() == [[-1, 3]]
