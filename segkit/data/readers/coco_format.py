"""A COCO annotation file checked field by field, every defect as one line that names the file and the fix.

What segkit reads, and what it accepts (the COCO format documentation, cocodataset.org/#format-data):
- `categories`: a non-empty list of {"id": int, "name": non-empty str}, ids and names unique.
- `images`: a non-empty list of {"id": int, "file_name": relative path, "height": int > 0,
  "width": int > 0}; an image listed twice with the same fields is one image.
- `annotations`: a non-empty list of {"id": int (unique), "image_id": an image's id,
  "category_id": a category's id, "iscrowd": 0 or 1 (absent = 0), "segmentation": ...}, where
  the segmentation is polygons [[x1, y1, x2, y2, ...], ...] (at least 3 points each, inside the
  image), uncompressed RLE {"size": [h, w], "counts": [run, ...]} or compressed RLE
  {"size": [h, w], "counts": "string"}, with [h, w] the image's height and width.
- `bbox`, `area` and everything else are not used for masks and not checked.

Who pays for a defect: problems with the file itself or its categories stop everything (the
classes are not known). An image entry that is wrong leaves out that image. An annotation
that is wrong leaves out its whole image, because drawing the image without it would label
that object as background; an annotation that points to no image is left out alone.
Warnings leave the mask as pycocotools draws it: a polygon that covers no pixel (fewer than
3 points, all on one line, or smaller than a pixel) and a self-intersecting polygon.

The file-level checks run when the reader is built (one pass over the JSON); the geometry of an
image's annotations is checked when that image's mask is first drawn (`segmentation_problems`),
and by segkit-check-data for every image.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

import numpy as np
from pycocotools import mask as mask_utils

from segkit.data.readers.base import Problem

Annotation = dict[str, Any]
EDGE_TOLERANCE = 1.0  # pixels a vertex may lie outside the image (tools snap to the border, not inside it)
MAX_INTERSECTION_VERTICES = 1000  # longer polygons skip the (quadratic) self-intersection check


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class CocoFile:
    """The validated content of one annotation file; `problems` lists what was left out and why."""

    path: Path
    image_dir: Path
    categories: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)  # valid images, sorted by id
    annotations: dict[int, list[Annotation]] = field(default_factory=dict)  # image id -> its annotations
    problems: list[Problem] = field(default_factory=list)  # images / annotations left out
    fatal: list[Problem] = field(default_factory=list)  # nothing can be read while these remain
    left_out_images: int = 0
    left_out_annotations: int = 0

    # --- one-line problem texts -------------------------------------------------------------
    def image_label(self, image: Any, position: int) -> str:
        name = image.get("file_name") if isinstance(image, dict) else None
        image_id = image.get("id") if isinstance(image, dict) else None
        shown = self.image_dir / name if isinstance(name, str) and name else f"images[{position}]"
        return f"image {shown} (id {image_id!r})"

    def image_problem(self, image: Any, position: int, what: str, fix: str, kind: str,
                      warning: bool = False) -> Problem:
        return Problem(f"{self.path}: {self.image_label(image, position)}: {what}; fix: {fix}", kind, warning)

    def annotation_problem(self, ann: Any, position: int, image: dict[str, Any] | None, what: str, fix: str,
                           kind: str, warning: bool = False) -> Problem:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"annotation id {ann_id!r}" if ann_id is not None else f"annotations[{position}]"
        if image is not None:
            where += f" of {self.image_label(image, -1)}"
        elif isinstance(ann, dict) and "image_id" in ann:
            where += f" (image_id {ann['image_id']!r})"
        return Problem(f"{self.path}: {where}: {what}; fix: {fix}", kind, warning)

    def file_problem(self, what: str, fix: str, kind: str) -> Problem:
        return Problem(f"{self.path}: {what}; fix: {fix}", kind)


def read_coco(path: Path, image_dir: Path) -> tuple[bytes, CocoFile]:
    """The file's bytes (for the mask cache key) and its validated content."""
    coco = CocoFile(path, image_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        coco.fatal.append(coco.file_problem("annotation file not found", "check dataset.root and "
                                            "dataset.annotations", "missing file"))
        return b"", coco
    except OSError as error:
        coco.fatal.append(coco.file_problem(f"cannot read ({error.strerror or error})", "check its permissions",
                                            "unreadable file"))
        return b"", coco
    data = _parse_json(coco, raw)
    if data is None:  # unparsable: the problem is in coco.fatal
        return raw, coco
    _check_lists(coco, data)
    if not coco.fatal:
        _check_categories(coco, data["categories"])
    if not coco.fatal:
        images = _check_images(coco, data["images"])
        _check_annotations(coco, data["annotations"], images)
    return raw, coco


def _parse_json(coco: CocoFile, raw: bytes) -> dict[str, Any] | None:
    if not raw:
        coco.fatal.append(coco.file_problem("empty file (0 bytes)", "the file is wrong, export or copy it again",
                                            "empty file"))
        return None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows tools) is allowed
    except UnicodeDecodeError as error:
        coco.fatal.append(coco.file_problem(f"not UTF-8 text (byte {error.start})", "save the file as UTF-8 JSON",
                                            "invalid JSON"))
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        coco.fatal.append(coco.file_problem(
            f"invalid JSON at line {error.lineno} column {error.colno} ({error.msg})",
            "export the annotations again (a truncated or hand-edited file?)", "invalid JSON"))
        return None
    except RecursionError:
        coco.fatal.append(coco.file_problem("invalid JSON (nested too deeply)", "export the annotations again",
                                            "invalid JSON"))
        return None
    if not isinstance(data, dict):
        coco.fatal.append(coco.file_problem(
            f"the top level is a {type_name(data)}, not an object with images, annotations and categories",
            "use a COCO instances file", "wrong type"))
        return None
    return data


