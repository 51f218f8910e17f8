"""COCO instance annotations rasterised to semantic masks (pycocotools), cached as PNG files.

Class ids: background is 0 and the selected categories (all, or `categories` by name or
id, in that order) are 1..N in order; the category names become the class names. Objects
of categories left out of the subset are background.

Drawing rule, so that every run makes the same mask: crowd regions (`iscrowd: 1`) are
painted ignore_index first; then the other instances in order of decreasing pixel area
(ties by annotation id), each over the previous ones. A smaller object lying on a larger
one (a cup on a table) therefore stays visible, and labelled instances win over crowd
regions. Polygons, uncompressed and compressed RLE are all handled by pycocotools.

Each mask is rasterised on its first read and written as a PNG (8-bit, or 16-bit when ids
exceed 255) under `cache_dir/coco-<hash>`, where the hash covers the annotation file's
bytes and every setting that changes the masks; later epochs and runs read the PNG. The
default cache is `<root>/.segkit_cache/`, or `~/.cache/segkit/` (XDG_CACHE_HOME) when the
root is read-only. Files are written atomically, so several workers can fill it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segkit.config import DatasetConfig
from segkit.data.io import read_image, read_mask
from segkit.data.readers.base import DatasetOptions, SegmentationDataset
from segkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)
RULE_VERSION = 1  # bump when the drawing rule changes, so old caches are not reused


@dataclass
class CocoSchema(DatasetConfig, DatasetOptions):
    _target_: str = "segkit.data.readers.coco.CocoDataset"
    name: str = "coco"
    root: str = "???"
    image_dir: str = "{split}2017"  # relative to root; {split} is replaced
    annotations: dict[str, str] = field(  # split -> instance annotation file, relative to root
        default_factory=lambda: {
            "train": "annotations/instances_train2017.json",
            "val": "annotations/instances_val2017.json",
        }
    )
    categories: list[Any] | None = None  # subset of category names or ids (null = all), in class order
    cache_dir: str | None = None  # null = <root>/.segkit_cache, or ~/.cache/segkit when root is read-only
    num_classes: int = 81  # background + categories
    image_size: list[int] = field(default_factory=lambda: [512, 512])


class CocoDataset(SegmentationDataset):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        annotations: dict[str, str],
        image_dir: str = "{split}2017",
        categories: Sequence[Any] | None = None,
        cache_dir: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(split=split, **common)
        self.root = Path(root).expanduser()
        self.image_dir = self.root / image_dir.format(split=split)
        if split not in annotations:
            raise ConfigError("dataset.annotations", f"no annotation file for split '{split}'")
        self.annotation_file = self.root / annotations[split]
        raw, data = _load_json(self.annotation_file)
        selected = _select_categories(data.get("categories", []), categories, self.annotation_file)
        names = ["background"] + [c["name"] for c in selected]
        if len(names) != self.num_classes:
            raise ConfigError(
                "dataset.num_classes",
                f"{self.num_classes}, but {self.annotation_file.name} with dataset.categories gives "
                f"{len(names)} classes (background + {len(selected)} categories)",
            )
        if common.get("class_names") is None:
            self.class_names = names
        self.class_of = {int(c["id"]): i + 1 for i, c in enumerate(selected)}
        self.images = sorted(data.get("images", []), key=lambda img: img["id"])
        if not self.images:
            raise DataError(f"{self.annotation_file}: empty data set, no images listed")
        self.annotations: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in data.get("annotations", []):
            if ann.get("category_id") in self.class_of and ann.get("image_id") in self.annotations:
                self.annotations[ann["image_id"]].append(ann)
        settings = {"classes": sorted(self.class_of.items()), "ignore": self.ignore_index,
                    "rule": RULE_VERSION}
        digest = hashlib.sha256(raw + json.dumps(settings).encode()).hexdigest()[:16]
        self.cache_dir = _cache_dir(self.root, cache_dir, f"coco-{digest}")
        self.wide = max(self.num_classes - 1, self.ignore_index) > 255  # 16-bit PNG masks

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def describe(self, index: int) -> str:
        return str(self.image_path(index))

    def sample_files(self, index: int) -> dict[str, Path]:
        return {"image": self.image_path(index)}

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(self.image_path(index))
        info = self.images[index]
        cached = self.cache_dir / f"{info['id']}.png" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return image, read_mask(cached)
        mask = self.rasterize(index)
        if cached is not None:
            _write_png_atomic(cached, mask)
        return image, torch.from_numpy(mask.astype(np.int64))

    def rasterize(self, index: int) -> np.ndarray:
        """The semantic mask of one image, drawn by the rule in the module docstring."""
        info = self.images[index]
        height, width = int(info["height"]), int(info["width"])
        mask = np.zeros((height, width), dtype=np.uint16 if self.wide else np.uint8)
        drawn = []
        for ann in self.annotations[info["id"]]:
            rle = _to_rle(ann.get("segmentation"), height, width)
            if rle is None:
                continue
            area = int(mask_utils.area(rle))
            label = self.ignore_index if ann.get("iscrowd") else self.class_of[ann["category_id"]]
            drawn.append((0 if ann.get("iscrowd") else 1, -area, int(ann.get("id", 0)), label, rle))
        for *_, label, rle in sorted(drawn, key=lambda d: d[:3]):
            mask[_decode(rle)] = label
        return mask


def _load_json(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = path.read_bytes()
        return raw, json.loads(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found (check dataset.annotations)") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read annotations ({error})") from None


def _select_categories(
    categories: list[dict[str, Any]], wanted: Sequence[Any] | None, path: Path
) -> list[dict[str, Any]]:
    ordered = sorted(categories, key=lambda c: c["id"])
    if wanted is None:
        return ordered
    by_key = {str(c["name"]): c for c in ordered} | {str(c["id"]): c for c in ordered}
    unknown = [w for w in wanted if str(w) not in by_key]
    if unknown:
        raise ConfigError("dataset.categories", f"{unknown} are not category names or ids in {path.name}")
    return [by_key[str(w)] for w in wanted]


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    if not segmentation:
        return None
    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)) if polygons else None
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # compressed RLE


def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools 2.0 predates numpy 2's __array__(copy=) protocol
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _cache_dir(root: Path, configured: str | None, name: str) -> Path | None:
    """The first writable of: the configured dir, <root>/.segkit_cache, the user cache; None if none is."""
    if configured is not None:
        path = Path(configured).expanduser() / name
        if not _writable(path):
            raise ConfigError("dataset.cache_dir", f"{path} is not writable")
        return path
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segkit"
    for base in (root / ".segkit_cache", user_cache):
        if _writable(base / name):
            return base / name
    log.warning("%s: no writable mask cache (set dataset.cache_dir); rasterising on every read", root)
    return None


def _writable(directory: Path) -> bool:
    """Whether files can be written there, honouring read-only mode bits even for root."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    if not existing.stat().st_mode & write_bits or not os.access(existing, os.W_OK):
        return False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _write_png_atomic(path: Path, mask: np.ndarray) -> None:
    """Write to a temporary name and rename, so a concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        Image.fromarray(mask).save(tmp)
        os.replace(tmp, path)
    except OSError as error:
        log.warning("%s: cannot cache mask (%s)", path, error)
        tmp.unlink(missing_ok=True)
