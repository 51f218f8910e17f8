"""The evaluation report's browsing parts: the per-class side panel, the table of every image, their script.

Progressive enhancement: the panel and the images with figures are plain HTML, readable without scripts.
report.js (beside report.html) sorts the panel, lists a chosen class's worst images and replaces the static
rows with a paged, sortable table of every image, whose numbers it reads from data.js: a script file, not
JSON, because a page opened from file:// may load scripts beside it but not fetch() a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segkit import safe_files
from segkit.reporting.markup import attribute_number, escaped, hex_color, img, number, relative_url, script_literal

SCRIPT = "report.js"
DATA_SCRIPT = "data.js"


@dataclass(frozen=True)
class ImageRow:
    """One evaluated image as the report lists it."""

    filename: str
    miou: float | None
    pixel_accuracy: float | None
    per_class_iou: Sequence[float | None]  # in the order of the report's classes; None: not in ground truth/prediction
    figure: Path | None = None  # prediction | ground truth | errors (segkit.reporting.plots.save_comparison)
    uncertainty: Path | None = None  # the uncertainty maps (plots.save_uncertainty_panels), uncertainty_maps=true


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with Image.open(path) as picture:
        return picture.size


def class_pixels(summary: Mapping[str, Any], count: int) -> list[int]:
    """Ground-truth pixels of each class: the confusion matrix's row sums."""
    confusion = np.asarray(summary["confusion_matrix"])
    pixels = [int(v) for v in confusion.sum(1)] if confusion.size else []
    return pixels + [0] * (count - len(pixels))


def compact_count(value: int) -> str:
    """1234567 -> 1.2M: pixel counts in the narrow panel."""
    for limit, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def class_panel(summary: Mapping[str, Any], class_names: Sequence[str], palette: np.ndarray) -> str:
    """The side panel: IoU, Dice and pixels per class, a button per class, and the list the script fills."""
    iou, dice = summary["per_class_iou"], summary["per_class_dice"]
    pixels = class_pixels(summary, len(class_names))
    rows = "".join(
        f'<tr data-class="{i}" data-name="{escaped(name)}" data-iou="{attribute_number(iou[name])}" '
        f'data-dice="{attribute_number(dice[name])}" data-pixels="{pixels[i]}">'
        f'<th scope="row"><button type="button" class="class-pick" aria-pressed="false">'
        f'<span class="swatch" style="background:{hex_color(palette[i])}"></span>{escaped(name)}</button></th>'
        f"<td>{number(iou[name])}</td><td>{number(dice[name])}</td>"
        f'<td title="{pixels[i]}">{compact_count(pixels[i])}</td></tr>'
        for i, name in enumerate(class_names)
    )
    headers = "".join(
        f'<th scope="col"><button type="button" class="sort" data-sort="{key}">{label}</button></th>'
        for key, label in (("name", "class"), ("iou", "IoU"), ("dice", "Dice"), ("pixels", "pixels"))
    )
    return f"""<aside id="class-panel" aria-label="Classes">
<h2>Classes</h2>
<p class="meta js-only">Sort by a column; choose a class (arrow keys move, Enter chooses) to list the images where
its IoU is lowest.</p>
<table id="panel-classes"><thead><tr>{headers}</tr></thead>
<tbody>{rows}</tbody></table>
<div class="js-only" id="class-worst-box">
<h3 id="class-worst-title" aria-live="polite">Choose a class</h3>
<ol id="class-worst"></ol>
</div>
</aside>"""


