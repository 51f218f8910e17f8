"""Every supported layout read correctly and trained for one step, from tiny data sets written here.

The `write_*` functions build each layout in a temporary folder; test_check_data and
test_split use them too.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from segkit.cli import init_config
from segkit.data.io import read_stem_list
from segkit.data.loading import build_dataset
from segkit.data.readers.coco import CocoDataset
from segkit.data.readers.conventions import coco_stuff_171, reduce_zero_label
from segkit.data.readers.voc import voc_colormap
from segkit.engine.trainer import fit
from segkit.errors import ConfigError, DataError
from segkit.tools.layout import detect_layout

from .conftest import SHARED_DATA, TINY, paired

SIZE = (40, 48)  # height, width of every generated sample
# TINY without the synthetic-only keys, plus one optimizer step.
TINY_DATA = [o for o in TINY if not o.startswith(("dataset.train_size", "dataset.val_size"))]
ONE_STEP = [*TINY_DATA, "trainer.max_steps=1"]



@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Caches default to the user cache directory: here a temporary one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def random_image(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    return rng.integers(0, 255, (*size, 3), dtype=np.uint8)


def label_map(values: list[int], size: tuple[int, int] = SIZE, dtype=np.uint8) -> np.ndarray:
    """values[0] everywhere, values[1] on the left half, values[2] in a 10x10 square."""
    mask = np.full(size, values[0], dtype=dtype)
    mask[:, : size[1] // 2] = values[1 % len(values)]
    mask[5:15, 5:15] = values[2 % len(values)]
    return mask


def write_split_folder(root: Path, count: int = 6, mask_format: str = "png") -> Path:
    """images/ + masks/ holding every sample, and splits/{train,val}.txt lists."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = [f"s{i:02d}" for i in range(count)]
    for stem in stems:
        Image.fromarray(random_image(rng)).save(root / "images" / f"{stem}.jpg")
        if mask_format == "tiff16":
            Image.fromarray(label_map([0, 1000, 2000], dtype=np.uint16)).save(root / "masks" / f"{stem}.tif")
        elif mask_format == "palette":
            mask = Image.fromarray(label_map([0, 1, 2]), mode="L").convert("P")
            mask.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (253 * 3))
            mask.save(root / "masks" / f"{stem}.png")
        else:
            Image.fromarray(label_map([0, 1, 2])).save(root / "masks" / f"{stem}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (root / "splits" / "val.txt").write_text("# held out\n" + "\n".join(stems[4:]) + "\n")
    return root


COLORS = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]


