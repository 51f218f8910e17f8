"""The data set page of `segkit-check-data page=<dir>`: a static folder that browses every readable sample.

`<dir>/index.html` is markup of a constant size (the header, each split's class frequencies, the filter bar,
an empty grid and the detail view); every image's record and every finding are in `data.js` beside it, a
script file, not JSON, because a page opened from file:// may load scripts beside it but not fetch() a file.
dataset_page.js (shipped beside this module, copied beside the page) draws one page of thumbnails at a time,
so a 20,000-image set opens in about the time it takes to parse data.js.

Each sample's pictures are files named by its split and index (`sample_path`): `thumbs/<path>.jpg` (the image
with its mask overlaid), `images/<path>.jpg` (the detail view's image) and `masks/<path>.png` (the mask in the
class colours, transparent where ignored, laid over the image with an opacity slider). Names (class names,
file names, findings) are foreign data: escaped as HTML here, as script literals in data.js, and written by
the script with textContent only. A Content-Security-Policy allows scripts and images from the page's own
folder only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from segkit import safe_files
from segkit.reporting.markup import escaped, hex_color, script_literal

SCRIPT = "dataset_page.js"
DATA_SCRIPT = "data.js"
PAGE = "index.html"
THUMBS, IMAGES, MASKS = "thumbs", "images", "masks"  # folders of the page: `<folder>/<sample_path>.<suffix>`
CHUNK = 1000  # samples per folder: a folder of a 20k-image split stays small to list
CSP = ("default-src 'none'; script-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


@dataclass(frozen=True)
class PageImage:
    """One readable sample as the page shows it."""

    split: str
    index: int  # in its split
    name: str  # the image file (relative to the data set's root where it is below it), or the sample's name
    width: int  # the image's own size
    height: int
    path: str  # `sample_path(...)`: the sample's files are thumbs/<path>.jpg, images/<path>.jpg, masks/<path>.png
    pixels: Mapping[int, int]  # class id -> labelled pixels of that class (classes present only)
    ignore: int = 0  # ignored pixels (ignore_index, or values mapped to it)


@dataclass(frozen=True)
class Finding:
    """One line of the check; `index`: the sample it names in its split, when the page shows that sample."""

    split: str
    text: str
    warning: bool
    index: int | None = None


@dataclass(frozen=True)
class SplitSummary:
    """A split's statistics as the check counted them (segkit.tools.checks.SplitReport)."""

    split: str
    samples: int
    readable: int
    errors: int
    warnings: int
    pixel_counts: Sequence[int] | None  # per class; None: the split could not be read
    presence: Sequence[int] | None  # images containing each class
    ignore_pixels: int = 0


@dataclass(frozen=True)
class PageHeader:
    title: str  # the data set's name
    root: str | None  # where it was read from
    class_names: Sequence[str]
    palette: np.ndarray  # (num_classes, 3) uint8: segkit.reporting.plots.stable_palette
    thumb_size: int
    details: Mapping[str, str] = field(default_factory=dict)  # further lines of the header: label -> value


def split_folders(splits: Sequence[str]) -> dict[str, str]:
    """A folder name for each split: its name where it is a plain one, made plain and unique otherwise."""
    folders: dict[str, str] = {}
    for position, split in enumerate(splits):
        plain = re.sub(r"[^A-Za-z0-9_-]", "_", split) or "split"
        folders[split] = plain if plain == split and plain not in folders.values() else f"{position}-{plain}"
    return folders


def sample_path(folder: str, index: int) -> str:
    """`<split folder>/<chunk>/<index>`: the stem of a sample's files under thumbs/, images/ and masks/."""
    return f"{folder}/{index // CHUNK}/{index}"


def page_data(header: PageHeader, splits: Sequence[str], images: Sequence[PageImage],
              findings: Sequence[Finding]) -> dict[str, Any]:
    """What data.js holds, in compact arrays (dataset_page.js reads the fields by position):

    images: [split position, index, name, width, height, path (URL-quoted), ignored pixels,
             [class id, pixels, class id, pixels, ...]]
    findings: [split position, text, warning (0/1), position of its image in `images` or -1]
    """
    position = {split: i for i, split in enumerate(splits)}
    where = {(image.split, image.index): i for i, image in enumerate(images)}
    return {
        "title": header.title,
        "classes": list(header.class_names),
        "colors": [hex_color(color) for color in header.palette],
        "thumb": header.thumb_size,
        "splits": list(splits),
        "images": [
            [position[image.split], image.index, image.name, image.width, image.height, quote(image.path),
             int(image.ignore), [int(v) for pair in sorted(image.pixels.items()) if pair[1] for v in pair]]
            for image in images
        ],
        "findings": [
            [position.get(finding.split, -1), finding.text, int(finding.warning),
             where.get((finding.split, finding.index), -1) if finding.index is not None else -1]
            for finding in findings
        ],
    }


