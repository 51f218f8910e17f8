"""PASCAL VOC 2012 segmentation: JPEGImages/*.jpg <-> SegmentationClass/*.png, split lists in ImageSets.

The masks are palette PNGs whose palette indices are the class ids (read as indices, not
colours); the 255 object borders are ignore_index. `root` is the VOC2012 directory (the
one holding JPEGImages/). SBD's augmented masks fit too: point `mask_dir` at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segkit.data.io import read_stem_list
from segkit.data.readers.base import ValueTable
from segkit.data.readers.pairs import PairedFiles, require_dir, require_root
from segkit.data.readers.schemas import VocSchema as Schema
from segkit.errors import DataError


def voc_colormap(count: int = 256) -> list[list[int]]:
    """The VOC palette: class i's colour from the bits of i (the colours the PNGs display)."""
    colors = []
    for i in range(count):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors


class VocDataset(PairedFiles):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        image_dir: str = Schema.image_dir,  # defaults: the schema's, written once there
        mask_dir: str = Schema.mask_dir,
        split_dir: str = Schema.split_dir,
        **common: Any,
    ) -> None:
        super().__init__(split=split, **common)
        self.root = Path(root).expanduser()
        self.image_dir, self.mask_dir = self.root / image_dir, self.root / mask_dir
        self.colors = voc_colormap(self.num_classes)
        self.value_table = ValueTable(
            f"the VOC class ids 0..{self.num_classes - 1} and {self.ignore_index} (object borders)"
            + (" and the keys of dataset.remap" if self.remap else ""),
            "the file is wrong (masks are palette indices), or map them with dataset.remap",
            "after dataset.remap" if self.remap else "")
        require_root(self.root, "JPEGImages/ and SegmentationClass/")
        require_dir(self.image_dir, "image_dir")
        require_dir(self.mask_dir, "mask_dir")
        list_path = self.root / split_dir / f"{split}.txt"
        if not list_path.is_file():
            raise DataError(f"{list_path}: split list not found (check dataset.root and dataset.split_dir)")
        pairs, problems = [], []
        for stem in read_stem_list(list_path):
            image, mask = self.image_dir / f"{stem}.jpg", self.mask_dir / f"{stem}.png"
            if not image.is_file():
                problems.append(f"{image}: missing image listed in {list_path.name}")
            elif not mask.is_file():
                problems.append(f"{mask}: missing mask for {image.name}")
            else:
                pairs.append((image, mask))
        self.set_pairs(pairs, problems, list_path)