def write_rgb_folder(root: Path, count: int = 4) -> Path:
    """images/{split} + RGB colour-coded masks/{split}, with dataset.json naming classes and colours."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            ids = label_map([0, 1, 2])
            Image.fromarray(random_image(rng)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(np.array(COLORS, dtype=np.uint8)[ids]).save(root / "masks" / split / f"{i}.png")
    (root / "dataset.json").write_text(json.dumps({"class_names": ["bg", "red", "green"], "colors": COLORS}))
    return root


def write_voc(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(3)
    for directory in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / directory).mkdir(parents=True)
    palette = [v for color in voc_colormap(256) for v in color]
    for split in ("train", "val"):
        stems = [f"2007_{split}{i:03d}" for i in range(count)]
        for stem in stems:
            Image.fromarray(random_image(rng)).save(root / "JPEGImages" / f"{stem}.jpg")
            mask = label_map([0, 15, 7])
            mask[20, :] = 255  # an object border
            png = Image.fromarray(mask, mode="L").convert("P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{stem}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def write_cityscapes(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(4)
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        images, masks = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(count):
            prefix = f"{city}_000000_{i:06d}"
            Image.fromarray(random_image(rng)).save(images / f"{prefix}_leftImg8bit.png")
            mask = label_map([7, 26, 1])  # road, car, ego vehicle (void)
            Image.fromarray(mask).save(masks / f"{prefix}_gtFine_labelIds.png")
    return root


COCO_CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "cat"}]


def coco_annotations(image_ids: list[int], start_id: int) -> list[dict]:
    """Per image: a big car box, a small dog box on it (listed first), a cat as compressed RLE,
    a car as uncompressed RLE, and a crowd region."""
    height, width = SIZE
    anns: list[dict] = []
    cat = np.zeros(SIZE, dtype=np.uint8)
    cat[30:38, 2:10] = 1
    cat_rle = mask_utils.encode(np.asfortranarray(cat))
    cat_rle["counts"] = cat_rle["counts"].decode()
    crowd = np.zeros(SIZE, dtype=np.uint8)
    crowd[30:38, 36:46] = 1
    car2 = np.zeros(SIZE, dtype=np.uint8)
    car2[0:4, 40:48] = 1
    for image_id in image_ids:
        for segmentation, category, iscrowd in (
            ([[12, 12, 20, 12, 20, 20, 12, 20]], 7, 0),  # dog: small, listed before the box it sits on
            ([[4, 4, 36, 4, 36, 28, 4, 28]], 3, 0),  # car: big box
            (cat_rle, 11, 0),
            ({"size": [height, width], "counts": _uncompressed_counts(car2)}, 3, 0),
            ({"size": [height, width], "counts": _uncompressed_counts(crowd)}, 7, 1),
        ):
            anns.append({"id": start_id + len(anns), "image_id": image_id, "category_id": category,
                         "segmentation": segmentation, "iscrowd": iscrowd, "area": 0, "bbox": [0, 0, 1, 1]})
    return anns


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def write_coco(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for split, first in (("train", 1), ("val", 100)):
        ids = list(range(first, first + count))
        images = []
        for image_id in ids:
            name = f"{image_id:012d}.jpg"
            Image.fromarray(random_image(rng)).save(root / "images" / name)
            images.append({"id": image_id, "file_name": name, "height": SIZE[0], "width": SIZE[1]})
        data = {"images": images, "annotations": coco_annotations(ids, first * 1000),
                "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def coco_overrides(root: Path) -> list[str]:
    return ["dataset=coco", f"dataset.root={root}", "dataset.image_dir=images", "dataset.num_classes=4",
            "dataset.annotations.train=annotations/instances_train.json",
            "dataset.annotations.val=annotations/instances_val.json"]


LAYOUTS = {
    "folder_split_file": (write_split_folder, lambda r: [
        "dataset=folder", f"dataset.root={r}", "dataset.image_dir=images", "dataset.mask_dir=masks",
        "dataset.split_file='splits/{split}.txt'", "dataset.num_classes=3"]),
    "folder_rgb_colors": (write_rgb_folder, lambda r: ["dataset=folder", f"dataset.root={r}",
                                                       "dataset.num_classes=3"]),
    "folder_tiff16": (lambda r: write_split_folder(r, mask_format="tiff16"), lambda r: [
        "dataset=folder", f"dataset.root={r}", "dataset.image_dir=images", "dataset.mask_dir=masks",
        "dataset.split_file='splits/{split}.txt'", "dataset.num_classes=3",
        "++dataset.remap={1000:1,2000:2}"]),  # ++: a typed int-key dict merges, `=` alone is refused
    "folder_palette": (lambda r: write_split_folder(r, mask_format="palette"), lambda r: [
        "dataset=folder", f"dataset.root={r}", "dataset.image_dir=images", "dataset.mask_dir=masks",
        "dataset.split_file='splits/{split}.txt'", "dataset.num_classes=3"]),
    "voc": (write_voc, lambda r: ["dataset=voc", f"dataset.root={r}"]),
    "cityscapes": (write_cityscapes, lambda r: ["dataset=cityscapes", f"dataset.root={r}"]),
    "coco": (write_coco, coco_overrides),
}


def compose_layout(compose_cfg, tmp_path: Path, layout: str, extra: Sequence[str] = ()):
    writer, overrides = LAYOUTS[layout]
    root = writer(tmp_path / layout)
    return compose_cfg([*ONE_STEP, *overrides(root), *extra], tiny=False), root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_trains_one_step(compose_cfg, tmp_path, layout):
    cfg, _ = compose_layout(compose_cfg, tmp_path, layout)
    summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "FINISHED" and summary["steps"] == 1
    assert (tmp_path / "run" / "metrics.json").is_file()


def read_split(cfg, split: str = "train"):
    dataset = build_dataset(cfg.dataset, split)
    return dataset, [dataset.read(i) for i in range(len(dataset))]


def test_folder_split_file_tiff16_and_palette_read_as_ids(compose_cfg, tmp_path):
    expected = torch.from_numpy(label_map([0, 1, 2]).astype(np.int64))
    for layout in ("folder_split_file", "folder_tiff16", "folder_palette"):
        cfg, _ = compose_layout(compose_cfg, tmp_path, layout)
        dataset, samples = read_split(cfg, "val")
        assert [p[0].stem for p in dataset.pairs] == ["s04", "s05"], layout
        assert all(torch.equal(mask, expected) for _, mask in samples), layout


def test_folder_k_fold_lists(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file",
                               ["dataset.split_file='splits/fold{fold}/{split}.txt'"])
    with pytest.raises(ConfigError, match=r"^dataset.fold"):
        build_dataset(cfg.dataset, "train")
    (root / "splits" / "fold1").mkdir()
    (root / "splits" / "fold1" / "train.txt").write_text("s00\ns02\n")
    cfg.dataset.fold = 1
    assert [p[0].stem for p in paired(build_dataset(cfg.dataset, "train")).pairs] == ["s00", "s02"]


def test_folder_rgb_masks_through_colour_table_and_dataset_json(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_rgb_colors")
    dataset, samples = read_split(cfg)
    assert dataset.class_names == ["bg", "red", "green"] and dataset.colors == COLORS
    assert torch.equal(samples[0][1], torch.from_numpy(label_map([0, 1, 2]).astype(np.int64)))
    bad = root / "masks" / "train" / "0.png"
    rgb = np.array(Image.open(bad))
    rgb[0, 0] = [1, 2, 3]
    Image.fromarray(rgb).save(bad)
    with pytest.raises(DataError, match=r"0\.png: colours outside dataset.colors / dataset.ignore_colors: "
                                        r"\[1, 2, 3\] \(1 pixel\); fix: the file is wrong"):
        dataset.read(0)


def test_voc_palette_indices_with_ignored_borders(compose_cfg, tmp_path):
    cfg, _ = compose_layout(compose_cfg, tmp_path, "voc")
    dataset, samples = read_split(cfg)
    assert len(dataset) == 4 and dataset.class_names[15] == "person" and dataset.num_classes == 21
    assert sorted(samples[0][1].unique().tolist()) == [0, 7, 15, 255]


def test_cityscapes_label_ids_become_train_ids(compose_cfg, tmp_path):
    cfg, _ = compose_layout(compose_cfg, tmp_path, "cityscapes")
    dataset, samples = read_split(cfg, "val")
    assert len(dataset) == 4 and dataset.class_names[13] == "car"
    assert torch.equal(samples[0][1], torch.from_numpy(label_map([0, 13, 255]).astype(np.int64)))


def test_coco_rasterised_by_the_documented_rule(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg, root = compose_layout(compose_cfg, tmp_path, "coco")
    dataset = build_dataset(cfg.dataset, "train")
    assert dataset.class_names == ["background", "car", "dog", "cat"]
    mask = dataset.read(0)[1]
    assert mask[8, 8] == 1  # car box
    assert mask[16, 16] == 2  # the small dog stays on top of the car it overlaps
    assert mask[34, 5] == 3  # compressed RLE cat
    assert mask[2, 44] == 1  # uncompressed RLE car
    assert mask[34, 40] == 255  # crowd region -> ignore
    assert mask[39, 20] == 0  # background
    cached = list((tmp_path / "xdg" / "segkit").glob("coco-*/1.png"))
    assert len(cached) == 1
    assert torch.equal(torch.from_numpy(np.array(Image.open(cached[0])).astype(np.int64)), mask)


def test_coco_category_subset_and_cache_reuse(compose_cfg, tmp_path, monkeypatch):
    cfg, root = compose_layout(compose_cfg, tmp_path, "coco", ["dataset.categories=[cat,7]", "dataset.num_classes=3",
                                                               f"dataset.cache_dir={tmp_path / 'masks'}"])
    dataset = build_dataset(cfg.dataset, "train")
    assert dataset.class_names == ["background", "cat", "dog"]
    first = dataset.read(1)[1]
    assert first[8, 8] == 0 and first[16, 16] == 2 and first[34, 5] == 1  # cars are background now

    def no_rasterising(self, index):
        raise AssertionError("mask should come from the PNG cache")

    monkeypatch.setattr(type(dataset), "rasterize", no_rasterising)
    assert torch.equal(build_dataset(cfg.dataset, "train").read(1)[1], first)
    assert len(list((tmp_path / "masks").glob("coco-*"))) == 1
    cfg.dataset.num_classes = 4
    cfg.dataset.categories = None  # other settings, other cache key: rasterised again
    with pytest.raises(AssertionError, match="PNG cache"):
        build_dataset(cfg.dataset, "train").read(1)


def test_coco_wrong_num_classes_names_the_key(compose_cfg, tmp_path):
    cfg, _ = compose_layout(compose_cfg, tmp_path, "coco", ["dataset.num_classes=81"])
    with pytest.raises(ConfigError, match=r"^dataset.num_classes: 81.*4 classes"):
        build_dataset(cfg.dataset, "train")


def test_coco_read_only_root_caches_in_user_dir(compose_cfg, tmp_path, monkeypatch):
    cfg, root = compose_layout(compose_cfg, tmp_path, "coco")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mode = root.stat().st_mode
    root.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        dataset = build_dataset(cfg.dataset, "val")
        dataset.read(0)
    finally:
        root.chmod(mode)
    assert isinstance(dataset, CocoDataset) and dataset.cache_dir is not None
    assert dataset.cache_dir.parent == tmp_path / "xdg" / "segkit"
    assert (dataset.cache_dir / "100.png").is_file() and not (root / ".segkit_cache").exists()


SHARED_COCO = SHARED_DATA / "coco-val2017-subset"
SHARED_COCO_ANNOTATIONS = "annotations/instances_val2017_subset.json"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under root: a write anywhere under it changes this."""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in [root, *root.rglob("*")]}


