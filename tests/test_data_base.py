"""The dataset contract: stem matching, remaps, letterboxing with ignore, errors naming files."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from segkit.data.geometry import letterbox
from segkit.data.readers.folder import FolderDataset
from segkit.data.readers.synthetic import SyntheticShapes
from segkit.errors import DataError

from .conftest import write_folder_dataset

COMMON: dict[str, Any] = {"name": "t", "num_classes": 3, "ignore_index": 255, "image_size": (40, 48)}


def test_letterbox_pads_masks_with_ignore_and_resizes_nearest():
    image = torch.randint(0, 255, (3, 20, 40), dtype=torch.uint8)
    mask = torch.randint(0, 3, (20, 40))
    out_image, out_mask = letterbox(image, mask, (32, 32), 255)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert (out_mask[16:] == 255).all() and (out_image[:, 16:] == 0).all()
    assert set(out_mask[:16].unique().tolist()) <= {0, 1, 2}


def test_folder_matches_by_stem_and_remaps(tmp_path):
    write_folder_dataset(tmp_path, mask_values=[0, 255, 0])
    dataset = FolderDataset(split="train", root=str(tmp_path), remap={255: 1}, **{**COMMON, "num_classes": 2})
    assert len(dataset) == 4
    _, mask = dataset[0]
    assert set(mask.unique().tolist()) == {0, 1}


def test_mask_value_outside_classes_names_the_file(tmp_path):
    write_folder_dataset(tmp_path, mask_values=[0, 7, 1])
    dataset = FolderDataset(split="train", root=str(tmp_path), **COMMON)
    with pytest.raises(DataError, match=r"img_000\.png: values outside the class ids 0\.\.2 and ignore_index 255: 7 "):
        dataset[0]


def test_missing_mask_names_the_image(tmp_path):
    write_folder_dataset(tmp_path)
    (tmp_path / "masks/train/img_002.png").unlink()
    with pytest.raises(DataError, match=r"img_002\.jpg: .*mask"):
        FolderDataset(split="train", root=str(tmp_path), **COMMON)


def test_synthetic_is_deterministic_and_split_dependent():
    a = SyntheticShapes(split="train", **{**COMMON, "num_classes": 4, "image_size": (32, 32)})
    b = SyntheticShapes(split="train", **{**COMMON, "num_classes": 4, "image_size": (32, 32)})
    v = SyntheticShapes(split="val", **{**COMMON, "num_classes": 4, "image_size": (32, 32)})
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(a[3][1], b[3][1])
    assert not torch.equal(a[3][0], v[3][0])
