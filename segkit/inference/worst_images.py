"""The images an evaluation report draws, chosen as the evaluation goes, in bounded memory.

The worst `overall` images by mIoU and, for each class, the `per_class` images where that class's IoU is
lowest. Each choice is a heap of at most k entries, so an evaluation of any length keeps at most
overall + per_class x classes images; an image kept by several heaps is one object, held once.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class ScoredImage(Protocol):
    @property
    def miou(self) -> float | None: ...

    @property
    def per_class_iou(self) -> Mapping[str, float | None]: ...


Image = TypeVar("Image", bound=ScoredImage)


class LowestK(Generic[T]):
    """The k items with the lowest scores offered so far. Among equal scores the item offered first counts as
    lower: it is kept and listed first, so the choice does not depend on the heap's internal order."""

    def __init__(self, k: int) -> None:
        self.k = k
        # heapq is a min-heap: keys (-score, -order) put the highest kept score, latest offered, at the root,
        # the entry a lower score replaces.
        self._heap: list[tuple[float, int, T]] = []
        self._offered = 0

    def offer(self, score: float, item: T) -> None:
        self._offered += 1
        if self.k <= 0:
            return
        entry = (-score, -self._offered, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:  # a lower score than the root's; an equal one loses, offered later
            heapq.heapreplace(self._heap, entry)

    def lowest(self) -> list[T]:
        """The kept items, lowest score first (earliest offered first among equal scores)."""
        return [item for _, _, item in sorted(self._heap, key=lambda entry: entry[:2], reverse=True)]


class WorstImages(Generic[Image]):
    """The worst `overall` images by mIoU and the worst `per_class` images of each class by that class's IoU.

    A class counts for an image only where it has an IoU there: present in the ground truth or the prediction
    (an IoU of None, no pixel of the class on either side, is no evidence of the class doing badly)."""

    def __init__(self, overall: int, per_class: int, class_names: Sequence[str]) -> None:
        self._overall: LowestK[Image] = LowestK(overall)
        self._per_class: dict[str, LowestK[Image]] = {name: LowestK(per_class) for name in class_names}

    def offer(self, image: Image) -> None:
        if image.miou is not None:
            self._overall.offer(image.miou, image)
        for name, iou in image.per_class_iou.items():
            if iou is not None and name in self._per_class:
                self._per_class[name].offer(iou, image)

    def overall(self) -> list[Image]:
        """Lowest mIoU first."""
        return self._overall.lowest()

    def per_class(self) -> dict[str, list[Image]]:
        """Class name -> its images, lowest IoU of that class first."""
        return {name: lowest.lowest() for name, lowest in self._per_class.items()}