@pytest.mark.skipif(not (SHARED_COCO / SHARED_COCO_ANNOTATIONS).is_file(), reason="shared COCO subset absent")
def test_shared_coco_subset_trains_one_step(compose_cfg, tmp_path, monkeypatch):
    """Read-only or writable, the shared folder is only read: the mask cache goes where dataset.cache_dir says."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # nor into the user's own cache
    before = _tree(SHARED_COCO)
    cfg = compose_cfg([*ONE_STEP, "dataset=coco", f"dataset.root={SHARED_COCO}", "dataset.image_dir=images",
                       f"dataset.annotations.train={SHARED_COCO_ANNOTATIONS}",
                       f"dataset.annotations.val={SHARED_COCO_ANNOTATIONS}", f"dataset.cache_dir={tmp_path / 'cache'}",
                       "trainer.batch_size=8"], tiny=False)
    assert fit(cfg, tmp_path / "run")["steps"] == 1
    images = len(json.loads((SHARED_COCO / SHARED_COCO_ANNOTATIONS).read_text())["images"])
    assert len(list((tmp_path / "cache").glob("coco-*/*.png"))) == images  # each mask rasterised once
    assert not (tmp_path / "xdg").exists()
    assert _tree(SHARED_COCO) == before


def test_on_error_skip_replaces_and_reports_bad_samples(compose_cfg, tmp_path, caplog):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file", ["dataset.on_error=skip"])
    (root / "images" / "s01.jpg").write_bytes(b"not a jpeg")
    dataset = build_dataset(cfg.dataset, "train")
    with caplog.at_level(logging.WARNING, logger="segkit.data.readers.base"):
        image, mask = dataset[1]
        dataset[1]
    assert image.shape == (3, 32, 32)
    assert list(dataset.skipped) == [1]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "s01.jpg" in warnings[0] and "1 skipped" in warnings[0]
    cfg.dataset.on_error = "raise"
    with pytest.raises(DataError, match=r"s01\.jpg: cannot read image"):
        build_dataset(cfg.dataset, "train")[1]


def test_on_error_skip_leaves_out_images_without_masks(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file")
    (root / "masks" / "s02.png").unlink()
    with pytest.raises(DataError, match=r"s02\.jpg: missing mask"):
        build_dataset(cfg.dataset, "train")
    cfg.dataset.on_error = "skip"
    dataset = paired(build_dataset(cfg.dataset, "train"))
    assert [p[0].stem for p in dataset.pairs] == ["s00", "s01", "s03"]


def test_cache_decodes_each_sample_once(compose_cfg, tmp_path, monkeypatch):
    cfg, _ = compose_layout(compose_cfg, tmp_path, "folder_split_file", ["dataset.cache=true"])
    dataset = build_dataset(cfg.dataset, "train")
    reads: list[int] = []
    original = type(dataset).read

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(type(dataset), "read", read)
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    assert reads == [0, 1, 2, 3]
    for (image, mask), (image2, mask2) in zip(first, again, strict=True):
        assert torch.equal(image, image2) and torch.equal(mask, mask2) and mask2.dtype == torch.int64


@pytest.mark.parametrize("layout", ["voc", "cityscapes", "coco", "camvid", "flat", "rgb"])
def test_init_config_writes_a_config_that_reads(tmp_path, layout, capsys):
    writers = {
        "voc": write_voc, "cityscapes": write_cityscapes, "coco": write_coco, "rgb": write_rgb_folder,
        "camvid": lambda r: _camvid_like(r), "flat": lambda r: _flat_binary(r),
    }
    root = writers[layout](tmp_path / f"data_{layout}")
    target = init_config.run(init_config.parse_args([str(root), "--out", str(tmp_path / "conf" / "dataset")]))
    assert target == tmp_path / "conf" / "dataset" / f"data_{layout}.yaml"
    out = capsys.readouterr().out
    assert "suggested: augmentation.crop_size=" in out and "problem:" not in out
    text = target.read_text()
    cfg = OmegaConf.load(target)
    assert cfg.defaults[0] == {"voc": "voc_schema", "cityscapes": "cityscapes_schema",
                               "coco": "coco_schema"}.get(layout, "folder_schema")
    expected_classes = {"voc": 21, "cityscapes": 19, "coco": 4, "camvid": 3, "flat": 2, "rgb": 3}[layout]
    loaded = init_config.load_dataset_config(detect_layout(root), text)
    assert loaded.num_classes == expected_classes
    assert list(loaded.image_size) == list(SIZE)
    if layout == "flat":  # 0/255 masks: binary; one folder: split lists written
        assert dict(loaded.remap) == {255: 1} and (root / "splits" / "val.txt").is_file()
    if layout == "camvid":  # sparse ids 0, 5, 11 made contiguous
        assert dict(loaded.remap) == {5: 1, 11: 2} and loaded.image_dir == "{split}"


def test_init_config_yaml_composes_and_trains(compose_cfg, tmp_path):
    root = _flat_binary(tmp_path / "cells", count=10)
    init_config.run(init_config.parse_args([str(root), "--out", str(tmp_path / "conf" / "dataset")]))
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose_cfg([*ONE_STEP, "dataset=cells", search], tiny=False)
    assert cfg.dataset.split_file == "splits/{split}.txt"
    assert fit(cfg, tmp_path / "run")["steps"] == 1


def _camvid_like(root: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(6)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            Image.fromarray(random_image(rng)).save(root / split / f"f{i}.png")
            Image.fromarray(label_map([0, 5, 11])).save(root / f"{split}annot" / f"f{i}.png")
    return root


def _flat_binary(root: Path, count: int = 6) -> Path:
    """One images/ + masks/ folder, masks 0/255 (like the membrane set), no split."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.fromarray(random_image(rng)).save(root / "images" / f"{i}.png")
        Image.fromarray(label_map([0, 255, 0])).save(root / "masks" / f"{i}.png")
    return root


