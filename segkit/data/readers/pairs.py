"""Readers whose samples are (image file, mask file) pairs: pairing by stem, reading, value remapping.

Mask values go through, in this order: `reduce_zero_label` (ADE20K), a published `id_mapping`
(COCO-Stuff's 171 classes; segkit/data/readers/conventions.py), then the user's `remap`.

Folder, VOC and Cityscapes differ only in where the pairs come from, so they share this class.
Pairing collects every problem (missing partner, duplicate stem) instead of stopping at the
first, so `segkit-check-data` can list them all and `on_error=skip` can leave them out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from segkit.data.io import IMAGE_SUFFIXES, read_image, read_mask
from segkit.data.readers.base import SegmentationDataset
from segkit.data.readers.conventions import named_remap, reduce_zero_label
from segkit.errors import DataError

log = logging.getLogger(__name__)


class PairedFiles(SegmentationDataset):
    """Subclasses fill `self.pairs` (and call `report_layout`); `remap` maps raw mask values."""

    def __init__(self, *, split: str, remap: Mapping[int, int] | None = None, reduce_zero_label: bool = False,
                 id_mapping: str | None = None, **common) -> None:
        super().__init__(split=split, **common)
        self.remap = {int(k): int(v) for k, v in (remap or {}).items()}
        self.reduce_zero_label = reduce_zero_label
        self.id_table = named_remap(id_mapping, self.ignore_index)
        self.pairs: list[tuple[Path, Path]] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return str(self.pairs[index][1])

    def sample_files(self, index: int) -> dict[str, Path]:
        image, mask = self.pairs[index]
        return {"image": image, "mask": mask}

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.pairs[index][0], self.decode_device), self.read_native_mask(index)

    def read_native_mask(self, index: int) -> torch.Tensor:
        """The mask file's class ids after the benchmark conventions and remap (training and scoring alike)."""
        mask = self.read_mask(self.pairs[index][1])
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask, self.ignore_index)
        return apply_remap(apply_remap(mask, self.id_table), self.remap)

    def read_mask(self, path: Path) -> torch.Tensor:
        """Raw class ids of a mask file; readers with colour-coded masks override this."""
        return read_mask(path)

    def set_pairs(self, pairs: list[tuple[Path, Path]], problems: list[str], where: Path) -> None:
        """Keep the good pairs, report the problems, and fail if nothing is left to read."""
        self.report_layout(problems)
        if self.unused_files:
            more = f" (+{len(self.unused_files) - 1} more)" if len(self.unused_files) > 1 else ""
            log.warning("%s%s", self.unused_files[0], more)
        self.pairs = pairs
        if not pairs:
            raise DataError(f"{where}: empty data set, no image/mask pairs found for split '{self.split}'")


def apply_remap(mask: torch.Tensor, remap: Mapping[int, int]) -> torch.Tensor:
    """Replace mask values by `remap[value]` through a lookup table (one pass, any bit depth)."""
    if not remap or mask.numel() == 0:
        return mask
    if int(mask.min()) < 0:
        remapped = mask.clone()
        for value, target in remap.items():
            remapped[mask == value] = target
        return remapped
    size = max(int(mask.max()), max(remap)) + 1
    table = torch.arange(size, dtype=torch.int64)
    for value, target in remap.items():
        if value >= 0:
            table[value] = target
    return table[mask]


def files_by_stem(
    directory: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Image files of a directory by stem, and the stems that several files share (left out of the first)."""
    suffixes = tuple(suffixes)
    files: dict[str, Path] = {}
    duplicates: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in duplicates:
            duplicates[path.stem].append(path)
        elif path.stem in files:
            duplicates[path.stem] = [files.pop(path.stem), path]
        else:
            files[path.stem] = path
    return files, duplicates


def duplicate_problems(duplicates: Mapping[str, list[Path]]) -> list[str]:
    return [
        f"{paths[-1]}: duplicate stem '{stem}' (also {', '.join(p.name for p in paths[:-1])})"
        for stem, paths in sorted(duplicates.items())
    ]


def require_dir(directory: Path, key: str) -> None:
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found (check dataset.root and dataset.{key})")
