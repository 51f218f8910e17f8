"""Mask values as each benchmark defines them: nothing is dropped without a word, in the check or in training.

Every reader knows its format's value table. A value outside it is listed by segkit-check-data
(file, values, pixel counts) and refused by training with the same line, at any bit depth;
`dataset.unknown_labels=ignore` maps it to ignore, logged and counted. A mask with no labelled
pixel is a warning (`dataset.skip_unlabelled=true` leaves it out). The check and training
classify each finding the same way. Caches go to the user cache directory, never into the data.
"""

from __future__ import annotations

import logging
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.cli import check_data
from segkit.data.loading import build_dataset
from segkit.data.readers.base import Problem, SegmentationDataset
from segkit.data.readers.coco import CocoDataset
from segkit.data.readers.folder import FolderDataset
from segkit.engine.trainer import fit
from segkit.errors import DataError
from segkit.tools.checks import check_split

from .conftest import paired
from .test_data_formats import (
    ONE_STEP,
    SIZE,
    _camvid_like,
    coco_overrides,
    label_map,
    write_ade20k,
    write_cityscapes,
    write_coco,
    write_coco_stuff,
    write_rgb_folder,
    write_voc,
)

PIXELS = SIZE[0] * SIZE[1]
# label_map([a, b, c]): c in a 10x10 square inside b's left half, a on the right half.
SQUARE, LEFT, RIGHT = 100, PIXELS // 2 - 100, PIXELS // 2


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def run_check(monkeypatch, capsys, args: list[str]) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["segkit-check-data", *args])
    with pytest.raises(SystemExit) as exit_info:
        check_data.main()
    code = exit_info.value.code
    assert isinstance(code, int), code
    return code, capsys.readouterr().out.splitlines()


def lines_naming(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if f"/{name}:" in line]


def tagged(problems: list[str]) -> list[Problem]:
    """A report's problems as the Problems they are: each line with its kind and whether it is a warning."""
    assert all(isinstance(p, Problem) for p in problems), problems
    return [p for p in problems if isinstance(p, Problem)]


def coco_cache_dir(dataset: SegmentationDataset) -> Path:
    """Where a COCO data set keeps the masks it renders."""
    assert isinstance(dataset, CocoDataset) and dataset.cache_dir is not None, dataset
    return dataset.cache_dir


def read_all(dataset) -> list[torch.Tensor]:
    """Every sample as training reads it (letterboxed, values settled)."""
    return [dataset[i][1] for i in range(len(dataset))]


def save_mask(path: Path, values: list[int], dtype=np.uint8) -> None:
    Image.fromarray(label_map(values, dtype=dtype)).save(path)


# --- Cityscapes: label ids outside 0..33, 8-bit and 16-bit alike --------------------------------

def cityscapes_with_unknown_ids(root: Path) -> tuple[Path, Path]:
    write_cityscapes(root)
    masks = sorted((root / "gtFine" / "val" / "frankfurt").glob("*_labelIds.png"))
    save_mask(masks[0], [7, 26, 40])  # 40: not a label id (8-bit)
    save_mask(masks[1], [7, 263, 26], dtype=np.uint16)  # 263: not a label id (a 16-bit file)
    return masks[0], masks[1]


def test_cityscapes_unknown_ids_listed_and_refused_the_same_at_any_bit_depth(tmp_path, compose_cfg, monkeypatch,
                                                                            capsys):
    eight, sixteen = cityscapes_with_unknown_ids(tmp_path / "cs")
    args = ["dataset=cityscapes", f"dataset.root={tmp_path / 'cs'}", "splits=[val]"]
    status, lines = run_check(monkeypatch, capsys, args)
    assert status == 1
    fix = ("fix: the file is wrong, or dataset.unknown_labels=ignore to train with those pixels ignored")
    assert lines_naming(lines, eight.name) == [
        f"val: {eight}: values outside the Cityscapes label ids 0..33: 40 ({SQUARE} pixels); {fix}"]
    assert lines_naming(lines, sixteen.name) == [
        f"val: {sixteen}: values outside the Cityscapes label ids 0..33: 263 ({LEFT} pixels); {fix}"]
    assert "dataset.remap" not in "\n".join(lines)  # Cityscapes has no such key
    assert lines[-1] == "2 problems found: 2 errors, 0 warnings (unknown values: 2)"

    # Training refuses the first with the check's words, as one line.
    cfg = compose_cfg([*ONE_STEP, *args[:2], "dataset.image_size=[40,48]"], tiny=False)
    dataset = build_dataset(cfg.dataset, "val")
    for index, line in ((0, lines_naming(lines, eight.name)[0]), (1, lines_naming(lines, sixteen.name)[0])):
        with pytest.raises(DataError) as error:
            dataset[index]
        assert f"val: {error.value}" == line