def test_layout_writers_are_self_consistent(tmp_path):
    """The fixtures must not depend on the working directory or leave files elsewhere."""
    before = set(os.listdir(tmp_path))
    write_voc(tmp_path / "v")
    assert set(os.listdir(tmp_path)) - before == {"v"}


# --- benchmark conventions: ADE20K, COCO-Stuff 164k, Cityscapes train ids -----------------------

def _benchmark_folders(root: Path, images: str, masks: str, folders: dict[str, str], values: list[int]) -> Path:
    """`images`/`masks` folders ({split} = each split's folder name) holding label_map(values) masks."""
    rng = np.random.default_rng(8)
    for split, folder in folders.items():
        image_dir, mask_dir = root / images.format(split=folder), root / masks.format(split=folder)
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(random_image(rng)).save(image_dir / f"{split}_{i:08d}.jpg")
            Image.fromarray(label_map(values)).save(mask_dir / f"{split}_{i:08d}.png")
    return root


def write_ade20k(root: Path) -> Path:
    """ADEChallengeData2016: images/{training,validation}, annotations/...; 0 = other, 1..150 classes."""
    return _benchmark_folders(root, "images/{split}", "annotations/{split}",
                              {"train": "training", "val": "validation"}, [0, 1, 150])


def write_coco_stuff(root: Path) -> Path:
    """stuffthingmaps: value = COCO id - 1; 12 is the 12th used value, 181 (wood) the last."""
    return _benchmark_folders(root, "images/{split}", "annotations/{split}",
                              {"train": "train2017", "val": "val2017"}, [255, 12, 181])


