"""segkit-check-data: every kind of broken file is reported on its own line naming the file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segkit.cli import check_data
from segkit.tools.checks import check_split

from .test_data_formats import coco_overrides, label_map, random_image, write_coco, write_rgb_folder


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Caches default to the user cache directory: here a temporary one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def write_broken_folder(root: Path) -> dict[str, tuple[str, bool]]:
    """images/train + masks/train with one problem per file, and an empty val split.

    Returns {file name that must be named: (words its problem line must contain, whether it is a warning)}.
    """
    rng = np.random.default_rng(0)
    images, masks = root / "images" / "train", root / "masks" / "train"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    (root / "images" / "val").mkdir()
    (root / "masks" / "val").mkdir()
    good = label_map([0, 1, 2])

    def pair(stem: str, image=None, mask=None, mask_name=None) -> None:
        Image.fromarray(random_image(rng) if image is None else image).save(images / f"{stem}.jpg")
        Image.fromarray(good if mask is None else mask).save(masks / (mask_name or f"{stem}.png"))

    for i in range(3):
        pair(f"good{i}")
    pair("corrupt")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    pair("truncated")
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(random_image(rng)).save(images / "nomask.jpg")
    Image.fromarray(good).save(masks / "orphan.png")
    pair("sizes", mask=np.zeros((20, 20), dtype=np.uint8))
    pair("rgbmask", mask=np.zeros((*good.shape, 3), dtype=np.uint8))
    pair("values", mask=label_map([0, 1, 7]))
    pair("jpegmask", mask_name="jpegmask.jpg")
    pair("dup")
    Image.fromarray(random_image(rng)).save(images / "dup.png")
    pair("empty")
    (images / "empty.jpg").write_bytes(b"")
    return {
        "corrupt.jpg": ("cannot read image", False),
        "truncated.jpg": ("truncated", False),
        "empty.jpg": ("empty file (0 bytes", False),
        "nomask.jpg": ("missing mask", False),
        "orphan.png": ("mask without an image", True),
        "sizes.png": ("size mismatch, mask (20, 20) vs image (40, 48)", False),
        "rgbmask.png": ("mode RGB, expected single-channel class ids; fix: dataset.colors", False),
        "values.png": ("values outside the class ids 0..2 and ignore_index 255: 7 (100 pixels); "
                       "fix: set dataset.num_classes or map them with dataset.remap", False),
        "jpegmask.jpg": ("JPEG mask", True),
        "dup.png": ("duplicate stem 'dup'", False),
    }


def folder_args(root: Path) -> list[str]:
    return ["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "dataset.image_size=[32,32]"]


def run_cli(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["segkit-check-data", *args])
    with pytest.raises(SystemExit) as exit_info:
        check_data.main()
    code = exit_info.value.code
    assert isinstance(code, int), code
    return code, capsys.readouterr().out


def test_every_problem_is_reported_with_its_file(tmp_path, monkeypatch, capsys):
    expected = write_broken_folder(tmp_path / "broken")
    status, out = run_cli(monkeypatch, capsys, folder_args(tmp_path / "broken"))
    assert status == 1
    lines = out.splitlines()
    for name, (words, warning) in expected.items():
        matching = [line for line in lines if f"/{name}:" in line]
        assert len(matching) == 1, f"{name}: {matching}"
        assert words in matching[0], matching[0]
        assert matching[0].startswith("train: warning: " if warning else "train: "), matching[0]
        assert warning or not matching[0].startswith("train: warning:"), matching[0]
    empty = [line for line in lines if line.startswith("val: ") and "empty data set" in line]
    assert len(empty) == 1 and "images/val" in empty[0]
    warnings = sum(warning for _, warning in expected.values())
    errors = len(expected) + 1 - warnings
    assert f"{len(expected) + 1} problems found: {errors} errors, {warnings} warnings" in out
    # dup and nomask are left out of the pairs; the three good samples and the JPEG mask make the statistics.
    assert f"train: 10 samples, 4 readable, {errors - 1} errors, {warnings} warnings" in out


def test_clean_data_exits_zero_with_statistics_weights_and_preview(tmp_path, monkeypatch, capsys):
    root = write_rgb_folder(tmp_path / "rgb")
    weights, preview = tmp_path / "out" / "weights.yaml", tmp_path / "out" / "preview.png"
    status, out = run_cli(monkeypatch, capsys, [*folder_args(root), f"write_weights={weights}",
                                                f"preview={preview}", "preview_count=3"])
    assert status == 0, out
    assert "no problems found" in out and "red" in out and "4 (100%)" in out
    loaded = yaml.safe_load(weights.read_text())
    assert loaded["class_names"] == ["bg", "red", "green"] and len(loaded["class_weights"]) == 3
    assert loaded["class_weights"][1] > loaded["class_weights"][0]  # rarer class, larger weight
    with Image.open(preview) as image:
        assert image.mode == "RGB" and image.width > 3 * 40 and image.height > 48


def test_rgb_masks_without_colour_table_are_named(tmp_path, compose_cfg):
    root = write_rgb_folder(tmp_path / "rgb")
    (root / "dataset.json").unlink()
    cfg = compose_cfg([*folder_args(root)], tiny=False)
    report = check_split(cfg.dataset, "train")
    assert len(report.problems) == 4
    for problem in report.problems:
        assert "mode RGB" in problem and "fix: dataset.colors" in problem and problem.split(":")[0].endswith(".png")


def test_coco_missing_image_is_named(tmp_path, compose_cfg, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_coco(tmp_path / "coco")
    (root / "images" / "000000000002.jpg").unlink()
    cfg = compose_cfg(coco_overrides(root), tiny=False)
    report = check_split(cfg.dataset, "train")
    assert report.problems == [f"{root / 'annotations' / 'instances_train.json'}: image "
                               f"{root / 'images' / '000000000002.jpg'} (id 2) not found; "
                               "fix: check its file_name and dataset.image_dir"]
    assert report.pixel_counts is not None and report.pixel_counts.sum() > 0  # the samples were read
    assert report.ignore_pixels > 0  # crowd regions


def test_config_error_exits_two(tmp_path, monkeypatch, capsys):
    root = write_rgb_folder(tmp_path / "rgb")
    monkeypatch.setattr(sys, "argv", ["segkit-check-data", *folder_args(root), "dataset.ignore_index=1"])
    with pytest.raises(SystemExit) as exit_info:
        check_data.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: dataset.ignore_index")
