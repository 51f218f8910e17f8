"""Cityscapes fine: leftImg8bit/{split}/{city}/X_leftImg8bit.png <-> gtFine/.../X_gtFine_labelIds.png.

`labels: label_ids` (default) reads the *_labelIds.png files of the download, which hold the 34
full label ids 0..33; training uses the 19 evaluated classes ("train ids"). A lookup table maps
each label id to its train id and the other label ids (void classes) to ignore_index, as the
official cityscapesScripts do. A value that is not a label id (34 and above, at any bit depth)
is outside the format's table: refused, or ignored with dataset.unknown_labels=ignore.
`labels: train_ids` reads the *_labelTrainIds.png files that cityscapesScripts'
createTrainIdLabelImgs writes (and MMSegmentation's converter): 0..18 already, 255 ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segkit.data.readers.base import ValueTable
from segkit.data.readers.pairs import PairedFiles, require_dir, require_root
from segkit.data.readers.schemas import CityscapesSchema as Schema
from segkit.errors import ConfigError

# label id -> train id, for the 19 evaluated classes (cityscapesScripts helpers/labels.py).
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_IDS = 34  # label ids 0..33 (cityscapesScripts helpers/labels.py; license plate, -1, is not drawn)
LABEL_FILES = {"label_ids": "_gtFine_labelIds.png", "train_ids": "_gtFine_labelTrainIds.png"}
CITYSCAPES_COLORS = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
]


class CityscapesDataset(PairedFiles):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        image_dir: str = Schema.image_dir,  # defaults: the schema's, written once there
        mask_dir: str = Schema.mask_dir,
        image_suffix: str = Schema.image_suffix,
        labels: str = Schema.labels,
        mask_suffix: str | None = Schema.mask_suffix,
        **common: Any,
    ) -> None:
        if labels not in LABEL_FILES:
            raise ConfigError("dataset.labels", f"must be label_ids or train_ids, got {labels!r}")
        mask_suffix = mask_suffix or LABEL_FILES[labels]
        super().__init__(split=split, **common)
        ignore, last = self.ignore_index, self.num_classes - 1
        if labels == "label_ids":
            self.id_table = {label: LABEL_TO_TRAIN_ID.get(label, ignore) for label in range(LABEL_IDS)}
            self.value_table = ValueTable(f"the Cityscapes label ids 0..{LABEL_IDS - 1}", "the file is wrong",
                                          "after the label id -> train id table (void ids are ignored)")
        else:
            self.value_table = ValueTable(f"the Cityscapes train ids 0..{last} and {ignore}", "the file is wrong "
                                          "(a file of label ids 0..33 is read with dataset.labels=label_ids)")
        self.root = Path(root).expanduser()
        self.image_dir = self.root / image_dir.format(split=split)
        self.mask_dir = self.root / mask_dir.format(split=split)
        self.colors = CITYSCAPES_COLORS[: self.num_classes]
        require_root(self.root, "leftImg8bit/ and gtFine/")
        require_dir(self.image_dir, "image_dir")
        require_dir(self.mask_dir, "mask_dir")
        pairs, problems = [], []
        images = sorted(self.image_dir.glob(f"*/*{image_suffix}"))
        for image in images:
            prefix = image.name[: -len(image_suffix)]
            mask = self.mask_dir / image.parent.name / f"{prefix}{mask_suffix}"
            if mask.is_file():
                pairs.append((image, mask))
            else:
                problems.append(f"{image}: missing mask {mask.relative_to(self.root)}")
        expected = {mask for _, mask in pairs}
        self.unused_files = [self.finding(f"{m}: mask without an image, no {m.parent.name}/*{image_suffix} in "
                                          f"{self.image_dir}; not used", "mask without image")
                             for m in sorted(self.mask_dir.glob(f"*/*{mask_suffix}")) if m not in expected]
        self.set_pairs(pairs, problems, self.image_dir)
