"""Malformed COCO files (tests/coco_corpus.py) each give one line naming the file and the fix, never a traceback.

Through the reader (on_error=raise: the run stops with that line; on_error=skip: the image or
annotation is left out, logged and counted) and through segkit-check-data, which lists every
defect of a file at once with counts per kind.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.cli import check_data
from segkit.data.readers.coco import CocoDataset
from segkit.data.readers.coco_format import rle_string_counts
from segkit.errors import SegkitError

from .coco_corpus import ACCEPTED, CASES, IMAGE_1, IMAGE_2, Case, base_coco, compressed_rle, write_case
from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
CASE_IDS = [case.name for case in CASES]
# Annotations that cannot be attributed to an image are left out alone (the image they were meant for is unknown).
ORPHANS = {"annotation_without_image_id", "annotation_image_id_string", "annotation_points_to_nothing",
           "image_id_string", "annotation_is_a_list"}


def coco_dataset(annotation_file: Path, on_error: str = "raise", **options) -> CocoDataset:
    root = annotation_file.parents[1]
    return CocoDataset(split="train", root=str(root), annotations={"train": str(annotation_file.relative_to(root))},
                       image_dir="images", name="coco", num_classes=4, ignore_index=255, image_size=[40, 48],
                       on_error=on_error, cache_dir=str(root / "cache"), **options)


def read_all(dataset: CocoDataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dataset[index] for index in range(len(dataset))]


def check_data_args(annotation_file: Path) -> list[str]:
    root = annotation_file.parents[1]
    return ["dataset=coco", f"dataset.root={root}", "dataset.image_dir=images", "dataset.num_classes=4",
            f"dataset.annotations.train={annotation_file.relative_to(root)}", f"dataset.cache_dir={root / 'cache'}",
            "splits=[train]"]


def test_corpus_is_large_and_covers_each_kind():
    assert len(CASES) >= 60 and len(set(CASE_IDS)) == len(CASES)
    assert len({case.kind for case in CASES}) >= 15


def test_the_base_file_and_accepted_variants_load_with_the_same_masks(tmp_path):
    expected = [mask for _, mask in read_all(coco_dataset(write_case(tmp_path / "base", None)))]
    # image 1: dog, cat and a crowd of cars (ignored); image 2: a car; image 3: a cat
    assert [sorted(m.unique().tolist()) for m in expected] == [[0, 2, 3, 255], [0, 1], [0, 3]]
    for name, mutate in ACCEPTED.items():
        dataset = coco_dataset(write_case(tmp_path / name, mutate))
        masks = [mask for _, mask in read_all(dataset)]
        assert all(torch.equal(a, b) for a, b in zip(expected, masks, strict=False)), name
        assert dataset.left_out == {"images": 0, "annotations": 0}, name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reader_names_the_defect_in_one_line(tmp_path, caplog, case: Case):
    path = write_case(tmp_path, case.mutate)
    if case.warning:  # drawn as pycocotools draws it, and said once
        with caplog.at_level(logging.WARNING, logger="segkit.data"):
            read_all(coco_dataset(path))
        lines = [r.getMessage() for r in caplog.records if all(word in r.getMessage() for word in case.named)]
        assert len(lines) == 1, caplog.text
        line = lines[0]
    else:
        with pytest.raises(SegkitError) as error:
            read_all(coco_dataset(path))
        line = str(error.value)
    assert "\n" not in line and line.startswith(f"{path}: ") and "; fix: " in line, line
    for word in case.named:
        assert word in line, line


@pytest.mark.parametrize("case", [c for c in CASES if not c.fatal and not c.warning],
                         ids=[c.name for c in CASES if not c.fatal and not c.warning])
def test_skip_leaves_out_the_affected_image_and_says_so(tmp_path, caplog, case: Case):
    path = write_case(tmp_path, case.mutate)
    with caplog.at_level(logging.WARNING, logger="segkit.data"):
        dataset = coco_dataset(path, on_error="skip")
        samples = read_all(dataset)
    left_out = dataset.left_out["images"] + dataset.left_out["annotations"] + len(dataset.skipped)
    assert left_out >= 1 and samples
    assert any("on_error=skip" in r.getMessage() and all(w in r.getMessage() for w in case.named)
               for r in caplog.records), caplog.text
    if case.name in ORPHANS:
        assert dataset.left_out["annotations"] >= 1
        return
    # Whatever is still read is drawn exactly as in the clean file: no label changed silently.
    clean = coco_dataset(write_case(tmp_path / "clean", None))
    clean_masks = {clean.images[i]["file_name"]: clean[i][1] for i in range(len(clean))}
    read_files = [dataset.images[i]["file_name"] for i in range(len(dataset)) if i not in dataset.skipped]
    for name in read_files:
        index = next(i for i in range(len(dataset)) if dataset.images[i]["file_name"] == name)
        if name in clean_masks and dataset.images[index]["id"] in (1, 2, 3):
            assert torch.equal(dataset[index][1], clean_masks[name]), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_data_lists_the_defect_in_one_line(tmp_path, monkeypatch, capsys, case: Case):
    path = write_case(tmp_path, case.mutate)
    monkeypatch.setattr(sys, "argv", ["segkit-check-data", *check_data_args(path)])
    with pytest.raises(SystemExit) as exit_info:
        check_data.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == (0 if case.warning else 1), out  # warnings alone do not fail the check
    named = (IMAGE_1,) if case.kind == "missing image" else (str(path), *case.named)  # see test_check_data
    lines = [line for line in out.splitlines() if line.startswith("train: ") and all(w in line for w in named)]
    assert lines, out
    assert f"{case.kind}: " in out.splitlines()[-1] or case.kind == "missing image", out


def test_check_data_lists_every_defect_at_once_with_counts(tmp_path):
    """One file, defects found when the file is read and when each image is drawn: all reported, no traceback."""
    data = base_coco()
    data["images"][1]["height"] = "40"  # image 2: wrong type (left out)
    data["images"].append({"id": 5, "file_name": "5.jpg", "height": 40, "width": 48})
    data["annotations"][0]["segmentation"] = [[100, 100, 140, 100, 140, 130]]  # image 1: outside
    data["annotations"][1]["segmentation"]["counts"] = "{{{"  # image 1: does not decode
    data["annotations"] += [
        {"id": 901, "image_id": 999, "category_id": 3, "segmentation": [[1, 1, 5, 1, 5, 5]]},  # no such image
        {"id": 501, "image_id": 5, "category_id": 7, "segmentation": [[4, 4, 24, 20]]},  # 2 points: warning
        {"id": 502, "image_id": 5, "category_id": 3, "segmentation": [[2, 2, 30, 2, 30, 30]]},
    ]

    def mutate(d, root):
        d.clear()
        d.update(data)
        Image.new("RGB", (48, 40)).save(root / "images" / "5.jpg")

    path = write_case(tmp_path, mutate)
    result = subprocess.run([sys.executable, "-m", "segkit.cli.check_data", *check_data_args(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("train: ")]
    expected = {"annotation id 101": "outside", "annotation id 102": "does not decode", "(id 2)": "height",
                "annotation id 901": "points to no image", "annotation id 501": "warning: "}
    for words, what in expected.items():
        assert sum(words in line and what in line for line in lines) == 1, (words, result.stdout)
    assert ("5 problems found: 4 errors, 1 warning (RLE does not decode: 1, outside the image: 1, unknown image_id: 1, "
            "wrong type: 1, zero-area polygon: 1)") in result.stdout
    assert "train: 3 samples, 2 readable" in result.stdout  # images 3 and 5 train; image 1 is left out


def test_masks_keep_the_drawing_rule_and_warned_polygons_are_drawn(tmp_path):
    def mutate(d, _root):
        d["annotations"][0]["segmentation"] = [[4, 4, 24, 20, 24, 4, 4, 20]]  # a bow tie: two triangles

    mask = coco_dataset(write_case(tmp_path, mutate))[0][1]
    assert mask[6, 12] == 0 and mask[12, 6] == 2 and mask[12, 22] == 2  # the crossing's lobes are the dog (2)
    assert mask[34, 5] == 3 and mask[34, 40] == 255  # cat (compressed RLE), crowd region ignored


def test_crowd_regions_as_their_class_for_cvat_brush_masks(tmp_path):
    path = write_case(tmp_path, None)
    ignored, as_class = coco_dataset(path)[0][1], coco_dataset(path, crowd="class")[0][1]
    assert ignored[34, 40] == 255 and as_class[34, 40] == 1  # the crowd RLE of cars (category 3 -> class 1)
    assert torch.equal(ignored[ignored != 255], as_class[ignored != 255])
    assert len(list((tmp_path / "cache").glob("coco-*"))) == 2  # each setting caches its own masks
    with pytest.raises(SegkitError, match="^dataset.crowd: must be ignore or class"):
        coco_dataset(path, crowd="person")


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (40, 48), (333, 500)])
def test_rle_string_decoder_matches_pycocotools(size):
    rng = np.random.default_rng(size[0])
    mask = (rng.random(size) < 0.3).astype(np.uint8)
    mask[: size[0] // 2] = 1  # long runs need several characters
    runs = rle_string_counts(compressed_rle(mask)["counts"])
    flat = mask.flatten(order="F")
    assert sum(runs) == flat.size
    assert np.array_equal(np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8), flat)


def test_images_and_annotations_named_with_their_file(tmp_path):
    """The one-line format: annotation file, annotation id, image file and id, what, fix."""
    def mutate(d, _root):
        d["annotations"][3]["segmentation"] = []

    path = write_case(tmp_path, mutate)
    with pytest.raises(SegkitError) as error:
        read_all(coco_dataset(path))
    assert str(error.value) == (
        f"{path}: annotation id 201 of image {tmp_path / 'images' / IMAGE_2} (id 2): segmentation is empty "
        "(a box-only annotation?); fix: draw the object's polygon or delete the annotation")


@pytest.mark.skipif(not (SHARED_DATA / "coco-val2017-subset").is_dir(), reason="shared COCO subset absent")
def test_shared_coco_subset_has_no_defects(tmp_path):
    root = SHARED_DATA / "coco-val2017-subset"
    dataset = CocoDataset(split="val", root=str(root), annotations={"val": "annotations/instances_val2017_subset.json"},
                          image_dir="images", name="coco", num_classes=81, ignore_index=255, image_size=[64, 64],
                          cache_dir=str(tmp_path))
    assert len(dataset) == 10 and dataset.left_out == {"images": 0, "annotations": 0}
    assert all(not dataset.label_problems(index) for index in range(len(dataset)))
    image, mask = dataset[0]
    assert image.shape == (3, 64, 64) and int(mask.max()) > 0
