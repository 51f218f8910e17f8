"""Images and masks in two directories, matched by file stem (`img1.jpg` <-> `img1.png`).

Options on top of the two directories:
- `split_names`: the folder name of each split where it is not train / val (ADE20K: training, validation).
- `reduce_zero_label` (ADE20K) and `id_mapping: coco_stuff_171` (COCO-Stuff 164k): benchmark id
  conventions, see segkit/data/readers/conventions.py; conf/dataset/{ade20k,coco_stuff164k}.yaml use them.
- `split_file`: a list of stems per split (e.g. `splits/{split}.txt` or `splits/fold{fold}/{split}.txt`,
  written by `segkit-split`), when one directory holds every split.
- `dataset.json` in the root: `{"class_names": [...], "colors": [[r, g, b], ...]}`, used where the
  config leaves `class_names` / `colors` unset.
- `colors`: colour table for RGB masks (colour i -> class i, `ignore_colors` -> ignore_index).
  Single-channel masks (8/16-bit PNG or TIFF) and palette PNGs are read as class ids as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from segkit.data.io import (
    IMAGE_SUFFIXES,
    ColorTable,
    read_color_mask,
    read_mask,
    read_rgb_mask,
    read_stem_list,
    require_file,
)
from segkit.data.readers.base import ValueTable
from segkit.data.readers.pairs import PairedFiles, duplicate_problems, files_by_stem, require_dir, require_root
from segkit.data.readers.schemas import FolderSchema as Schema
from segkit.errors import ConfigError, DataError


class FolderDataset(PairedFiles):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        image_dir: str = Schema.image_dir,  # defaults: the schema's, written once there (None: an empty mapping)
        mask_dir: str = Schema.mask_dir,
        split_names: Mapping[str, str] | None = None,
        remap: Mapping[int, int] | None = None,
        split_file: str | None = Schema.split_file,
        fold: int | None = Schema.fold,
        dataset_json: str | None = Schema.dataset_json,
        colors: Sequence[Sequence[int]] | None = Schema.colors,
        ignore_colors: Sequence[Sequence[int]] = (),
        **common: Any,
    ) -> None:
        super().__init__(split=split, remap=remap, **common)
        self.root = Path(root).expanduser()
        folder = (split_names or {}).get(split, split)
        self.image_dir = self.root / image_dir.format(split=folder)
        self.mask_dir = self.root / mask_dir.format(split=folder)
        info = self._read_dataset_json(dataset_json)
        if common.get("class_names") is None and info.get("class_names"):
            self.class_names = list(info["class_names"])
        colors = colors if colors is not None else info.get("colors")
        self.colors = [list(map(int, c)) for c in colors] if colors else None
        if self.colors is not None and len(self.colors) != self.num_classes:
            raise ConfigError(
                "dataset.colors", f"has {len(self.colors)} colours but dataset.num_classes={self.num_classes}"
            )
        self.color_table = ColorTable(self.colors, self.ignore_index, ignore_colors) if self.colors else None
        if self.color_table is not None:
            # A colour-coded set: its values are colours; a file holding class ids instead is wrong.
            self.value_table = ValueTable(self.value_table.values, "the file is wrong (this data set's masks are "
                                          "RGB colours listed in dataset.colors)", self.value_table.after)
            self.color_values = ValueTable("dataset.colors / dataset.ignore_colors", "the file is wrong, or list the "
                                           "colour in dataset.colors or dataset.ignore_colors", colors=True)
        self.split_path = self._split_path(split_file, fold)
        self._match_pairs()

    rgb_fix = "dataset.colors (the RGB colour of each class id) for colour-coded masks, or the file is wrong"

    def read_mask(self, path: Path) -> torch.Tensor:
        return read_color_mask(path, self.color_table, self.rgb_fix)

    def read_native_mask(self, index: int) -> torch.Tensor:
        """RGB masks through the colour table (unknown colours settled like unknown values), the rest as ids."""
        path = self.pairs[index][1]
        if self.color_table is None:
            return super().read_native_mask(index)
        self.note_jpeg(index, path)
        rgb = read_rgb_mask(path)
        if rgb is None:
            raw = read_mask(path, self.rgb_fix)
            return self.settle(index, raw, *self.map_ids(raw))
        keys, ids, unknown = self.color_table.translate(rgb)
        ids, unmapped = self.map_ids(ids)
        return self.settle(index, keys, ids, unknown | unmapped, self.color_values)

    def _read_dataset_json(self, name: str | None) -> dict[str, Any]:
        """class_names / colors from <root>/dataset.json, each checked: one line naming the file and key."""
        path = self.root / name if name else None
        if path is None or not path.is_file():
            return {}
        require_file(path, "dataset description")  # a zero-byte file is called empty
        try:
            info = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DataError(f"{path}: cannot read dataset description ({error})") from None
        if not isinstance(info, dict):
            raise DataError(f"{path}: expected an object like {{\"class_names\": [...], \"colors\": [...]}}, "
                            f"got a {type(info).__name__}")
        names, colors = info.get("class_names"), info.get("colors")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
                raise DataError(f"{path}: class_names must be a list of non-empty names, got {names!r:.80}")
            if len(names) != self.num_classes:
                raise DataError(f"{path}: {len(names)} class_names but dataset.num_classes={self.num_classes}")
        if colors is not None:
            rgb = isinstance(colors, list) and all(
                isinstance(c, list) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)
                for c in colors)
            if not rgb:
                raise DataError(f"{path}: colors must be a list of [r, g, b] integer triples (0..255), "
                                f"got {colors!r:.80}")
        return info

    def _split_path(self, split_file: str | None, fold: int | None) -> Path | None:
        if split_file is None:
            return None
        if "{fold}" in split_file and fold is None:
            raise ConfigError("dataset.fold", f"split_file {split_file!r} has {{fold}}; set a fold 0..k-1")
        path = self.root / split_file.format(split=self.split, fold=fold)
        if not path.is_file():
            raise DataError(f"{path}: split list not found (check dataset.split_file and dataset.fold)")
        return path

    def _match_pairs(self) -> None:
        require_root(self.root, "images and masks")
        require_dir(self.image_dir, "image_dir")
        require_dir(self.mask_dir, "mask_dir")
        images, image_duplicates = files_by_stem(self.image_dir)
        masks, mask_duplicates = files_by_stem(self.mask_dir)
        problems = duplicate_problems(image_duplicates) + duplicate_problems(mask_duplicates)
        duplicated = set(image_duplicates) | set(mask_duplicates)
        if self.split_path is not None:
            stems = read_stem_list(self.split_path)
        else:
            stems = sorted(images)
            self.unused_files = [self.finding(f"{masks[s]}: mask without an image, no '{s}.*' in {self.image_dir}; "
                                              "not used", "mask without image")
                                 for s in sorted(set(masks) - set(images) - duplicated)]
        pairs = []
        for stem in stems:
            if stem in duplicated:
                continue
            if stem not in images:
                where = masks.get(stem, self.split_path)
                hint = ("; list stems without the extension" if Path(stem).suffix.lower() in IMAGE_SUFFIXES
                        and Path(stem).stem in images else "")
                problems.append(f"{where}: missing image, no '{stem}.*' in {self.image_dir}{hint}")
            elif stem not in masks:
                problems.append(f"{images[stem]}: missing mask, no '{stem}.*' in {self.mask_dir}")
            else:
                pairs.append((images[stem], masks[stem]))
        self.set_pairs(pairs, problems, self.image_dir)