def test_cityscapes_unknown_ids_ignored_on_request_counted_and_logged(tmp_path, compose_cfg, monkeypatch, capsys,
                                                                      caplog):
    eight, sixteen = cityscapes_with_unknown_ids(tmp_path / "cs")
    args = ["dataset=cityscapes", f"dataset.root={tmp_path / 'cs'}", "dataset.unknown_labels=ignore"]
    warning = f"val: warning: {eight}: values outside the Cityscapes label ids 0..33: 40 ({SQUARE} pixels); " \
              "mapped to ignore_index 255 (dataset.unknown_labels=ignore)"
    cfg = compose_cfg([*ONE_STEP, *args, "dataset.image_size=[40,48]"], tiny=False)
    dataset = build_dataset(cfg.dataset, "val")
    with caplog.at_level(logging.WARNING, logger="segkit.data"):
        masks = read_all(dataset)
        read_all(dataset)  # each file is logged once per process
    assert torch.equal(masks[0], torch.from_numpy(label_map([0, 13, 255]).astype(np.int64)))
    assert torch.equal(masks[1], torch.from_numpy(label_map([0, 255, 13]).astype(np.int64)))
    logged = [r.getMessage() for r in caplog.records if "unknown_labels" in r.getMessage()]
    assert logged == [f"{warning.removeprefix('val: warning: ')} [unknown values: 1 file so far in this process]",
                      f"{sixteen}: values outside the Cityscapes label ids 0..33: 263 ({LEFT} pixels); mapped to "
                      "ignore_index 255 (dataset.unknown_labels=ignore) [unknown values: 2 files so far in this "
                      "process]"]
    assert dataset.finding_counts["unknown values"] == 2

    status, lines = run_check(monkeypatch, capsys, [*args, "splits=[val]"])
    assert status == 0  # warnings only
    assert lines_naming(lines, eight.name) == [warning]
    assert lines[-1] == "2 problems found: 0 errors, 2 warnings (unknown values: 2)"


def test_training_refuses_unknown_values_with_one_line(tmp_path, compose_cfg):
    eight, _ = cityscapes_with_unknown_ids(tmp_path / "cs")
    (tmp_path / "cs" / "gtFine" / "train").rename(tmp_path / "cs" / "gtFine" / "train_")  # train = val
    (tmp_path / "cs" / "leftImg8bit" / "train").rename(tmp_path / "cs" / "leftImg8bit" / "train_")
    (tmp_path / "cs" / "gtFine" / "train").symlink_to(tmp_path / "cs" / "gtFine" / "val")
    (tmp_path / "cs" / "leftImg8bit" / "train").symlink_to(tmp_path / "cs" / "leftImg8bit" / "val")
    cfg = compose_cfg([*ONE_STEP, "dataset=cityscapes", f"dataset.root={tmp_path / 'cs'}",
                       "dataset.image_size=[40,48]", "trainer.batch_size=4"], tiny=False)
    with pytest.raises(DataError) as error:
        fit(cfg, tmp_path / "run")
    trained = tmp_path / "cs" / "gtFine" / "train" / "frankfurt" / eight.name
    assert str(error.value).startswith(f"{trained}: values outside the Cityscapes label ids 0..33: 40 (")
    assert "\n" not in str(error.value)


# --- COCO-Stuff: category ids stored instead of id - 1 ------------------------------------------

