"""Readers whose samples are (image file, mask file) pairs: pairing by stem, reading, value remapping.

Mask values go through, in this order: `reduce_zero_label` (ADE20K), a published `id_mapping`
(COCO-Stuff's 171 classes; segkit/data/readers/conventions.py) or a reader's own table
(Cityscapes label ids), then the user's `remap`. A value the table does not define, or that ends
outside [0, num_classes) and ignore_index, is unknown: `SegmentationDataset.settle` refuses it
or ignores it (dataset.unknown_labels), at any bit depth.

Folder, VOC and Cityscapes differ only in where the pairs come from, so they share this class.
Pairing collects every problem (missing partner, duplicate stem) instead of stopping at the
first, so `segkit-check-data` can list them all and `on_error=skip` can leave them out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from segkit.data.io import IMAGE_SUFFIXES, JPEG_SUFFIXES, read_image, read_mask
from segkit.data.readers.base import SegmentationDataset, ValueTable, out_of_range
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
        self.value_table = self.ids_table(id_mapping)
        self._table: tuple[Mapping[int, int], torch.Tensor, torch.Tensor] | None = None

    def ids_table(self, id_mapping: str | None) -> ValueTable:
        """The values this reader's settings define, and the fix that exists for them."""
        last, ignore = self.num_classes - 1, self.ignore_index
        if id_mapping == "coco_stuff_171":
            return ValueTable("the COCO-Stuff values 0..181 (category id - 1) and 255",
                              "the file is wrong (values of 182 and above: category ids stored instead of id - 1)",
                              "after id_mapping coco_stuff_171 (unused ids and 255 are ignored)")
        if self.reduce_zero_label:
            return ValueTable(f"the values 0..{last + 1} (0 = other) and {ignore}", "the file is wrong",
                              "after reduce_zero_label (0 = other is ignored)")
        listed = (f"the class ids 0..{last}, ignore_index {ignore} and the keys of dataset.remap" if self.remap
                  else f"the class ids 0..{last} and ignore_index {ignore}")
        return ValueTable(listed,
                          "set dataset.num_classes or map them with dataset.remap",
                          "after dataset.remap" if self.remap else "")

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
        path = self.pairs[index][1]
        self.note_jpeg(index, path)
        raw = self.read_mask(path)
        return self.settle(index, raw, *self.map_ids(raw))

    def note_jpeg(self, index: int, path: Path) -> None:
        if path.suffix.lower() in JPEG_SUFFIXES:
            self.note(index, self.finding(f"{path}: JPEG mask, lossy compression invents class ids along edges; "
                                          "fix: save masks as PNG", "JPEG mask"))

    def map_ids(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids of raw mask values, and where a value is outside the value table."""
        mask = reduce_zero_label(raw, self.ignore_index) if self.reduce_zero_label else raw
        unknown = torch.zeros(mask.shape, dtype=torch.bool)
        if self.id_table:
            if self._table is None or self._table[0] is not self.id_table:  # built once per table
                self._table = (self.id_table, *table_tensors(self.id_table))
            mask, unknown = lookup(mask, *self._table[1:])
        mask = apply_remap(mask, self.remap)
        return mask, unknown | out_of_range(mask, self.num_classes, self.ignore_index)

    def keep_samples(self, indices) -> None:
        self.pairs = [self.pairs[i] for i in indices]

    def scan_settings(self) -> dict:
        colors = getattr(self, "color_table", None)
        return {"remap": sorted(self.remap.items()), "reduce_zero_label": self.reduce_zero_label,
                "table": sorted(self.id_table.items()),
                "colors": None if colors is None else [colors.keys.tolist(), colors.ids.tolist()]}

    rgb_fix = "the file is wrong (masks hold class ids, one channel)"

    def read_mask(self, path: Path) -> torch.Tensor:
        """Raw class ids of a mask file; readers with colour-coded masks override this."""
        return read_mask(path, self.rgb_fix)

    def set_pairs(self, pairs: list[tuple[Path, Path]], problems: list[str], where: Path) -> None:
        """Keep the good pairs, report the problems, and fail if nothing is left to read."""
        self.report_layout(problems)
        if self.unused_files:
            more = f" (+{len(self.unused_files) - 1} more)" if len(self.unused_files) > 1 else ""
            log.warning("%s%s", self.unused_files[0], more)
        self.pairs = pairs
        if not pairs:
            raise DataError(f"{where}: empty data set, no image/mask pairs found for split '{self.split}'")
        self.leave_out_unlabelled()


def table_tensors(table: Mapping[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A value table as lookup tensors: the target of each value, and whether the table defines it."""
    size = max(table) + 1
    values = torch.full((size,), -1, dtype=torch.int64)
    known = torch.zeros(size, dtype=torch.bool)
    for value, target in table.items():
        values[value], known[value] = target, True
    return values, known


def lookup(mask: torch.Tensor, values: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values through a format's table (`table_tensors`): (mapped, where a value is not in the table)."""
    size = len(values)
    inside = (mask >= 0) & (mask < size)
    index = torch.where(inside, mask, 0)
    unknown = ~(inside & known[index])
    return torch.where(unknown, mask, values[index]), unknown


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


def require_root(root: Path, holding: str) -> None:
    """A missing root as the root's problem, not as its first subdirectory's."""
    if not root.is_dir():
        raise DataError(f"{root}: data set root not found; fix: dataset.root (the directory holding {holding})")


def require_dir(directory: Path, key: str) -> None:
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found (check dataset.root and dataset.{key})")