def write_data(page_dir: Path, data: Mapping[str, Any]) -> Path:
    return safe_files.write_text(page_dir / DATA_SCRIPT, f"window.segkitDataset = {script_literal(data)};\n")


def write_page(page_dir: Path, header: PageHeader, summaries: Sequence[SplitSummary], images: Sequence[PageImage],
               findings: Sequence[Finding]) -> Path:
    """index.html, data.js and dataset_page.js in `page_dir` (the pictures are the caller's); returns index.html."""
    splits = [summary.split for summary in summaries]
    write_data(page_dir, page_data(header, splits, images, findings))
    script = resources.files("segkit.reporting").joinpath(SCRIPT).read_text("utf-8")
    safe_files.write_text(page_dir / SCRIPT, script)
    return safe_files.write_text(page_dir / PAGE, page_markup(header, summaries, len(images), len(findings)))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 2em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 2em 1em 0; }
th, td { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.frequencies { display: flex; flex-wrap: wrap; align-items: flex-start; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle;
  border: 1px solid #888; flex: none; }
.meta { color: #666; font-size: 0.85em; }
.no-js .js-only { display: none; }
button:focus-visible, a:focus-visible, select:focus-visible, input:focus-visible {
  outline: 2px solid #1a62c7; outline-offset: 1px; }
#findings { font-size: 0.85em; padding-left: 1.5em; max-height: 20em; overflow-y: auto; overflow-wrap: anywhere; }
#findings li { margin: 0.2em 0; } #findings .warning { color: #8a5a00; } #findings .error { color: #a01010; }
.filters { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin: 0.8em 0; }
.pager { margin: 0.5em 0; display: flex; gap: 0.6em; align-items: center; }
#grid { display: flex; flex-wrap: wrap; gap: 8px; }
button.thumb { font: inherit; font-size: 0.75em; color: inherit; background: #f5f7fa; border: 1px solid #ddd;
  border-radius: 4px; padding: 4px; cursor: pointer; display: flex; flex-direction: column; align-items: center;
  max-width: calc(var(--thumb) + 10px); }
button.thumb img { display: block; background: #e4e7eb; }
button.thumb span.name { max-width: var(--thumb); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
button.thumb.flagged { border-color: #d08a00; box-shadow: inset 0 0 0 2px #f0b030; }
dialog#detail { width: min(96vw, 1400px); max-height: 94vh; padding: 1em; border: 1px solid #999; }
dialog#detail::backdrop { background: rgba(0, 0, 0, 0.55); }
.detail-head { display: flex; gap: 0.6em; align-items: center; flex-wrap: wrap; }
.detail-head h2 { margin: 0 auto 0 0; font-size: 1.1em; border: 0; overflow-wrap: anywhere; }
.detail-body { display: flex; gap: 1.2em; align-items: flex-start; margin-top: 0.6em; flex-wrap: wrap; }
.stage { position: relative; display: inline-block; background: #000; line-height: 0; }
.stage img { display: block; width: min(68vw, 1024px, calc(74vh * var(--aspect, 1))); height: auto; }
#detail-mask { position: absolute; left: 0; top: 0; width: 100%; height: 100%; image-rendering: pixelated; }
.stage.mask-only #detail-image { visibility: hidden; }
.stage.mask-only #detail-mask { opacity: 1 !important; }
.stage.small #detail-image { image-rendering: pixelated; }
.side { min-width: 16em; max-width: 26em; flex: 1; }
#legend { list-style: none; padding: 0; font-size: 0.9em; }
#legend li { display: flex; align-items: center; gap: 0.3em; margin: 0.15em 0; }
#legend .share { margin-left: auto; font-variant-numeric: tabular-nums; }
#detail-findings { font-size: 0.85em; padding-left: 1.2em; overflow-wrap: anywhere; }
"""


def page_markup(header: PageHeader, summaries: Sequence[SplitSummary], image_count: int, finding_count: int) -> str:
    """index.html: its size depends on the classes and splits, never on the number of images or findings."""
    title = escaped(header.title)
    root = f'<p class="meta">root: {escaped(header.root)}</p>' if header.root else ""
    details = "".join(f"<tr><td>{escaped(k)}</td><td>{escaped(v)}</td></tr>" for k, v in header.details.items())
    splits = "".join(
        f"<tr><td>{escaped(s.split)}</td><td>{s.samples}</td><td>{s.readable}</td><td>{s.errors}</td>"
        f"<td>{s.warnings}</td></tr>" for s in summaries)
    split_options = "".join(f'<option value="{i}">{escaped(s.split)}</option>' for i, s in enumerate(summaries))
    class_options = "".join(f'<option value="{i}">{escaped(name)}</option>'
                            for i, name in enumerate(header.class_names))
    return f"""<!DOCTYPE html>
<html lang="en" class="no-js"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>segkit data set: {title}</title>
<style>{_STYLE}</style></head><body style="--thumb: {header.thumb_size}px">
<h1>Data set {title}</h1>
{root}
<table class="meta">{details}</table>
<table id="splits"><thead><tr><th>split</th><th>samples</th><th>readable</th><th>errors</th><th>warnings</th></tr>
</thead><tbody>{splits}</tbody></table>

<h2>Class frequency</h2>
<p class="meta">Share of each split's pixels (ignored pixels included in the total) and the readable images that
contain the class.</p>
<div class="frequencies">{"".join(_frequency_table(i, s, header) for i, s in enumerate(summaries))}</div>

<h2 id="findings-heading">Findings ({finding_count})</h2>
<p class="meta js-only">Each finding of the check; those naming a sample shown here link to it.</p>
<ol id="findings" aria-labelledby="findings-heading"></ol>
<button type="button" id="findings-more" class="js-only" hidden>show more</button>

<h2 id="images-heading">Images ({image_count})</h2>
<noscript><p>The images are drawn by dataset_page.js; allow scripts for this file to browse them.</p></noscript>
<div class="filters js-only" role="search">
<label>split <select id="filter-split"><option value="-1">all</option>{split_options}</select></label>
<label>containing class <select id="filter-class"><option value="-1">any</option>{class_options}</select></label>
<label><input type="checkbox" id="filter-findings"> only images with findings</label>
</div>
<div class="pager js-only"><button type="button" id="page-previous">previous</button>
<span id="page-range" aria-live="polite"></span>
<button type="button" id="page-next">next</button></div>
<div id="grid" aria-labelledby="images-heading"></div>

<dialog id="detail" aria-labelledby="detail-name" tabindex="-1">
<div class="detail-head"><h2 id="detail-name"></h2><span id="detail-position" class="meta"></span>
<button type="button" id="detail-previous" aria-label="previous image">&larr; previous</button>
<button type="button" id="detail-next" aria-label="next image">next &rarr;</button>
<button type="button" id="detail-close">close</button></div>
<p class="meta">Left and right arrow keys: previous and next image; Escape closes; M: image or mask.</p>
<div class="detail-body">
<div class="stage" id="detail-stage"><img id="detail-image" alt=""><img id="detail-mask" alt=""></div>
<div class="side">
<label>mask opacity <input type="range" id="detail-opacity" min="0" max="100" value="50"></label>
<button type="button" id="detail-toggle" aria-pressed="false">show the mask only</button>
<p id="detail-size" class="meta"></p>
<h3>Classes in this image</h3>
<p class="meta">Share of its labelled pixels.</p>
<ul id="legend"></ul>
<p id="detail-ignore" class="meta"></p>
<h3>Findings</h3>
<ul id="detail-findings"></ul>
</div></div>
</dialog>
<script src="{DATA_SCRIPT}"></script>
<script src="{SCRIPT}"></script>
</body></html>
"""


def _frequency_table(position: int, summary: SplitSummary, header: PageHeader) -> str:
    caption = f"<caption>{escaped(summary.split)}: {summary.readable} readable images</caption>"
    if summary.pixel_counts is None or summary.presence is None:
        return f'<table class="frequency" id="frequency-{position}">{caption}<tbody><tr><td>not readable</td></tr>' \
               "</tbody></table>"
    total = max(int(sum(summary.pixel_counts)) + summary.ignore_pixels, 1)
    readable = max(summary.readable, 1)
    rows = "".join(
        f'<tr class="class-row" data-class="{i}"><td><span class="swatch" '
        f'style="background:{hex_color(header.palette[i])}"></span>{escaped(name)}</td>'
        f"<td>{100 * int(summary.pixel_counts[i]) / total:.2f}%</td>"
        f"<td>{int(summary.presence[i])} ({100 * int(summary.presence[i]) / readable:.0f}%)</td></tr>"
        for i, name in enumerate(header.class_names))
    rows += f'<tr class="ignore-row"><td>ignore</td><td>{100 * summary.ignore_pixels / total:.2f}%</td><td></td></tr>'
    return (f'<table class="frequency" id="frequency-{position}">{caption}<thead><tr><th>class</th><th>pixels</th>'
            f"<th>images</th></tr></thead><tbody>{rows}</tbody></table>")
