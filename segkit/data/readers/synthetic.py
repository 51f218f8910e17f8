"""A procedural data set: coloured shapes on textured backgrounds, deterministic per index.

It needs no download, so the default run and the tests can train on it anywhere. Each class
has its own shape and a jittered colour, so a small model learns it in minutes, but only by
using both colour and shape (the background texture borrows the class colours).
"""

from __future__ import annotations

import math

import torch

from segkit.data.readers.base import SegmentationDataset
from segkit.data.readers.schemas import SyntheticSchema as Schema

# One base colour per class id (class 0 is the background and uses random colours).
_PALETTE = torch.tensor(
    [[0, 0, 0], [230, 60, 60], [60, 200, 80], [70, 90, 230], [240, 200, 40],
     [200, 70, 220], [40, 210, 220], [250, 140, 40], [150, 150, 150], [120, 60, 20]],
    dtype=torch.float32,
)
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


class SyntheticShapes(SegmentationDataset):
    def __init__(
        self,
        *,
        split: str,
        train_size: int = Schema.train_size,  # defaults: the schema's, written once there
        val_size: int = Schema.val_size,
        max_shapes: int = Schema.max_shapes,
        seed: int = Schema.seed,
        **common,
    ) -> None:
        super().__init__(split=split, **common)
        if self.num_classes > len(_PALETTE):
            raise ValueError(f"synthetic data supports at most {len(_PALETTE)} classes")
        self.length = train_size if split == "train" else val_size
        self.max_shapes = max_shapes
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 7_919 + _SPLIT_OFFSET.get(self.split, 0) + index)
        height, width = self.image_size
        ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)

        # Background: a smooth two-colour gradient plus noise.
        top, bottom = torch.rand(2, 3, generator=gen) * 255
        t = (ys / max(height - 1, 1))[None]
        image = top[:, None, None] * (1 - t) + bottom[:, None, None] * t
        mask = torch.zeros(height, width, dtype=torch.int64)

        for _ in range(int(torch.randint(1, self.max_shapes + 1, (1,), generator=gen))):
            cls = int(torch.randint(1, self.num_classes, (1,), generator=gen))
            cy, cx = float(torch.rand(1, generator=gen)) * height, float(torch.rand(1, generator=gen)) * width
            radius = (0.1 + 0.15 * float(torch.rand(1, generator=gen))) * min(height, width)
            region = _shape(cls, ys - cy, xs - cx, radius)
            colour = (_PALETTE[cls] + (torch.rand(3, generator=gen) - 0.5) * 80).clamp(0, 255)
            image = torch.where(region[None], colour[:, None, None], image)
            mask[region] = cls

        image = image + torch.randn(3, height, width, generator=gen) * 12
        return image.clamp(0, 255).to(torch.uint8), mask


def _shape(cls: int, dy: torch.Tensor, dx: torch.Tensor, r: float) -> torch.Tensor:
    """The pixels of class `cls`'s shape centred at (0, 0) with size r."""
    kind = (cls - 1) % 5
    if kind == 0:  # disc
        return dy**2 + dx**2 <= r**2
    if kind == 1:  # square
        return (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
    if kind == 2:  # triangle pointing up
        return (dy <= r * 0.7) & (dy >= -r) & (dx.abs() <= (dy + r) * math.tan(math.pi / 6))
    if kind == 3:  # ring
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    return (dy.abs() <= r * 0.25) & (dx.abs() <= r) | (dx.abs() <= r * 0.25) & (dy.abs() <= r)  # cross