def test_ade20k_reduce_zero_label_as_mmseg(compose_cfg, tmp_path):
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    cfg = compose_cfg([*ONE_STEP, "dataset=ade20k", f"dataset.root={root}", "dataset.image_size=[40,48]",
                       "trainer.batch_size=2"],
                      tiny=False)
    dataset, samples = read_split(cfg, "val")
    assert len(dataset) == 3 and dataset.num_classes == 150 and dataset.class_names[149] == "flag"
    # 0 ("other") -> ignore, 1 -> 0, 150 -> 149: MMSeg's gt[gt == 0] = 255; gt -= 1; gt[gt == 254] = 255
    assert torch.equal(samples[0][1], torch.from_numpy(label_map([255, 0, 149]).astype(np.int64)))
    assert torch.equal(reduce_zero_label(torch.tensor([0, 1, 150, 255]), 255), torch.tensor([255, 0, 149, 255]))
    assert fit(cfg, tmp_path / "run")["steps"] == 1


def test_coco_stuff_171_mapping_is_the_published_one():
    table = coco_stuff_171(255)
    used = [value for value in range(182) if table[value] != 255]
    assert len(used) == 171 and [table[v] for v in used] == list(range(171))
    # COCO never used category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 (PNG value = id - 1).
    assert sorted(set(range(182)) - set(used)) == [i - 1 for i in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)]
    # Spot values of MMSegmentation's coco_stuff164k converter (clsID_to_trID).
    assert {v: table[v] for v in (0, 10, 12, 24, 26, 27, 30, 91, 181)} == {
        0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 91: 80, 181: 170}
    assert table[255] == 255 and 200 not in table and 182 not in table  # outside the format's values