def test_coco_stuff_values_above_181_are_not_silently_ignored(tmp_path, compose_cfg, monkeypatch, capsys):
    root = write_coco_stuff(tmp_path / "stuff")
    bad = sorted((root / "annotations" / "val2017").glob("*.png"))[0]
    save_mask(bad, [255, 13, 182])  # 182: category id 182 (wood) stored as is
    args = ["dataset=coco_stuff164k", f"dataset.root={root}", "splits=[val]"]
    status, lines = run_check(monkeypatch, capsys, args)
    assert status == 1
    assert lines_naming(lines, bad.name) == [
        f"val: {bad}: values outside the COCO-Stuff values 0..181 (category id - 1) and 255: 182 ({SQUARE} "
        "pixels); fix: the file is wrong (values of 182 and above: category ids stored instead of id - 1), "
        "or dataset.unknown_labels=ignore to train with those pixels ignored"]

    cfg = compose_cfg([*ONE_STEP, *args[:2], "dataset.image_size=[40,48]", "dataset.unknown_labels=ignore"],
                      tiny=False)
    mask = build_dataset(cfg.dataset, "val")[0][1]
    assert int((mask == 255).sum()) == RIGHT + SQUARE and int((mask == 12).sum()) == LEFT  # 13 -> 12


# --- ADE20K: a mask of zeros has no labelled pixel after reduce_zero_label ---------------------

def test_unlabelled_mask_warned_counted_and_left_out_on_request(tmp_path, compose_cfg, monkeypatch, capsys,
                                                                caplog):
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    zeros = sorted((root / "annotations" / "validation").glob("*.png"))[1]
    save_mask(zeros, [0, 0, 0])
    args = ["dataset=ade20k", f"dataset.root={root}", "splits=[val]"]
    warning = (f"{zeros}: no labelled pixel, all {PIXELS} pixels are ignore after reduce_zero_label (0 = other is "
               "ignored); it adds nothing to training; dataset.skip_unlabelled=true leaves such masks out")
    cfg = compose_cfg([*ONE_STEP, *args[:2], "dataset.image_size=[40,48]"], tiny=False)
    dataset = build_dataset(cfg.dataset, "val")
    with caplog.at_level(logging.WARNING, logger="segkit.data"):
        read_all(dataset)
    assert [r.getMessage() for r in caplog.records] == [
        f"{warning} [no labelled pixel: 1 file so far in this process]"]

    caplog.clear()
    cfg.dataset.skip_unlabelled = True
    with caplog.at_level(logging.WARNING, logger="segkit.data"):
        dataset = build_dataset(cfg.dataset, "val")
    assert len(dataset) == 2 and zeros not in [mask for _, mask in paired(dataset).pairs]
    left_out = (f"{zeros}: no labelled pixel, all {PIXELS} pixels are ignore after reduce_zero_label (0 = other is "
                "ignored); left out (dataset.skip_unlabelled=true)")
    assert [r.getMessage() for r in caplog.records] == [
        left_out, "ade20k[val]: left out 1 of 3 masks with no labelled pixel (dataset.skip_unlabelled=true)"]

    status, lines = run_check(monkeypatch, capsys, args)
    assert status == 0
    assert lines_naming(lines, zeros.name) == [f"val: warning: {warning}"]
    assert lines[-1] == "1 problem found: 0 errors, 1 warning (no labelled pixel: 1)"
    assert "val: 3 samples, 3 readable, 0 errors, 1 warning" in lines
    status, lines = run_check(monkeypatch, capsys, [*args, "dataset.skip_unlabelled=true"])
    assert status == 0 and lines_naming(lines, zeros.name) == [f"val: warning: {left_out}"]
    assert "val: 2 samples, 2 readable, 0 errors, 1 warning" in lines