def images_section(images: Sequence[ImageRow], report_dir: Path) -> str:
    """Every image's numbers (the script pages through them) and, as plain HTML, the rows with figures."""
    figured = [(index, row) for index, row in enumerate(images) if row.figure is not None]
    figured.sort(key=lambda pair: (pair[1].miou is None, pair[1].miou or 0.0))  # lowest mIoU first, stable
    uncertainty_note = (  # only when the figures carry uncertainty maps (segkit-evaluate uncertainty_maps=true)
        '<p class="meta">Below each: the prediction overlay, then the per-pixel confidence (largest '
        "probability), entropy / log C and, when sampled (uncertainty_method), the variance of the class "
        "probabilities across samples; all on one scale from 0 to 1.</p>"
        if any(row.uncertainty for row in images) else "")
    return f"""<h2 id="images-heading">Images</h2>
<p class="meta">{len(images)} images evaluated; figures for {len(figured)}: those with the lowest mIoU and, for
each class, those where its IoU is lowest (segkit-evaluate worst_n, worst_per_class). Left: prediction
overlay. Middle: ground-truth overlay. Right: wrong pixels in red, ignored pixels in grey.</p>
{uncertainty_note}
<noscript><p class="meta">Without JavaScript, only the images with figures are listed, by mIoU.</p></noscript>
<div class="pager js-only"><button type="button" id="images-previous">previous</button>
<span id="images-range" aria-live="polite"></span>
<button type="button" id="images-next">next</button></div>
<table id="images"><thead><tr><th scope="col">image</th>
<th scope="col" aria-sort="ascending"><button type="button" class="sort" data-sort="miou">mIoU</button></th>
<th scope="col"><button type="button" class="sort" data-sort="pixel_accuracy">pixel accuracy</button></th>
<th scope="col">prediction | ground truth | errors</th></tr></thead>
<tbody>{"".join(_image_row(index, row, report_dir) for index, row in figured)}</tbody></table>"""


def _image_row(index: int, row: ImageRow, report_dir: Path) -> str:
    """One row as report.js's imageRow() draws it, for readers without scripts."""
    assert row.figure is not None  # only images with figures are written as HTML
    return (
        f'<tr id="image-{index}"><td class="name"><a href="{escaped(relative_url(row.figure, report_dir))}">'
        f"{escaped(row.filename)}</a></td><td>{number(row.miou)}</td><td>{number(row.pixel_accuracy)}</td>"
        f'<td class="figure">{_picture(row.figure, row.filename, report_dir)}'
        f"{_picture(row.uncertainty, row.filename + ' uncertainty maps', report_dir)}</td></tr>"
    )


def _picture(path: Path | None, alt: str, report_dir: Path) -> str:
    return img(path, alt, report_dir, lazy=True, size=picture_size(path)) if path is not None else ""


def write_scripts(
    report_dir: Path, class_names: Sequence[str], images: Sequence[ImageRow],
    worst_per_class: Mapping[str, Sequence[int]],
) -> None:
    """report.js and data.js beside report.html, through segkit.safe_files. `worst_per_class`: class name ->
    indices into `images`, lowest IoU of that class first."""
    data = {
        "classes": list(class_names),
        "images": [_image_data(row, report_dir) for row in images],
        "worst_per_class": [list(worst_per_class.get(name, ())) for name in class_names],
    }
    safe_files.write_text(report_dir / DATA_SCRIPT, f"window.segkitReport = {script_literal(data)};\n")
    safe_files.write_text(report_dir / SCRIPT, resources.files("segkit.reporting").joinpath(SCRIPT).read_text("utf-8"))


def _image_data(row: ImageRow, report_dir: Path) -> dict[str, Any]:
    return {
        "filename": row.filename,
        "miou": row.miou,
        "pixel_accuracy": row.pixel_accuracy,
        "per_class_iou": list(row.per_class_iou),
        "figure": _picture_data(row.figure, report_dir),
        "uncertainty": _picture_data(row.uncertainty, report_dir),
    }


def _picture_data(path: Path | None, report_dir: Path) -> dict[str, Any] | None:
    if path is None:
        return None
    width, height = picture_size(path)
    return {"src": relative_url(path, report_dir), "width": width, "height": height}


def script_tags() -> str:
    return f'<script src="{DATA_SCRIPT}"></script>\n<script src="{SCRIPT}"></script>'
