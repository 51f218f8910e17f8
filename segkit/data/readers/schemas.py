"""What each reader's config node may hold: its keys, their types and defaults.

Hydra composes `dataset=<name>` onto these schemas (registered by segkit.cli.common.register_configs),
so a misspelt key or a wrong type fails with the key named. They live apart from the readers and
import no torch, so that composing a config (`--help`, `--cfg job`, a config error) answers at once;
each schema's `_target_` names the reader class that takes its keys as keyword arguments.

A format is registered once, on its schema (`@dataset_format(name)`, segkit.registry): that gives
Hydra its `dataset/<name>_schema` node, the trust allowlist its reader, segkit-init-config its schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segkit.config import DatasetConfig
from segkit.registry import dataset_format

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]


@dataclass
class DatasetOptions:
    """The options SegmentationDataset (readers/base.py) implements for every reader; each schema mixes them in."""

    on_error: str = "raise"  # raise | skip: replace a sample that fails to read by the next readable one
    # false | true: keep decoded samples in memory (each DataLoader worker holds its own copy) |
    # device: the trainer decodes the split once and keeps it on the training device (no DataLoader)
    cache: Any = False
    gpu_decode: bool = False  # with cache=device on CUDA: decode JPEGs with nvjpeg while filling the cache
    # error | ignore: mask values outside the format's value table stop training (error, one line naming the
    # file, the values and their pixel counts) or become ignore_index, each file logged and counted (ignore)
    unknown_labels: str = "error"
    # true: read every mask when the data set is built and leave out those with no labelled pixel
    # (after the format's conventions, e.g. an ADE20K mask of zeros; remembered in the user cache by file size
    # and time, so later runs read only changed masks); false: they are logged as they are read
    skip_unlabelled: bool = False


@dataset_format("synthetic")
@dataclass
class SyntheticSchema(DatasetConfig, DatasetOptions):
    """The synthetic fields plus the base-class options (on_error, cache)."""

    _target_: str = "segkit.data.readers.synthetic.SyntheticShapes"
    name: str = "synthetic"
    num_classes: int = 4
    train_size: int = 256
    val_size: int = 64
    max_shapes: int = 4
    seed: int = 0


@dataset_format("folder")
@dataclass
class FolderSchema(DatasetConfig, DatasetOptions):
    _target_: str = "segkit.data.readers.folder.FolderDataset"
    root: str = "???"
    image_dir: str = "images/{split}"  # `{split}` is replaced by train / val / test (or its split_names entry)
    mask_dir: str = "masks/{split}"
    split_names: dict[str, str] = field(default_factory=dict)  # folder name of a split, e.g. {train: training}
    remap: dict[int, int] = field(default_factory=dict)  # mask value -> class id (or ignore_index)
    reduce_zero_label: bool = False  # ADE20K: 0 ("other") -> ignore_index, every other id - 1 (as MMSeg)
    id_mapping: str | None = None  # a published id mapping before remap: coco_stuff_171 (COCO-Stuff 164k PNGs)
    split_file: str | None = None  # stems of each split, relative to root; may use {split} and {fold}
    fold: int | None = None  # fills {fold} in split_file (k-fold lists from segkit-split)
    dataset_json: str | None = "dataset.json"  # class names/colors file in root, used if present
    colors: list[list[int]] | None = None  # RGB mask colour of each class id
    ignore_colors: list[list[int]] = field(default_factory=list)  # RGB colours mapped to ignore_index


@dataset_format("voc")
@dataclass
class VocSchema(DatasetConfig, DatasetOptions):
    _target_: str = "segkit.data.readers.voc.VocDataset"
    name: str = "voc"
    root: str = "???"  # .../VOCdevkit/VOC2012
    image_dir: str = "JPEGImages"
    mask_dir: str = "SegmentationClass"
    split_dir: str = "ImageSets/Segmentation"  # {split}.txt: one image id per line
    num_classes: int = 21
    class_names: list[str] | None = field(default_factory=lambda: list(VOC_CLASSES))
    remap: dict[int, int] = field(default_factory=dict)


@dataset_format("cityscapes")
@dataclass
class CityscapesSchema(DatasetConfig, DatasetOptions):
    _target_: str = "segkit.data.readers.cityscapes.CityscapesDataset"
    name: str = "cityscapes"
    root: str = "???"  # the directory holding leftImg8bit/ and gtFine/
    image_dir: str = "leftImg8bit/{split}"
    mask_dir: str = "gtFine/{split}"
    image_suffix: str = "_leftImg8bit.png"
    labels: str = "label_ids"  # label_ids (*_labelIds.png, mapped to train ids) | train_ids (*_labelTrainIds.png)
    mask_suffix: str | None = None  # null = the files of `labels`
    num_classes: int = 19
    class_names: list[str] | None = field(default_factory=lambda: list(CITYSCAPES_CLASSES))
    image_size: list[int] = field(default_factory=lambda: [512, 1024])


@dataset_format("coco")
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
    crowd: str = "ignore"  # iscrowd regions: ignore | class (tools that export brush masks as iscrowd RLE)
    cache_dir: str | None = None  # null = the user cache ($XDG_CACHE_HOME/segkit or ~/.cache/segkit), never root
    num_classes: int = 81  # background + categories
    image_size: list[int] = field(default_factory=lambda: [512, 512])