def test_unlabelled_scan_is_remembered_in_the_user_cache(tmp_path, compose_cfg, monkeypatch):
    """A second build reads no unchanged mask; a changed file is read again; the data set is not written to."""
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    masks = sorted((root / "annotations" / "validation").glob("*.png"))
    save_mask(masks[0], [0, 0, 0])
    before = snapshot(root)
    cfg = compose_cfg([*ONE_STEP, "dataset=ade20k", f"dataset.root={root}", "dataset.skip_unlabelled=true"],
                      tiny=False)
    assert [mask.name for _, mask in paired(build_dataset(cfg.dataset, "val")).pairs] == [m.name for m in masks[1:]]
    assert len(list((tmp_path / "user-cache" / "segkit" / "labels").glob("*.json"))) == 1
    assert snapshot(root) == before

    reads = []
    original = FolderDataset.read_native_mask

    def counted(self, index):
        reads.append(self.pairs[index][1].name)
        return original(self, index)

    monkeypatch.setattr(FolderDataset, "read_native_mask", counted)
    dataset = build_dataset(cfg.dataset, "val")
    assert reads == [] and [mask.name for _, mask in paired(dataset).pairs] == [m.name for m in masks[1:]]
    assert dataset.layout_problems[0].startswith(f"{masks[0]}: no labelled pixel")

    save_mask(masks[0], [0, 3, 0])  # labelled now: another size, another time
    save_mask(masks[2], [0, 0, 0])
    dataset = build_dataset(cfg.dataset, "val")
    assert sorted(reads) == sorted([masks[0].name, masks[2].name])
    assert [mask.name for _, mask in paired(dataset).pairs] == [masks[0].name, masks[1].name]
    cfg.dataset.reduce_zero_label = False  # other settings, other values: scanned afresh
    reads.clear()
    assert len(build_dataset(cfg.dataset, "val")) == 3 and len(reads) == 3


def test_ade20k_value_above_150_names_no_remap(tmp_path, compose_cfg):
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    bad = sorted((root / "annotations" / "validation").glob("*.png"))[0]
    save_mask(bad, [0, 1, 151])
    cfg = compose_cfg([*ONE_STEP, "dataset=ade20k", f"dataset.root={root}"], tiny=False)
    report = check_split(cfg.dataset, "val")
    assert report.problems == [f"{bad}: values outside the values 0..150 (0 = other) and 255: 151 ({SQUARE} pixels); "
                               "fix: the file is wrong, or dataset.unknown_labels=ignore to train with those "
                               "pixels ignored"]


# --- VOC, CamVid / folder, colour-coded folder: each names a fix it has -------------------------

def test_voc_and_camvid_unknown_values_name_their_own_fix(tmp_path, compose_cfg):
    root = write_voc(tmp_path / "VOC2012")
    bad = root / "SegmentationClass" / "2007_val000.png"
    save_mask(bad, [0, 15, 30])
    report = check_split(compose_cfg(["dataset=voc", f"dataset.root={root}"], tiny=False).dataset, "val")
    assert report.problems == [
        f"{bad}: values outside the VOC class ids 0..20 and 255 (object borders): 30 ({SQUARE} pixels); fix: the "
        "file is wrong (masks are palette indices), or map them with dataset.remap, or dataset.unknown_labels=ignore "
        "to train with those pixels ignored"]
    assert not tagged(report.problems)[0].warning

    root = _camvid_like(tmp_path / "camvid")
    bad = root / "valannot" / "f2.png"
    save_mask(bad, [0, 5, 12])
    report = check_split(compose_cfg(["dataset=camvid", f"dataset.root={root}"], tiny=False).dataset, "val")
    assert report.problems == [
        f"{bad}: values outside the class ids 0..10, ignore_index 255 and the keys of dataset.remap: 12 ({SQUARE} "
        "pixels); fix: set dataset.num_classes or map them with dataset.remap, or dataset.unknown_labels=ignore to "
        "train with those pixels ignored"]