def _check_lists(coco: CocoFile, data: dict[str, Any]) -> None:
    fixes = {
        "images": "list every image with id, file_name, height and width",
        "annotations": "use the instances file with segmentations (a test-set image-info file has none)",
        "categories": "list the classes as {\"id\": ..., \"name\": ...}",
    }
    for key, fix in fixes.items():
        value = data.get(key)
        if key not in data:
            coco.fatal.append(coco.file_problem(f"no '{key}' list", fix, "missing key"))
        elif not isinstance(value, list):
            coco.fatal.append(coco.file_problem(f"'{key}' is a {type_name(value)}, expected a list", fix,
                                                "wrong type"))
        elif not value:
            coco.fatal.append(coco.file_problem(f"'{key}' is empty", fix, "empty list"))


def _check_categories(coco: CocoFile, categories: list[Any]) -> None:
    valid = []
    for position, category in enumerate(categories):
        where = f"categories[{position}]"
        if not isinstance(category, dict):
            coco.fatal.append(coco.file_problem(f"{where} is a {type_name(category)}, expected an object",
                                                "write each category as {\"id\": int, \"name\": str}", "wrong type"))
            continue
        cat_id, name = category.get("id"), category.get("name")
        if not is_int(cat_id):
            what = "has no id" if "id" not in category else f"id {cat_id!r} is a {type_name(cat_id)}"
            coco.fatal.append(coco.file_problem(f"{where} {what}, expected an integer",
                                                "give every category an integer id", "bad category"))
        elif not isinstance(name, str) or not name.strip():
            coco.fatal.append(coco.file_problem(f"{where} (id {cat_id}) has no name (got {name!r})",
                                                "give every category a non-empty name", "bad category"))
        else:
            valid.append(category)
    for key in ("id", "name"):
        counts = Counter(c[key] for c in valid)
        for value, count in sorted(counts.items(), key=lambda item: str(item[0])):
            if count > 1:
                coco.fatal.append(coco.file_problem(
                    f"category {key} {value!r} is used by {count} categories",
                    f"give each category its own {key} (merge them if they are one class)", "duplicate category"))
    coco.categories = sorted(valid, key=lambda c: c["id"])


