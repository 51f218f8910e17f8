"""Malformed COCO annotation files, the kinds labelling tools and converters produce.

Sources: the COCO format documentation (cocodataset.org/#format-data) for what a field must be,
and what exports get wrong in practice: CVAT and Label Studio write box-only annotations with
`"segmentation": []` and Label Studio absolute `file_name`s; labelme2coco-style converters write
flat polygon lists, string or float numbers, normalised coordinates and duplicated ids when files
are merged; hand edits truncate the JSON or save it as Latin-1 or with a BOM.

Each case mutates a small valid file (`base_coco`) and says which defect kind must be reported and
which words (annotation id, image file) its one line must contain. This module only builds files
(numpy, PIL, pycocotools), so it can also be run against an older segkit to count what it did.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

HEIGHT, WIDTH = 40, 48
IMAGE_1, IMAGE_2, IMAGE_3 = "000000000001.jpg", "000000000002.jpg", "000000000003.jpg"
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "cat"}]


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": ([0] if flat[0] else []) + runs}


def base_coco() -> dict[str, Any]:
    """Three 40x48 images; image 1 has a polygon (id 101), a compressed RLE (102) and a crowd RLE (103)."""
    return {
        "images": [{"id": i, "file_name": name, "height": HEIGHT, "width": WIDTH}
                   for i, name in enumerate((IMAGE_1, IMAGE_2, IMAGE_3), start=1)],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [4, 4, 20, 16], "area": 320.0,
             "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]]},
            {"id": 102, "image_id": 1, "category_id": 11, "iscrowd": 0, "bbox": [30, 2, 8, 8], "area": 64.0,
             "segmentation": compressed_rle(_box(30, 2, 38, 10))},
            {"id": 103, "image_id": 1, "category_id": 3, "iscrowd": 1, "bbox": [36, 30, 10, 8], "area": 80.0,
             "segmentation": uncompressed_rle(_box(30, 36, 38, 46))},
            {"id": 201, "image_id": 2, "category_id": 3, "iscrowd": 0, "bbox": [10, 10, 20, 20], "area": 400.0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 301, "image_id": 3, "category_id": 11, "iscrowd": 0, "bbox": [0, 0, 48, 20], "area": 960.0,
             "segmentation": [[0, 0, 48, 0, 48, 20, 0, 20]]},
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }


def write_images(image_dir: Path) -> None:
    rng = np.random.default_rng(0)
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in (IMAGE_1, IMAGE_2, IMAGE_3):
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image_dir / name)


Mutation = Callable[[dict[str, Any], Path], "dict[str, Any] | bytes | None"]


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Mutation  # edits the data in place (returns None), or returns the file's bytes
    kind: str  # the defect kind reported
    named: tuple[str, ...] = ()  # words the line must contain besides the annotation file
    fatal: bool = False  # the file cannot be used at all
    warning: bool = False  # reported, but the image is still used as drawn


def ann(data: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def image(data: dict[str, Any], image_id: int) -> dict[str, Any]:
    return next(i for i in data["images"] if i["id"] == image_id)


def _set(getter, key: str, value: Any) -> Mutation:
    def mutate(data: dict[str, Any], _root: Path) -> None:
        getter(data)[key] = value
    return mutate


def _delete(getter, key: str) -> Mutation:
    def mutate(data: dict[str, Any], _root: Path) -> None:
        del getter(data)[key]
    return mutate


def _replace(key: str, value: Any) -> Mutation:
    def mutate(data: dict[str, Any], _root: Path) -> None:
        data[key] = value
    return mutate


def _without(key: str) -> Mutation:
    def mutate(data: dict[str, Any], _root: Path) -> None:
        del data[key]
    return mutate


def _raw(make: Callable[[dict[str, Any]], bytes]) -> Mutation:
    return lambda data, _root: make(data)


def _segmentation(ann_id: int, value: Any) -> Mutation:
    return _set(lambda d: ann(d, ann_id), "segmentation", value)


def _resave_image(size: tuple[int, int]) -> Mutation:
    def mutate(_data: dict[str, Any], root: Path) -> None:
        Image.new("RGB", (size[1], size[0])).save(root / "images" / IMAGE_1)
    return mutate


def _remove_image_file(_data: dict[str, Any], root: Path) -> None:
    (root / "images" / IMAGE_1).unlink()


def _append(key: str, make: Callable[[dict[str, Any]], Any]) -> Mutation:
    def mutate(data: dict[str, Any], _root: Path) -> None:
        data[key].append(make(data))
    return mutate


A1 = lambda d: ann(d, 101)  # noqa: E731 - the polygon annotation of image 1
I1 = lambda d: image(d, 1)  # noqa: E731
ANN_101, ANN_102, ANN_103 = "annotation id 101", "annotation id 102", "annotation id 103"

CASES = [
    # --- the file itself ---
    Case("truncated_json", _raw(lambda d: json.dumps(d).encode()[:200]), "invalid JSON", ("line 1",), fatal=True),
    Case("latin1_bytes", _raw(lambda d: json.dumps(d).replace("dog", "d\u00e9g").encode("latin-1").replace(
        b"\\u00e9", b"\xe9")), "invalid JSON", ("UTF-8",), fatal=True),
    Case("top_level_list", _raw(lambda d: json.dumps([d]).encode()), "wrong type", ("top level",), fatal=True),
    Case("no_images_key", _without("images"), "missing key", ("'images'",), fatal=True),
    Case("images_is_a_dict", _replace("images", {"1": {"file_name": IMAGE_1}}), "wrong type", ("'images'",),
         fatal=True),
    Case("images_empty", _replace("images", []), "empty list", ("'images'",), fatal=True),
    Case("no_annotations_key", _without("annotations"), "missing key", ("'annotations'",), fatal=True),
    Case("annotations_empty", _replace("annotations", []), "empty list", ("'annotations'",), fatal=True),
    Case("no_categories_key", _without("categories"), "missing key", ("'categories'",), fatal=True),
    Case("categories_empty", _replace("categories", []), "empty list", ("'categories'",), fatal=True),
    # --- categories ---
    Case("category_without_name", _delete(lambda d: d["categories"][1], "name"), "bad category",
         ("categories[1]",), fatal=True),
    Case("category_id_string", _set(lambda d: d["categories"][0], "id", "3"), "bad category",
         ("categories[0]",), fatal=True),
    Case("category_ids_repeated", _set(lambda d: d["categories"][2], "id", 7), "duplicate category",
         ("id 7",), fatal=True),
    Case("category_names_repeated", _set(lambda d: d["categories"][2], "name", "dog"), "duplicate category",
         ("name 'dog'",), fatal=True),
    Case("category_is_a_string", _append("categories", lambda d: "bird"), "wrong type", ("categories[3]",),
         fatal=True),
    # --- images ---
    Case("image_without_file_name", _delete(I1, "file_name"), "missing key", ("images[0]", "file_name")),
    Case("image_without_height", _delete(I1, "height"), "missing key", (IMAGE_1, "height")),
    Case("image_id_string", _set(I1, "id", "1"), "wrong type", (IMAGE_1,)),
    Case("image_height_string", _set(I1, "height", "40"), "wrong type", (IMAGE_1, "height")),
    Case("image_width_float", _set(I1, "width", 48.0), "wrong type", (IMAGE_1, "width")),
    Case("image_height_zero", _set(I1, "height", 0), "wrong type", (IMAGE_1, "height")),
    Case("image_absolute_file_name", _set(I1, "file_name", "/data/upload/1/" + IMAGE_1), "bad file_name",
         ("/data/upload/1/",)),
    Case("image_file_name_escapes", _set(I1, "file_name", "../" + IMAGE_1), "bad file_name", ("../",)),
    Case("image_entry_null", _append("images", lambda d: None), "wrong type", ("images[3]",)),
    Case("image_file_missing", _remove_image_file, "missing image", (IMAGE_1,)),
    Case("image_size_differs", _resave_image((HEIGHT, WIDTH + 8)), "image size mismatch", (IMAGE_1, "40x56")),
    Case("image_rotated", _resave_image((WIDTH, HEIGHT)), "image size mismatch", (IMAGE_1, "48x40")),
    Case("image_id_reused", _append("images", lambda d: {**image(d, 1), "file_name": IMAGE_2}),
         "duplicate image id", (IMAGE_1, "id 1")),
    Case("image_listed_under_two_ids", _set(lambda d: image(d, 2), "file_name", IMAGE_1), "duplicate file_name",
         (IMAGE_1,)),
    Case("image_listed_twice", _append("images", lambda d: dict(image(d, 1))), "image listed twice",
         (IMAGE_1, "listed 2 times"), warning=True),
    # --- annotations: keys, ids and references ---
    Case("annotation_is_a_list", _append("annotations", lambda d: [1, 2, 3]), "wrong type", ("annotations[5]",)),
    Case("annotation_without_image_id", _delete(A1, "image_id"), "missing key", (ANN_101, "image_id")),
    Case("annotation_image_id_string", _set(A1, "image_id", "1"), "wrong type", (ANN_101, "image_id")),
    Case("annotation_points_to_nothing", _set(A1, "image_id", 999), "unknown image_id", (ANN_101, "999")),
    Case("annotation_without_id", _delete(A1, "id"), "missing key", ("annotations[0]", IMAGE_1)),
    Case("annotation_id_float", _set(A1, "id", 101.0), "wrong type", ("101.0", IMAGE_1)),
    Case("annotation_ids_repeated", _set(lambda d: ann(d, 102), "id", 101), "duplicate annotation id",
         (ANN_101, IMAGE_1)),
    Case("annotation_unknown_category", _set(A1, "category_id", 99), "unknown category_id", (ANN_101, "99")),
    Case("annotation_without_category", _delete(A1, "category_id"), "missing key", (ANN_101, "category_id")),
    Case("annotation_category_string", _set(A1, "category_id", "dog"), "unknown category_id", (ANN_101, "'dog'")),
    Case("iscrowd_string", _set(A1, "iscrowd", "0"), "wrong type", (ANN_101, "iscrowd")),
    Case("iscrowd_two", _set(A1, "iscrowd", 2), "wrong type", (ANN_101, "iscrowd")),
    Case("annotation_without_segmentation", _delete(A1, "segmentation"), "missing key", (ANN_101, "segmentation")),
    # --- polygons ---
    Case("segmentation_null", _segmentation(101, None), "wrong type", (ANN_101, IMAGE_1)),
    Case("segmentation_string", _segmentation(101, "polygon"), "wrong type", (ANN_101,)),
    Case("box_only_empty_segmentation", _segmentation(101, []), "empty segmentation", (ANN_101, IMAGE_1)),
    Case("flat_polygon", _segmentation(101, [4, 4, 24, 4, 24, 20, 4, 20]), "bad polygon", (ANN_101, "flat")),
    Case("polygon_odd_length", _segmentation(101, [[4, 4, 24, 4, 24, 20, 4]]), "bad polygon", (ANN_101, "odd")),
    Case("polygon_string_numbers", _segmentation(101, [["4", "4", "24", "4", "24", "20"]]), "bad polygon",
         (ANN_101, "'4'")),
    Case("polygon_null_number", _segmentation(101, [[4, 4, 24, None, 24, 20]]), "bad polygon", (ANN_101, "None")),
    Case("polygon_nan", _raw(lambda d: json.dumps(d).replace("[[4, 4, 24, 4,", "[[4, NaN, 24, 4,").encode()),
         "bad polygon", (ANN_101, "nan")),
    Case("polygon_not_a_list", _segmentation(101, [{"x": 4, "y": 4}]), "bad polygon", (ANN_101,)),
    Case("polygon_outside_image", _segmentation(101, [[100, 100, 140, 100, 140, 130]]), "outside the image",
         (ANN_101, "(100, 100)")),
    Case("polygon_scaled_twice", _segmentation(101, [[8, 8, 48, 8, 48, 80, 8, 80]]), "outside the image",
         (ANN_101, "(48, 80)")),
    Case("polygon_two_points", _segmentation(101, [[4, 4, 24, 20]]), "zero-area polygon", (ANN_101, "2 points"),
         warning=True),
    Case("polygon_on_a_line", _segmentation(101, [[4, 4, 14, 14, 24, 24]]), "zero-area polygon",
         (ANN_101, "line"), warning=True),
    Case("polygon_normalised", _segmentation(101, [[0.1, 0.1, 0.5, 0.1, 0.5, 0.4, 0.1, 0.4]]),
         "zero-area polygon", (ANN_101, "covers no pixel"), warning=True),
    Case("polygon_self_intersecting", _segmentation(101, [[4, 4, 24, 20, 24, 4, 4, 20]]),
         "self-intersecting polygon", (ANN_101, "crosses itself"), warning=True),
    # --- RLE ---
    Case("rle_size_mismatch", _set(lambda d: ann(d, 102)["segmentation"], "size", [HEIGHT, WIDTH + 1]),
         "RLE size mismatch", (ANN_102, IMAGE_1)),
    Case("rle_size_string", _set(lambda d: ann(d, 102)["segmentation"], "size", "40x48"), "bad RLE", (ANN_102,)),
    Case("rle_without_counts", _delete(lambda d: ann(d, 102)["segmentation"], "counts"), "bad RLE",
         (ANN_102, "counts")),
    Case("rle_counts_number", _set(lambda d: ann(d, 102)["segmentation"], "counts", 17), "bad RLE", (ANN_102,)),
    Case("rle_string_garbage", _set(lambda d: ann(d, 102)["segmentation"], "counts", "{{{ not rle ~~~"),
         "RLE does not decode", (ANN_102,)),
    Case("rle_string_truncated", lambda d, _r: ann(d, 102)["segmentation"].update(
        counts=ann(d, 102)["segmentation"]["counts"][:-3]), "RLE does not decode", (ANN_102,)),
    Case("rle_string_of_another_size", _set(lambda d: ann(d, 102)["segmentation"], "counts",
                                            compressed_rle(np.ones((HEIGHT * 2, WIDTH), np.uint8))["counts"]),
         "RLE does not decode", (ANN_102,)),
    Case("rle_runs_short", lambda d, _r: ann(d, 103)["segmentation"]["counts"].pop(), "RLE does not decode",
         (ANN_103,)),
    Case("rle_negative_run", lambda d, _r: ann(d, 103)["segmentation"]["counts"].__setitem__(0, -5), "bad RLE",
         (ANN_103,)),
]

# Variants that are not defects: each must load, with the masks of the base file.
ACCEPTED: dict[str, Mutation] = {
    "utf8_bom": _raw(lambda d: b"\xef\xbb\xbf" + json.dumps(d).encode()),
    "iscrowd_absent": _delete(A1, "iscrowd"),
    "iscrowd_bool": _set(A1, "iscrowd", False),
    "extra_fields": _set(A1, "attributes", {"occluded": False, "track_id": 3}),
    "image_without_annotations": _append("images", lambda d: {**image(d, 2), "id": 4, "file_name": "extra.jpg"}),
}


def write_case(root: Path, mutate: Mutation | None, name: str = "instances.json") -> Path:
    """root/images/ with the two images and root/annotations/<name> mutated; returns the annotation file."""
    write_images(root / "images")
    data = base_coco()
    result = mutate(data, root) if mutate is not None else None
    if "extra.jpg" in json.dumps(data):
        Image.new("RGB", (WIDTH, HEIGHT)).save(root / "images" / "extra.jpg")
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(result if isinstance(result, bytes) else json.dumps(data).encode())
    return path
