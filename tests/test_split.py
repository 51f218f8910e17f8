"""segkit-split: deterministic, disjoint, complete lists; folds; stratification; whole groups; read by the
folder reader; errors in one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segkit.cli.split import main
from segkit.data.io import read_stem_list
from segkit.data.loading import build_dataset
from segkit.tools.split import assign, group_names, write_splits

from .conftest import paired
from .test_data_formats import label_map, random_image

STEMS = [f"img{i:02d}" for i in range(20)]


def read_lists(out: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(out)): read_stem_list(p) for p in sorted(out.rglob("*.txt"))}


def test_ratios_are_deterministic_disjoint_and_complete(tmp_path):
    write_splits(STEMS, tmp_path / "a", ratios=[0.7, 0.2, 0.1], seed=3)
    write_splits(STEMS, tmp_path / "b", ratios=[0.7, 0.2, 0.1], seed=3)
    write_splits(STEMS, tmp_path / "c", ratios=[0.7, 0.2, 0.1], seed=4)
    lists = read_lists(tmp_path / "a")
    assert lists == read_lists(tmp_path / "b") and lists != read_lists(tmp_path / "c")
    sizes = {name: len(stems) for name, stems in lists.items()}
    assert sizes == {"test.txt": 2, "train.txt": 14, "val.txt": 4}
    assert sorted(sum(lists.values(), [])) == STEMS


def test_k_folds_partition_the_non_test_images(tmp_path):
    write_splits(STEMS, tmp_path, ratios=[0.8, 0.0, 0.25], folds=5, seed=0)
    lists = read_lists(tmp_path)
    test = set(lists["test.txt"])
    assert len(test) == 5
    vals = [set(lists[f"fold{k}/val.txt"]) for k in range(5)]
    assert all(len(v) == 3 for v in vals) and set().union(*vals) == set(STEMS) - test
    for k in range(5):
        assert set(lists[f"fold{k}/train.txt"]) == set(STEMS) - test - vals[k]


def test_stratification_puts_a_rare_class_in_every_split():
    labels = [frozenset({0, 1}) for _ in STEMS]
    for i in (3, 17):  # class 9 appears in two images only
        labels[i] = frozenset({0, 9})
    for seed in range(10):
        sides = assign(STEMS, [0.5, 0.5], seed, labels)
        assert sorted(sides[i] for i in (3, 17)) == [0, 1]
        assert sides.count(0) == 10


# Three "video sequences" of 10, 6 and 4 frames, named like CamVid's frames (sequence_frame).
SEQUENCE_STEMS = [f"{name}_{i:05d}" for name, count in (("seqA", 10), ("seqB", 6), ("seqC", 4)) for i in range(count)]


@pytest.mark.parametrize("pattern", ["^[^_]+", "^(seq.)_"])  # the match, or its first capture group
def test_groups_stay_whole_in_every_fold_and_split(tmp_path, pattern):
    groups = group_names(SEQUENCE_STEMS, pattern)
    assert sorted(set(groups)) == ["seqA", "seqB", "seqC"]
    write_splits(SEQUENCE_STEMS, tmp_path / "folds", folds=3, groups=groups)
    lists = read_lists(tmp_path / "folds")
    # Three groups, three folds: each fold validates on exactly one whole sequence, trains on the others.
    held_out = sorted(tuple(sorted({s.split("_")[0] for s in lists[f"fold{k}/val.txt"]})) for k in range(3))
    assert held_out == [("seqA",), ("seqB",), ("seqC",)]
    for k in range(3):
        val = set(lists[f"fold{k}/val.txt"])
        assert set(lists[f"fold{k}/train.txt"]) == set(SEQUENCE_STEMS) - val
    # Ratios: whole groups, the largest first, each to the split furthest below its share.
    write_splits(SEQUENCE_STEMS, tmp_path / "ratios", ratios=[0.7, 0.3], groups=groups)
    lists = read_lists(tmp_path / "ratios")
    assert {s.split("_")[0] for s in lists["val.txt"]} == {"seqB"}
    assert {s.split("_")[0] for s in lists["train.txt"]} == {"seqA", "seqC"}
    # Frame by frame, the same shares put frames of every sequence on both sides.
    write_splits(SEQUENCE_STEMS, tmp_path / "frames", ratios=[0.7, 0.3])
    assert {s.split("_")[0] for s in read_lists(tmp_path / "frames")["val.txt"]} == {"seqA", "seqB", "seqC"}


def test_cli_group_folds_are_read_by_the_folder_dataset(tmp_path, compose_cfg, capsys):
    root = tmp_path / "data"
    write_flat(root, count=6)
    for path in sorted((root / "images").iterdir()) + sorted((root / "masks").iterdir()):
        frame = int(path.stem)
        path.rename(path.with_name(f"{'seqA' if frame < 4 else 'seqB'}_{frame:02d}{path.suffix}"))
    main([str(root / "images"), "--group", "^[^_]+", "--folds", "2"])
    out = capsys.readouterr().out
    assert "fold0/val.txt: 4 images from seqA" in out and "fold1/val.txt: 2 images from seqB" in out
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
                       "dataset.image_dir=images", "dataset.mask_dir=masks", "dataset.image_size=[32,32]",
                       "dataset.split_file='splits/fold{fold}/{split}.txt'", "dataset.fold=1"], tiny=False)
    train, val = paired(build_dataset(cfg.dataset, "train")), paired(build_dataset(cfg.dataset, "val"))
    assert {p[0].stem for p in val.pairs} == {"seqB_04", "seqB_05"}
    assert {p[0].stem for p in train.pairs} == {f"seqA_{i:02d}" for i in range(4)}


def write_flat(root: Path, count: int = 10) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.fromarray(random_image(rng)).save(root / "images" / f"{i:02d}.jpg")
        Image.fromarray(label_map([0, 1, 2 if i < 2 else 1])).save(root / "masks" / f"{i:02d}.png")
    return root


def test_cli_lists_are_read_by_the_folder_dataset(tmp_path, compose_cfg, capsys):
    root = write_flat(tmp_path / "data")
    main([str(root / "images"), "--masks", str(root / "masks"), "--folds", "2", "--stratify", "--seed", "1"])
    out = capsys.readouterr().out
    assert "fold1/val.txt: 5 images; classes present" in out and "dataset.fold=0" in out
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
                       "dataset.image_dir=images", "dataset.mask_dir=masks", "dataset.image_size=[32,32]",
                       "dataset.split_file='splits/fold{fold}/{split}.txt'", "dataset.fold=1"], tiny=False)
    train, val = build_dataset(cfg.dataset, "train"), paired(build_dataset(cfg.dataset, "val"))
    assert len(train) == 5 and len(val) == 5
    assert {p[0].stem for p in val.pairs} == set(read_stem_list(root / "splits" / "fold1" / "val.txt"))
    # Stratified: the two images with class 2 are in different folds.
    assert len({p[0].stem for p in val.pairs} & {"00", "01"}) == 1
    image, mask = val[0]
    assert image.shape == (3, 32, 32) and set(mask.unique().tolist()) <= {0, 1, 2, 255}  # 255: letterbox


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stratify"], "--stratify: needs --masks"),
        (["--ratios", "1", "0"], ""),
        (["--folds", "1"], "--folds: need at least 2"),
        (["--ratios", "0.99", "0.01"], "val.txt: would be empty"),
        (["--group", "x("], "--group: 'x(' is not a regular expression"),
        (["--group", "^1"], "--group: '^1' does not name a group in '00'"),
        (["--group", "^0", "--folds", "2"], "train.txt: would be empty (4 images in 1 group(s))"),
        (["--group", "^0", "--stratify", "--masks", "masks"], "--stratify and --group: choose one"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    root = write_flat(tmp_path / "data", count=4)
    if not message:
        main([str(root / "images"), *args])
        assert read_lists(root / "splits") == {"train.txt": ["00", "01", "02", "03"]}
        return
    args = [str(root / arg) if arg == "masks" else arg for arg in args]
    with pytest.raises(SystemExit) as exit_info:
        main([str(root / "images"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (root / "splits").exists()  # no half-written set of lists (a good train.txt beside no val.txt)