def test_coco_stuff164k_preset_reads_171_classes(compose_cfg, tmp_path):
    root = write_coco_stuff(tmp_path / "coco_stuff164k")
    cfg = compose_cfg([*ONE_STEP, "dataset=coco_stuff164k", f"dataset.root={root}", "dataset.image_size=[40,48]"],
                      tiny=False)
    dataset, samples = read_split(cfg, "val")
    assert dataset.num_classes == 171 and dataset.class_names[11] == "stop sign" and dataset.class_names[-1] == "wood"
    assert torch.equal(samples[0][1], torch.from_numpy(label_map([255, 11, 170]).astype(np.int64)))


def test_cityscapes_train_id_files(compose_cfg, tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    for path in (root / "gtFine").rglob("*_gtFine_labelIds.png"):  # as createTrainIdLabelImgs would leave them
        Image.fromarray(label_map([0, 13, 255])).save(str(path).replace("_labelIds", "_labelTrainIds"))
    for labels in ("train_ids", "label_ids"):  # both files present: either can be read
        cfg = compose_cfg([*ONE_STEP, "dataset=cityscapes", f"dataset.root={root}", f"dataset.labels={labels}"],
                          tiny=False)
        dataset, samples = read_split(cfg, "val")
        assert dataset.pairs[0][1].name.endswith(f"_gtFine_label{'TrainIds' if labels == 'train_ids' else 'Ids'}.png")
        assert torch.equal(samples[0][1], torch.from_numpy(label_map([0, 13, 255]).astype(np.int64)))
    cfg.dataset.labels = "trainIds"
    with pytest.raises(ConfigError, match="^dataset.labels: must be label_ids or train_ids"):
        build_dataset(cfg.dataset, "val")


@pytest.mark.parametrize("layout", ["ade20k", "coco_stuff164k", "cityscapes_train_ids"])
def test_init_config_recognises_benchmark_layouts(tmp_path, layout, capsys):
    if layout == "ade20k":
        write_ade20k(tmp_path / "data" / "ADEChallengeData2016")
    elif layout == "coco_stuff164k":
        write_coco_stuff(tmp_path / "data")
    else:
        root = write_cityscapes(tmp_path / "data")
        for path in (root / "gtFine").rglob("*_gtFine_labelIds.png"):
            Image.fromarray(label_map([0, 13, 255])).save(str(path).replace("_labelIds", "_labelTrainIds"))
            path.unlink()
    target = init_config.run(init_config.parse_args([str(tmp_path / "data"), "--out", str(tmp_path / "conf")]))
    out = capsys.readouterr().out
    assert "problem:" not in out, out
    loaded = init_config.load_dataset_config(detect_layout(tmp_path / "data"), target.read_text())
    if layout == "ade20k":
        assert out.startswith("layout: ade20k") and loaded.reduce_zero_label and loaded.num_classes == 150
        assert dict(loaded.split_names) == {"train": "training", "val": "validation"}
    elif layout == "coco_stuff164k":
        assert out.startswith("layout: coco_stuff164k") and loaded.id_mapping == "coco_stuff_171"
        assert loaded.num_classes == 171 and len(loaded.class_names) == 171
    else:
        assert out.startswith("layout: cityscapes") and loaded.labels == "train_ids"


# --- metadata files as editors and tools write them ---------------------------------------------

def test_split_lists_with_bom_crlf_blank_lines_and_spaces(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file")
    for stem in ("s00", "s01"):  # ids with spaces
        for kind, suffix in (("images", "jpg"), ("masks", "png")):
            (root / kind / f"{stem}.{suffix}").rename(root / kind / f"my {stem}.{suffix}")
    text = "\ufeff# train ids\r\n\r\nmy s00  \r\n\t my s01\r\n   \r\ns02\r\n# s03 left out\r\n"
    (root / "splits" / "train.txt").write_bytes(text.encode("utf-8"))
    assert read_stem_list(root / "splits" / "train.txt") == ["my s00", "my s01", "s02"]
    assert [p[0].stem for p in paired(build_dataset(cfg.dataset, "train")).pairs] == ["my s00", "my s01", "s02"]


@pytest.mark.parametrize("content, message", [
    ("s00\nsé01\n".encode("latin-1"), "not UTF-8 text (byte 5); save it as UTF-8"),
    ("s00\n".encode("utf-16"), "not UTF-8 text"),
    (b"s00\ns01\r\ns00\n", "train.txt:3: stem 's00' is listed twice (also line 1)"),
])
def test_split_list_defects_are_one_line(compose_cfg, tmp_path, content, message):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file")
    (root / "splits" / "train.txt").write_bytes(content)
    with pytest.raises(DataError) as error:
        build_dataset(cfg.dataset, "train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_split_list_stem_with_extension_gets_a_hint(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_split_file")
    (root / "splits" / "train.txt").write_text("s00.jpg\ns01\n")
    with pytest.raises(DataError, match="no 's00.jpg.*' in .*; list stems without the extension$"):
        build_dataset(cfg.dataset, "train")


@pytest.mark.parametrize("content, message", [
    ('["bg", "red", "green"]', "expected an object"),
    ('{"class_names": "abc"}', "class_names must be a list of non-empty names, got 'abc'"),
    ('{"class_names": ["bg", 1, "green"]}', "class_names must be a list of non-empty names"),
    ('{"class_names": ["bg", "", "green"]}', "class_names must be a list of non-empty names"),
    ('{"class_names": ["bg", "red"]}', "2 class_names but dataset.num_classes=3"),
    ('{"colors": "red"}', "colors must be a list of [r, g, b] integer triples"),
    ('{"colors": [[0, 0, 0], [255, 0], [0, 255, 0]]}', "colors must be a list of [r, g, b]"),
    ('{"colors": [[0, 0, 0], ["255", 0, 0], [0, 255, 0]]}', "colors must be a list of [r, g, b]"),
    ('{"colors": [[0, 0, 0], [256, 0, 0], [0, 255, 0]]}', "colors must be a list of [r, g, b]"),
    ('{"colors": [[0, 0, 0], [255.0, 0, 0], [0, 255, 0]]}', "colors must be a list of [r, g, b]"),
    ('{"class_names": ["bg", "red", "green"],}', "cannot read dataset description"),
])
def test_dataset_json_wrong_types_are_one_line(compose_cfg, tmp_path, content, message):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_rgb_colors")
    (root / "dataset.json").write_text(content)
    with pytest.raises(DataError) as error:
        build_dataset(cfg.dataset, "train")
    assert str(error.value).startswith(f"{root / 'dataset.json'}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_dataset_json_with_bom_is_read(compose_cfg, tmp_path):
    cfg, root = compose_layout(compose_cfg, tmp_path, "folder_rgb_colors")
    (root / "dataset.json").write_bytes(b"\xef\xbb\xbf" + (root / "dataset.json").read_bytes())
    assert build_dataset(cfg.dataset, "train").class_names == ["bg", "red", "green"]