def _check_images(coco: CocoFile, images: list[Any]) -> dict[int, dict[str, Any] | None]:
    """Fill coco.images; return id -> image for every id listed (None: that image is left out)."""
    left_out: set[int] = set()
    by_id: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for position, image in enumerate(images):
        problem = _image_problem(coco, image, position)
        if problem is None:
            by_id[image["id"]].append((position, image))
            continue
        coco.problems.append(problem)
        coco.left_out_images += 1
        if isinstance(image, dict) and is_int(image.get("id")):
            left_out.add(image["id"])
    kept = []
    for image_id, entries in by_id.items():
        first = entries[0][1]
        if image_id not in left_out and all(entry == first for _, entry in entries):
            kept.append(first)
            for position, entry in entries[1:]:  # the same entry again: one image, the repeats are dropped
                coco.problems.append(coco.image_problem(
                    entry, position, f"listed {len(entries)} times (read once)", "list each image once",
                    "image listed twice", warning=True))
            continue
        for position, entry in entries:
            coco.problems.append(coco.image_problem(
                entry, position, f"id {image_id} is used by {len(entries) + (image_id in left_out)} different images",
                "give each image its own id (its annotations cannot be attributed)", "duplicate image id"))
        coco.left_out_images += len(entries)
        left_out.add(image_id)
    names = Counter(image["file_name"] for image in kept)
    for image in kept:
        if names[image["file_name"]] > 1:
            coco.problems.append(coco.image_problem(
                image, -1, f"file_name is listed under {names[image['file_name']]} image ids",
                "merge the entries (each would train on part of the labels)", "duplicate file_name"))
            coco.left_out_images += 1
            left_out.add(image["id"])
    coco.images = sorted((image for image in kept if image["id"] not in left_out), key=lambda i: i["id"])
    coco.annotations = {image["id"]: [] for image in coco.images}
    return {image_id: None for image_id in left_out} | {image["id"]: image for image in coco.images}


def _image_problem(coco: CocoFile, image: Any, position: int) -> Problem | None:
    if not isinstance(image, dict):
        return coco.image_problem(image, position, f"is a {type_name(image)}, expected an object",
                                  "write each image as {\"id\", \"file_name\", \"height\", \"width\"}", "wrong type")
    for key in ("id", "file_name", "height", "width"):
        if key not in image:
            return coco.image_problem(image, position, f"has no '{key}'", f"add the image's {key}", "missing key")
    if not is_int(image["id"]):
        return coco.image_problem(image, position, f"id is a {type_name(image['id'])}, expected an integer",
                                  "use integer image ids", "wrong type")
    name = image["file_name"]
    if not isinstance(name, str) or not name.strip():
        return coco.image_problem(image, position, f"file_name {name!r} is not a file name",
                                  "write the image's file name", "wrong type")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or Path(name).is_absolute():
        return coco.image_problem(image, position, f"file_name {name!r} leaves dataset.image_dir",
                                  "write file names relative to dataset.image_dir", "bad file_name")
    for key in ("height", "width"):
        value = image[key]
        if not is_int(value) or value <= 0:
            shown = f"{value!r} ({type_name(value)})"
            return coco.image_problem(image, position, f"{key} {shown} is not a positive integer",
                                      f"write the image's pixel {key} as an integer", "wrong type")
    return None


def _check_annotations(coco: CocoFile, annotations: list[Any], images: dict[int, dict[str, Any] | None]) -> None:
    category_ids = {c["id"] for c in coco.categories}
    ids = Counter(a.get("id") for a in annotations if isinstance(a, dict) and is_int(a.get("id")))
    broken_images: set[int] = set()
    for position, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if is_int(image_id) and image_id in images and images[image_id] is None:
            coco.left_out_annotations += 1  # its image is left out, and reported
            continue
        image = images.get(image_id) if is_int(image_id) else None
        problem = _annotation_problem(coco, ann, position, image, category_ids, ids)
        if problem is None:
            assert is_int(image_id)  # no problem: it names an image that is kept
            coco.annotations[image_id].append(ann)
        elif image is None:  # it belongs to no image: only the annotation is left out
            coco.problems.append(problem)
            coco.left_out_annotations += 1
        else:  # drawing its image without it would label the object background: leave the image out
            assert is_int(image_id)  # an image was found under it
            coco.problems.append(problem)
            broken_images.add(image_id)
    coco.left_out_images += len(broken_images)
    coco.images = [image for image in coco.images if image["id"] not in broken_images]
    for image_id in broken_images:
        coco.left_out_annotations += len(coco.annotations.pop(image_id))