def test_colour_coded_set_blames_the_file_not_remap(tmp_path, compose_cfg):
    root = write_rgb_folder(tmp_path / "rgb")
    grey, odd = root / "masks" / "val" / "1.png", root / "masks" / "val" / "2.png"
    save_mask(grey, [0, 76, 1])  # saved as grey levels: not this set's colours
    rgb = np.array(Image.open(odd))
    rgb[0:2, 0:3] = [9, 9, 9]
    Image.fromarray(rgb).save(odd)
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3"], tiny=False)
    report = check_split(cfg.dataset, "val")
    assert report.problems == [
        f"{grey}: values outside the class ids 0..2 and ignore_index 255: 76 ({LEFT} pixels); fix: the file is wrong "
        "(this data set's masks are RGB colours listed in dataset.colors), or dataset.unknown_labels=ignore to "
        "train with those pixels ignored",
        f"{odd}: colours outside dataset.colors / dataset.ignore_colors: [9, 9, 9] (6 pixels); fix: the file is "
        "wrong, or list the colour in dataset.colors or dataset.ignore_colors, or dataset.unknown_labels=ignore to "
        "train with those pixels ignored"]
    assert all("dataset.remap" not in problem for problem in report.problems)
    cfg.dataset.unknown_labels = "ignore"
    mask = build_dataset(cfg.dataset, "val").native_mask(2)
    assert int((mask == 255).sum()) == 6 and mask[0, 0] == 255 and mask[39, 47] == 0


# --- roots, empty files, counts in English ------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder", "voc", "cityscapes", "coco"])
def test_missing_root_is_named_as_the_root(tmp_path, compose_cfg, layout):
    missing = tmp_path / "typo"
    overrides = {"folder": ["dataset=folder", f"dataset.root={missing}", "dataset.num_classes=3"],
                 "voc": ["dataset=voc", f"dataset.root={missing}"],
                 "cityscapes": ["dataset=cityscapes", f"dataset.root={missing}"],
                 "coco": coco_overrides(missing)}[layout]
    cfg = compose_cfg(overrides, tiny=False)
    with pytest.raises(DataError) as error:
        build_dataset(cfg.dataset, "train")
    assert str(error.value).startswith(f"{missing}: data set root not found; fix: dataset.root (the directory holding ")


def test_zero_byte_files_are_called_empty_and_counts_read_in_english(tmp_path, compose_cfg, monkeypatch, capsys):
    root = _camvid_like(tmp_path / "camvid")
    (root / "valannot" / "f1.png").write_bytes(b"")
    args = ["dataset=camvid", f"dataset.root={root}", "splits=[val]"]
    status, lines = run_check(monkeypatch, capsys, args)
    assert status == 1
    assert lines_naming(lines, "f1.png") == [
        f"val: {root / 'valannot' / 'f1.png'}: empty file (0 bytes, an interrupted copy or download?); fix: the file "
        "is wrong, copy it again"]
    assert "val: 4 samples, 3 readable, 1 error, 0 warnings" in lines
    assert lines[-1] == "1 problem found: 1 error, 0 warnings (other: 1)"
    (root / "val" / "f2.png").write_bytes(b"")
    status, lines = run_check(monkeypatch, capsys, args)
    assert lines[-1] == "2 problems found: 2 errors, 0 warnings (other: 2)"
    assert lines_naming(lines, "f2.png") == [f"val: {root / 'val' / 'f2.png'}: empty file (0 bytes, an interrupted "
                                             "copy or download?); fix: the file is wrong, copy it again"]
    cfg = compose_cfg([*ONE_STEP, *args[:2]], tiny=False)
    with pytest.raises(DataError, match=r"f1\.png: empty file \(0 bytes"):
        build_dataset(cfg.dataset, "val")[1]


def test_zero_byte_description_and_annotation_files_are_called_empty(tmp_path, compose_cfg):
    rgb = write_rgb_folder(tmp_path / "rgb")
    (rgb / "dataset.json").write_bytes(b"")
    cfg = compose_cfg(["dataset=folder", f"dataset.root={rgb}", "dataset.num_classes=3"], tiny=False)
    with pytest.raises(DataError) as error:
        build_dataset(cfg.dataset, "train")
    assert str(error.value).startswith(f"{rgb / 'dataset.json'}: empty file (0 bytes")
    coco = write_coco(tmp_path / "coco")
    (coco / "annotations" / "instances_train.json").write_bytes(b"")
    report = check_split(compose_cfg(coco_overrides(coco), tiny=False).dataset, "train")
    assert report.problems == [f"{coco / 'annotations' / 'instances_train.json'}: empty file (0 bytes); "
                               "fix: the file is wrong, export or copy it again"]


# --- one classification for the check and training ----------------------------------------------

