"""COCO instance annotations rasterised to semantic masks (pycocotools), cached as PNG files.

Class ids: background is 0 and the selected categories (all, or `categories` by name or
id, in that order) are 1..N in order; the category names become the class names. Objects
of categories left out of the subset are background.

Drawing rule, so that every run makes the same mask: crowd regions (`iscrowd: 1`) are
painted ignore_index first; then the other instances in order of decreasing pixel area
(ties by annotation id), each over the previous ones. A smaller object lying on a larger
one (a cup on a table) therefore stays visible, and labelled instances win over crowd
regions. `crowd: class` paints crowd regions with their category instead, for files whose
`iscrowd: 1` RLE masks are objects (some tools, CVAT among them, export brush masks that way).
Polygons, uncompressed and compressed RLE are all handled by pycocotools.

Every field is checked where it is read (segkit/data/readers/coco_format.py says what is
accepted): a defect is one line naming the annotation file, the image, the annotation id and
the fix. With `on_error=raise` the first stops the run; with `on_error=skip` the affected image
(or an annotation that points to no image) is left out, logged and counted in `left_out`.
`segkit-check-data` lists every defect of the file at once.

Each mask is rasterised on its first read and written as a PNG (8-bit, or 16-bit when ids
exceed 255) under `cache_dir/coco-<hash>`, where the hash covers the annotation file's
bytes and every setting that changes the masks; later epochs and runs read the PNG. The
default cache is the user cache directory (`$XDG_CACHE_HOME/segkit` or `~/.cache/segkit`,
segkit.data.io.user_cache_dir): nothing is written into the data set's directory unless
`dataset.cache_dir` points there. Files are written atomically, so several workers can fill it at once.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segkit import safe_files
from segkit.data.io import read_image, read_mask, user_cache_dir
from segkit.data.readers.base import Problem, ProblemsError, SegmentationDataset, plural
from segkit.data.readers.coco_format import read_coco, segmentation_problems
from segkit.data.readers.schemas import CocoSchema as Schema
from segkit.errors import ConfigError, DataError, SegkitError

log = logging.getLogger(__name__)
RULE_VERSION = 2  # bump when the drawing rule or its checks change, so old caches are not reused


class CocoDataset(SegmentationDataset):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        annotations: dict[str, str],
        image_dir: str = Schema.image_dir,  # defaults: the schema's, written once there
        categories: Sequence[Any] | None = Schema.categories,
        crowd: str = Schema.crowd,
        cache_dir: str | None = Schema.cache_dir,
        **common: Any,
    ) -> None:
        super().__init__(split=split, **common)
        if crowd not in ("ignore", "class"):
            raise ConfigError("dataset.crowd", f"must be ignore or class, got {crowd!r}")
        self.crowd_label = crowd
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data set root not found; fix: dataset.root (the directory holding the "
                            "images and annotations)")
        self.image_dir = self.root / image_dir.format(split=split)
        if split not in annotations:
            raise ConfigError("dataset.annotations", f"no annotation file for split '{split}'")
        self.annotation_file = self.root / annotations[split]
        raw, self.coco = read_coco(self.annotation_file, self.image_dir)
        if self.coco.fatal:  # the file or its categories: no image can be read
            raise ProblemsError(self.coco.fatal)
        selected = _select_categories(self.coco.categories, categories, self.annotation_file)
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
        self.report_layout(self.coco.problems)
        self.left_out = {"images": self.coco.left_out_images, "annotations": self.coco.left_out_annotations}
        if any(self.left_out.values()):
            log.warning("dataset.on_error=skip: %s: left out %s and %s (listed above)", self.annotation_file,
                        plural(self.left_out["images"], "image"), plural(self.left_out["annotations"], "annotation"))
        self.images = self.coco.images
        # Objects of categories left out of dataset.categories are background: not drawn, not checked.
        self.annotations = {image_id: [a for a in anns if a["category_id"] in self.class_of]
                            for image_id, anns in self.coco.annotations.items()}
        if not self.images:
            last = Problem(f"{self.annotation_file}: no image left to read; fix: the problems listed with it",
                           "no image left")
            raise ProblemsError([*self.coco.problems, last])
        settings = {"classes": sorted(self.class_of.items()), "ignore": self.ignore_index,
                    "rule": RULE_VERSION, "crowd": crowd}
        digest = hashlib.sha256(raw + json.dumps(settings).encode()).hexdigest()[:16]
        self.cache_dir = _cache_dir(self.root, cache_dir, f"coco-{digest}")
        self.wide = max(self.num_classes - 1, self.ignore_index) > 255  # 16-bit PNG masks
        self.leave_out_unlabelled()

    def keep_samples(self, indices: Sequence[int]) -> None:
        self.images = [self.images[i] for i in indices]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def describe(self, index: int) -> str:
        return str(self.image_path(index))

    def sample_files(self, index: int) -> dict[str, Path]:
        return {"image": self.image_path(index)}

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, info = self.image_path(index), self.images[index]
        if not path.is_file():
            raise DataError(f"{self.annotation_file}: image {path} (id {info['id']}) not found; "
                            "fix: check its file_name and dataset.image_dir")
        image = read_image(path)
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise DataError(self._size_problem(index, tuple(image.shape[-2:])))
        return image, self.read_native_mask(index)

    def read_native_mask(self, index: int) -> torch.Tensor:
        """The rasterised mask, from the PNG cache when it holds it (the image is not decoded)."""
        cached = self.cache_dir / f"{self.images[index]['id']}.png" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return read_mask(cached)
        mask = self.rasterize(index)
        if cached is not None:
            _write_png_atomic(cached, mask)
        return torch.from_numpy(mask.astype(np.int64))

    def label_problems(self, index: int) -> list[Problem]:
        """The image header's size and every annotation's geometry (the image is not decoded)."""
        problems = []
        path = self.image_path(index)
        if path.is_file():
            try:
                with Image.open(path) as img:
                    size = (img.height, img.width)
            except (OSError, ValueError, Image.DecompressionBombError):
                size = None  # reading reports it
            if size is not None and size != (self.images[index]["height"], self.images[index]["width"]):
                problems.append(Problem(self._size_problem(index, size), "image size mismatch"))
        info = self.images[index]
        problems += segmentation_problems(self.coco, info, self.annotations[info["id"]])[1]
        return problems

    def _size_problem(self, index: int, size: tuple[int, ...]) -> str:
        info = self.images[index]
        return (f"{self.annotation_file}: image {self.image_path(index)} (id {info['id']}) is "
                f"{size[0]}x{size[1]} (height x width), the annotation file says {info['height']}x{info['width']}; "
                "fix: correct its height/width (or use the image that was labelled)")

    def rasterize(self, index: int) -> np.ndarray:
        """The semantic mask of one image, drawn by the rule in the module docstring."""
        info = self.images[index]
        shapes, problems = segmentation_problems(self.coco, info, self.annotations[info["id"]])
        errors = [p for p in problems if not p.warning]
        if errors:
            raise ProblemsError(errors)
        for problem in problems:
            log.warning("%s", problem)
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint16 if self.wide else np.uint8)
        drawn = []
        for ann, rle in shapes:
            area = int(mask_utils.area(rle))
            crowd = bool(ann.get("iscrowd", 0))
            ignored = crowd and self.crowd_label == "ignore"
            label = self.ignore_index if ignored else self.class_of[ann["category_id"]]
            drawn.append((0 if crowd else 1, -area, ann["id"], label, rle))
        for *_, label, rle in sorted(drawn, key=lambda d: d[:3]):
            mask[_decode(rle)] = label
        return mask


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


def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools 2.0 predates numpy 2's __array__(copy=) protocol
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _cache_dir(root: Path, configured: str | None, name: str) -> Path | None:
    """dataset.cache_dir when set (refused if not writable), else the user cache; None if that is not writable.

    The data set's own directory is never chosen unless dataset.cache_dir names it: data sets often
    live on shared or versioned folders.
    """
    if configured is not None:
        path = Path(configured).expanduser() / name
        if not _writable(path):
            raise ConfigError("dataset.cache_dir", f"{path} is not writable")
        return path
    path = user_cache_dir() / name
    if _writable(path):
        return path
    log.warning("%s: the user cache directory is not writable (set dataset.cache_dir); rasterising %s masks on "
                "every read", path.parent, root)
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
    """A new file renamed over `path` (never through a link), so a concurrent reader never sees half a file."""
    try:
        safe_files.write_with(path, lambda buffer: Image.fromarray(mask).save(buffer, format="PNG"))
    except (OSError, SegkitError) as error:
        log.warning("%s: cannot cache mask (%s)", path, error)