def _annotation_problem(
    coco: CocoFile, ann: Any, position: int, image: dict[str, Any] | None, category_ids: set[int], ids: Counter
) -> Problem | None:
    def problem(what: str, fix: str, kind: str) -> Problem:
        return coco.annotation_problem(ann, position, image, what, fix, kind)

    if not isinstance(ann, dict):
        return problem(f"is a {type_name(ann)}, expected an object", "write each annotation as an object",
                       "wrong type")
    image_id = ann.get("image_id")
    if "image_id" not in ann:
        return problem("has no image_id", "add the id of the image it belongs to", "missing key")
    if not is_int(image_id):
        return problem(f"image_id is a {type_name(image_id)}, expected an integer", "use the image's integer id",
                       "wrong type")
    if image is None:
        return problem("points to no image", "add the image to 'images' or delete the annotation",
                       "unknown image_id")
    if "id" not in ann:
        return problem("has no id", "give every annotation a unique integer id", "missing key")
    if not is_int(ann["id"]):
        return problem(f"id is a {type_name(ann['id'])}, expected an integer", "use integer annotation ids",
                       "wrong type")
    if ids[ann["id"]] > 1:
        return problem(f"id is used by {ids[ann['id']]} annotations", "give every annotation its own id",
                       "duplicate annotation id")
    category = ann.get("category_id")
    if "category_id" not in ann:
        return problem("has no category_id", "add the object's category id", "missing key")
    if not is_int(category) or category not in category_ids:
        shown = sorted(category_ids)[:10]
        more = "..." if len(category_ids) > 10 else ""
        return problem(f"category_id {category!r} is not a category",
                       f"use one of the category ids {shown}{more} or add the category", "unknown category_id")
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):
        return problem(f"iscrowd is {crowd!r}, expected 0 or 1", "write iscrowd as 0 (an object) or 1 (a crowd)",
                       "wrong type")
    if "segmentation" not in ann:
        return problem("has no segmentation", "draw the object's polygon or delete the annotation", "missing key")
    return None


# --- geometry, checked when an image's mask is drawn -------------------------------------------

def segmentation_problems(
    coco: CocoFile, image: dict[str, Any], anns: Sequence[Annotation]
) -> tuple[list[tuple[Annotation, dict[str, Any]]], list[Problem]]:
    """(annotation, RLE) for each drawable annotation of `image`, and every problem (errors and warnings)."""
    height, width = image["height"], image["width"]
    drawable, problems = [], []
    for ann in anns:
        def problem(what: str, fix: str, kind: str, warning: bool = False, ann: Annotation = ann) -> Problem:
            return coco.annotation_problem(ann, -1, image, what, fix, kind, warning)

        rle, found = _segmentation_rle(ann["segmentation"], height, width, problem)
        problems += found
        if rle is not None and not any(not p.warning for p in found):
            if not found and int(mask_utils.area(rle)) == 0:
                problems.append(problem("covers no pixel", "redraw the object (normalised 0..1 coordinates?) "
                                        "or delete it", "zero-area polygon", warning=True))
            drawable.append((ann, rle))
    return drawable, problems


def _segmentation_rle(segmentation: Any, height: int, width: int, problem) -> tuple[dict | None, list[Problem]]:
    if isinstance(segmentation, list):
        return _polygons_rle(segmentation, height, width, problem)
    if isinstance(segmentation, dict):
        return _rle(segmentation, height, width, problem)
    return None, [problem(f"segmentation is a {type_name(segmentation)}, expected polygons or RLE",
                          "export polygons [[x1, y1, ...]] or RLE {size, counts}", "wrong type")]