def test_mask_without_image_is_a_warning_in_the_check_and_in_training(tmp_path, compose_cfg, monkeypatch, capsys,
                                                                     caplog):
    root = _camvid_like(tmp_path / "camvid")
    orphan = root / "valannot" / "extra.png"
    save_mask(orphan, [0, 5, 11])
    args = ["dataset=camvid", f"dataset.root={root}"]
    line = f"{orphan}: mask without an image, no 'extra.*' in {root / 'val'}; not used"
    cfg = compose_cfg([*ONE_STEP, *args], tiny=False)
    with caplog.at_level(logging.WARNING, logger="segkit.data"):
        dataset = build_dataset(cfg.dataset, "val")
    assert len(dataset) == 4 and [r.getMessage() for r in caplog.records] == [line]
    status, lines = run_check(monkeypatch, capsys, [*args, "splits=[val]"])
    assert status == 0
    assert lines_naming(lines, orphan.name) == [f"val: warning: {line}"]


@pytest.mark.parametrize("unknown_labels", ["error", "ignore"])
def test_check_and_training_classify_alike(tmp_path, compose_cfg, unknown_labels, caplog):
    """Whatever the check calls an error, reading raises with the same line; its warnings, reading logs."""
    root = _camvid_like(tmp_path / "camvid")
    save_mask(root / "valannot" / "f0.png", [0, 5, 40])  # unknown value
    save_mask(root / "valannot" / "f1.png", [11, 11, 11])  # void only: no labelled pixel
    Image.fromarray(label_map([0, 5, 5])).save(root / "valannot" / "f2.jpg")
    (root / "valannot" / "f2.png").unlink()  # a JPEG mask
    cfg = compose_cfg([*ONE_STEP, "dataset=camvid", f"dataset.root={root}",
                       f"dataset.unknown_labels={unknown_labels}"], tiny=False)
    problems = tagged(check_split(cfg.dataset, "val").problems)
    assert sorted(p.kind for p in problems) == ["JPEG mask", "no labelled pixel", "unknown values"]
    dataset = build_dataset(cfg.dataset, "val")
    errors, logged = [], []
    for index in range(len(dataset)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="segkit.data"):
            try:
                dataset[index]
            except DataError as error:
                errors.append(str(error))
        logged += [r.getMessage().rsplit(" [", 1)[0] for r in caplog.records]
    assert errors == [p for p in problems if not p.warning]
    assert sorted(logged) == sorted(p for p in problems if p.warning)
    assert len(errors) == (1 if unknown_labels == "error" else 0)


# --- caches: the user cache directory, never the data set's folder -------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_coco_masks_cached_in_the_user_cache_and_the_data_untouched(tmp_path, compose_cfg):
    root = write_coco(tmp_path / "coco")
    before = snapshot(root)
    cfg = compose_cfg([*ONE_STEP, *coco_overrides(root)], tiny=False)
    dataset = build_dataset(cfg.dataset, "train")
    read_all(dataset)
    cache_dir = coco_cache_dir(dataset)
    assert cache_dir.parent == tmp_path / "user-cache" / "segkit"
    assert len(list(cache_dir.glob("*.png"))) == len(dataset)
    assert snapshot(root) == before  # nothing written, nothing touched
    report = check_split(cfg.dataset, "val")
    assert report.problems == [] and snapshot(root) == before


def test_coco_read_only_data_and_cache_dir_only_when_asked(tmp_path, compose_cfg):
    root = write_coco(tmp_path / "coco")
    cfg = compose_cfg([*ONE_STEP, *coco_overrides(root)], tiny=False)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")] if p.is_dir()}
    for directory in modes:
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        read_all(build_dataset(cfg.dataset, "val"))
    finally:
        for directory, mode in modes.items():
            directory.chmod(mode)
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "images"]
    cfg.dataset.cache_dir = str(root / "masks")  # asked for: written there
    dataset = build_dataset(cfg.dataset, "val")
    read_all(dataset)
    cache_dir = coco_cache_dir(dataset)
    assert cache_dir.parent == root / "masks" and len(list(cache_dir.glob("*.png"))) == 4
