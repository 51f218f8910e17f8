"""Recognise how a data set is laid out on disk and what its masks contain, for `segkit-init-config`.

Detection only looks at names and a sample of mask files; it proposes dataset keys, and the
config it leads to is then built and read like any other, so a wrong guess shows up at once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from segkit import registry
from segkit.data.readers.pairs import files_by_stem
from segkit.errors import DataError

# (image_dir, mask_dir, kind); "{split}" marks per-split folders.
SPLIT_TEMPLATES = [
    ("images/{split}", "masks/{split}", "folder"), ("images/{split}", "labels/{split}", "folder"),
    ("images/{split}", "annotations/{split}", "folder"), ("img/{split}", "ann/{split}", "folder"),
    ("{split}/images", "{split}/masks", "folder"), ("{split}/images", "{split}/labels", "folder"),
    ("{split}/image", "{split}/label", "folder"), ("{split}/img", "{split}/mask", "folder"),
    ("{split}", "{split}annot", "camvid"), ("{split}", "{split}_labels", "camvid"),
    ("{split}", "{split}_masks", "camvid"),
]
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "dataset"  # benchmark layouts take their preset's keys
FLAT_TEMPLATES = [
    ("images", "masks"), ("images", "labels"), ("images", "annotations"), ("image", "label"),
    ("image", "mask"), ("imgs", "masks"), ("img", "mask"),
]


@dataclass
class Layout:
    kind: str  # folder | camvid | voc | cityscapes | coco | ade20k | coco_stuff164k, or a registered format's
    schema: str  # the dataset format whose schema the config uses (registry.dataset_formats())
    root: Path
    settings: dict[str, Any] = field(default_factory=dict)  # dataset keys the layout decides
    images: list[Path] = field(default_factory=list)  # training images (for sizes)
    masks: list[Path] = field(default_factory=list)  # training masks (empty for coco)
    needs_split: bool = False  # one folder for everything: list files must be written
    notes: list[str] = field(default_factory=list)
    preset: bool = False  # a benchmark whose classes and id convention come from conf/dataset/<kind>.yaml


def detect_layout(root: Path) -> Layout:
    """The first layout that matches, checked from the most specific (coco) to flat folders; formats
    that installed packages register with a `detect` function come before the generic folders."""
    if not root.is_dir():
        raise DataError(f"{root}: directory not found")
    registered = [registry.load(part.detect) for part in registry.parts("dataset") if part.detect]
    for detector in (_ade20k, _coco_stuff, _coco, _cityscapes, _voc, *registered, _split_folders, _flat_folders):
        layout = detector(root)
        if layout is not None:
            return layout
    raise DataError(f"{root}: no known layout (folder, camvid-like, voc, cityscapes, coco, ade20k, coco_stuff164k)")


def _preset_layout(kind: str, root: Path, images: Path, masks: Path) -> Layout | None:
    """A benchmark layout whose class list and id convention are those of conf/dataset/<kind>.yaml."""
    pairs = _pairs(images, masks)
    if not pairs:
        return None
    preset = yaml.safe_load((PRESETS / f"{kind}.yaml").read_text())
    keys = ("image_dir", "mask_dir", "split_names", "reduce_zero_label", "id_mapping", "num_classes",
            "ignore_index", "image_size", "class_names")
    layout = Layout(kind, "folder", root, {key: preset[key] for key in keys if key in preset}, preset=True)
    layout.images, layout.masks = [i for i, _ in pairs], [m for _, m in pairs]
    layout.notes.append(f"{kind} layout: classes and label ids as conf/dataset/{kind}.yaml")
    return layout


def _ade20k(root: Path) -> Layout | None:
    for base in (root, root / "ADEChallengeData2016"):
        layout = _preset_layout("ade20k", base, base / "images" / "training", base / "annotations" / "training")
        if layout is not None:
            return layout
    return None


def _coco_stuff(root: Path) -> Layout | None:
    """stuffthingmaps_trainval2017 PNGs in annotations/train2017, next to images/train2017."""
    return _preset_layout("coco_stuff164k", root, root / "images" / "train2017", root / "annotations" / "train2017")


def _coco(root: Path) -> Layout | None:
    files = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    instances = [f for f in files if f.name.startswith("instances")] or files
    instances = [f for f in instances if _looks_like_coco(f)]
    if not instances:
        return None
    train = [f for f in instances if "train" in f.name] or instances
    val = [f for f in instances if "val" in f.name] or train
    layout = Layout("coco", "coco", root)
    layout.settings["annotations"] = {
        "train": str(train[0].relative_to(root)), "val": str(val[0].relative_to(root)),
    }
    if train[0] == val[0]:
        layout.notes.append(f"only {train[0].name}: train and val use the same images (no held-out set)")
    candidates = ("images", "{split}2017", "{split}")
    image_dir = next((d for d in candidates if (root / d.format(split="train")).is_dir()), None)
    if image_dir is None:
        raise DataError(f"{root}: COCO annotations found but no images/ or train2017/ folder")
    layout.settings["image_dir"] = image_dir
    layout.images = _images(root / image_dir.format(split="train"))
    data = json.loads(train[0].read_text())
    layout.settings["num_classes"] = len(data.get("categories", [])) + 1
    return layout


def _looks_like_coco(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    return b'"images"' in head or b'"categories"' in head or b'"annotations"' in head


def _cityscapes(root: Path) -> Layout | None:
    if not ((root / "leftImg8bit" / "train").is_dir() and (root / "gtFine" / "train").is_dir()):
        return None
    layout = Layout("cityscapes", "cityscapes", root)
    layout.images = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    label_ids = next((root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"), None)
    train_ids = next((root / "gtFine" / "train").glob("*/*_gtFine_labelTrainIds.png"), None)
    layout.settings["labels"] = "train_ids" if train_ids and not label_ids else "label_ids"
    if train_ids and not label_ids:
        layout.notes.append("only *_labelTrainIds.png label files: labels: train_ids")
    return layout


def _voc(root: Path) -> Layout | None:
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir() and (
            base / "ImageSets" / "Segmentation" / "train.txt"
        ).is_file():
            layout = Layout("voc", "voc", base)
            layout.images = _images(base / "JPEGImages")
            layout.masks = _images(base / "SegmentationClass")
            return layout
    return None


def _split_folders(root: Path) -> Layout | None:
    for image_dir, mask_dir, kind in SPLIT_TEMPLATES:
        images, masks = root / image_dir.format(split="train"), root / mask_dir.format(split="train")
        pairs = _pairs(images, masks)
        if not pairs:
            continue
        layout = Layout(kind, "folder", root, {"image_dir": image_dir, "mask_dir": mask_dir})
        layout.images, layout.masks = [i for i, _ in pairs], [m for _, m in pairs]
        if not _pairs(root / image_dir.format(split="val"), root / mask_dir.format(split="val")):
            # Only a training folder: split it with list files.
            layout.settings = {key: template.format(split="train")
                               for key, template in (("image_dir", image_dir), ("mask_dir", mask_dir))}
            layout.needs_split = True
        return layout
    return None


def _flat_folders(root: Path) -> Layout | None:
    for image_dir, mask_dir in FLAT_TEMPLATES:
        pairs = _pairs(root / image_dir, root / mask_dir)
        if pairs:
            layout = Layout("folder", "folder", root, {"image_dir": image_dir, "mask_dir": mask_dir})
            layout.images, layout.masks = [i for i, _ in pairs], [m for _, m in pairs]
            layout.needs_split = True
            return layout
    return None


def _images(directory: Path) -> list[Path]:
    return sorted(files_by_stem(directory)[0].values()) if directory.is_dir() else []


def _pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    if not (images.is_dir() and masks.is_dir()) or images == masks:
        return []
    image_files, mask_files = files_by_stem(images)[0], files_by_stem(masks)[0]
    return [(image_files[s], mask_files[s]) for s in sorted(image_files) if s in mask_files]


@dataclass
class MaskSummary:
    """What a sample of masks says: raw values (or colours) and how often each occurs."""

    values: Counter = field(default_factory=Counter)  # value -> pixels (single-channel masks)
    colors: Counter = field(default_factory=Counter)  # (r, g, b) -> pixels (RGB masks)
    read: int = 0


def summarize_masks(paths: Sequence[Path]) -> MaskSummary:
    summary = MaskSummary()
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.mode in ("RGB", "RGBA")
                array = np.asarray(img.convert("RGB") if rgb else img)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read mask ({error})") from None
        summary.read += 1
        if rgb:
            colors, counts = np.unique(array.reshape(-1, 3), axis=0, return_counts=True)
            for color, pixels in zip(colors, counts, strict=True):
                summary.colors[tuple(int(v) for v in color)] += int(pixels)
        else:
            values, counts = np.unique(array, return_counts=True)
            summary.values.update({int(v): int(n) for v, n in zip(values, counts, strict=True)})
    return summary


def label_settings(summary: MaskSummary, ignore_index: int = 255) -> tuple[dict[str, Any], list[str]]:
    """num_classes / remap / colors / ignore_index proposed from the mask values, and why."""
    notes: list[str] = []
    if summary.colors:
        colors = sorted(summary.colors, key=lambda c: (c != (0, 0, 0), c))
        if len(colors) > 64:
            raise DataError(f"{len(colors)} colours in RGB masks: not a label image (JPEG masks?)")
        notes.append(f"RGB masks: {len(colors)} colours -> classes 0..{len(colors) - 1} (black first)")
        table = [list(c) for c in colors]
        return {"num_classes": len(colors), "colors": table, "ignore_index": ignore_index}, notes
    values = sorted(summary.values)
    if values == [0, 255] or values == [255]:
        notes.append("binary masks 0/255: 255 -> class 1")
        return {"num_classes": 2, "remap": {255: 1}, "ignore_index": ignore_index}, notes
    classes = [v for v in values if v != ignore_index]
    if ignore_index in values:
        notes.append(f"value {ignore_index} taken as ignore_index (void / borders)")
    if not classes:
        raise DataError("the masks contain no class values")
    if max(classes) + 1 <= max(2 * len(classes), 2):
        if max(classes) + 1 > len(classes):
            unseen = sorted(set(range(max(classes) + 1)) - set(classes))
            notes.append(f"ids {unseen} never seen in the masks read")
        settings: dict[str, Any] = {"num_classes": max(classes) + 1}
    else:
        remap = {v: i for i, v in enumerate(classes) if v != i}
        notes.append(f"sparse ids {classes[:10]} remapped to 0..{len(classes) - 1}")
        settings = {"num_classes": len(classes), "remap": remap}
    if settings["num_classes"] > ignore_index:
        raise DataError(f"{settings['num_classes']} classes: ignore_index {ignore_index} would be a class")
    settings["ignore_index"] = ignore_index
    notes.append("if one value means void/unlabelled, add it to remap as {value: 255}")
    return settings, notes


def image_sizes(paths: Sequence[Path]) -> Counter:
    """(height, width) -> count, from file headers only."""
    sizes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes[(img.height, img.width)] += 1
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read image ({error})") from None
    return sizes


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """At most `count` items, evenly spaced, so a sample covers the whole (sorted) list."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]