def _polygons_rle(polygons: list[Any], height: int, width: int, problem) -> tuple[dict | None, list[Problem]]:
    if not polygons:
        return None, [problem("segmentation is empty (a box-only annotation?)",
                              "draw the object's polygon or delete the annotation", "empty segmentation")]
    if all(is_number(v) for v in polygons):
        return None, [problem("segmentation is a flat list of numbers, not a list of polygons",
                              "wrap it: [[x1, y1, x2, y2, ...]]", "bad polygon")]
    found, usable = [], []
    for number, polygon in enumerate(polygons):
        where = f"polygon {number}"
        if not isinstance(polygon, list) or not all(is_number(v) for v in polygon):
            bad = polygon if not isinstance(polygon, list) else next(v for v in polygon if not is_number(v))
            found.append(problem(f"{where} holds {bad!r} ({type_name(bad)}), not finite x, y numbers",
                                 "export numeric pixel coordinates", "bad polygon"))
            continue
        if len(polygon) % 2:
            found.append(problem(f"{where} has an odd number of coordinates ({len(polygon)})",
                                 "export x, y pairs", "bad polygon"))
            continue
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        outside = ((points[:, 0] < -EDGE_TOLERANCE) | (points[:, 0] > width + EDGE_TOLERANCE)
                   | (points[:, 1] < -EDGE_TOLERANCE) | (points[:, 1] > height + EDGE_TOLERANCE))
        if outside.any():
            x, y = points[outside][0]
            found.append(problem(f"{where} has a point ({x:g}, {y:g}) outside the {width}x{height} image",
                                 "check the image's width/height, or the coordinates' scale", "outside the image"))
            continue
        if len(points) >= 3 and _self_intersects(points):  # before the area: a bow tie's lobes cancel out
            found.append(problem(f"{where} crosses itself (drawn even-odd: overlapping loops become holes)",
                                 "redraw it as a simple outline", "self-intersecting polygon", warning=True))
        elif len(points) < 3 or _shoelace_area(points) == 0:
            shape = f"{len(points)} points" if len(points) < 3 else "its points lie on a line"
            found.append(problem(f"{where} has no area ({shape})",
                                 "redraw the object or delete the polygon", "zero-area polygon", warning=True))
            continue
        usable.append(polygon)
    if not usable:
        return None, found
    return mask_utils.merge(mask_utils.frPyObjects(usable, height, width)), found


def _rle(rle: dict[str, Any], height: int, width: int, problem) -> tuple[dict | None, list[Problem]]:
    size, counts = rle.get("size"), rle.get("counts")
    if "size" not in rle or "counts" not in rle:
        missing = [key for key in ("size", "counts") if key not in rle]
        return None, [problem(f"RLE segmentation has no {' or '.join(missing)}",
                              "export RLE as {\"size\": [h, w], \"counts\": ...}", "bad RLE")]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        return None, [problem(f"RLE size {size!r} is not [height, width]", "export RLE with its image's size",
                              "bad RLE")]
    if size != [height, width]:
        return None, [problem(f"RLE size {size} differs from the image's [height, width] [{height}, {width}]",
                              "encode the mask at the image's size, or fix the image's height/width",
                              "RLE size mismatch")]
    if isinstance(counts, list):
        if not all(is_int(v) and v >= 0 for v in counts):
            return None, [problem("uncompressed RLE counts are not non-negative integers", "export the RLE again",
                                  "bad RLE")]
        runs = counts
    elif isinstance(counts, str):
        try:
            runs = rle_string_counts(counts)
        except ValueError as error:
            return None, [problem(f"compressed RLE does not decode ({error})", "export the RLE again",
                                  "RLE does not decode")]
    else:
        return None, [problem(f"RLE counts is a {type_name(counts)}, expected a list or a string",
                              "export the RLE again", "bad RLE")]
    if any(v < 0 for v in runs) or sum(runs) != height * width:
        return None, [problem(f"RLE runs cover {sum(runs)} pixels, the {height}x{width} image has "
                              f"{height * width}", "export the RLE again (for this image)", "RLE does not decode")]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width), []
    return {"size": size, "counts": counts.encode()}, []


def rle_string_counts(text: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' rleFrString), checked as it goes:
    pycocotools' own decoder does not check, and writes past the mask on a bad string."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("the string ends inside a number")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {text[position]!r} at {position} is not RLE")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _shoelace_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _self_intersects(points: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed polygon cross (touching ends do not count)."""
    keep = np.any(points != np.roll(points, -1, axis=0), axis=1)  # drop repeated consecutive points
    points = points[keep]
    n = len(points)
    if n < 4 or n > MAX_INTERSECTION_VERTICES:
        return False
    start, end = points, np.roll(points, -1, axis=0)
    i, j = np.triu_indices(n, k=2)
    adjacent = (i == 0) & (j == n - 1)  # the closing edge touches the first
    i, j = i[~adjacent], j[~adjacent]

    def side(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))

    p, q, r, s = start[i], end[i], start[j], end[j]
    crosses = (side(p, q, r) * side(p, q, s) < 0) & (side(r, s, p) * side(r, s, q) < 0)
    return bool(crosses.any())
