"""A self-contained HTML evaluation report: a folder with report.html, its scripts and its PNG images.

No network and no external assets: inline CSS, two scripts beside the page (report.js, data.js) and
images under images/, all by relative paths, so it opens from file://, a file share or a CI artifact
unpacked anywhere. Without scripts it still reads: summary, per-class tables, charts and the images with
figures are plain HTML; report.js adds sorting, the side panel's per-class image lists and the paged table
of every image (segkit.reporting.browsing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segkit import safe_files
from segkit.reporting.browsing import ImageRow, class_panel, class_pixels, images_section, script_tags, write_scripts
from segkit.reporting.markup import escaped, hex_color, img, number

PANEL_WIDTH = "22rem"  # the side panel; the page keeps this much room on the right at widths from 1280 px

_STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 0; color: #222; }}
main {{ margin: 2em calc({PANEL_WIDTH} + 2em) 2em 2em; max-width: 1100px; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
th:first-child, td:first-child, td.name {{ text-align: left; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle;
  border: 1px solid #888; }}
.cards {{ display: flex; gap: 1em; flex-wrap: wrap; }}
.card {{ background: #f5f7fa; border-radius: 6px; padding: 0.6em 1.2em; }}
.card b {{ display: block; font-size: 1.4em; }}
img {{ max-width: 100%; height: auto; }}
.meta {{ color: #666; font-size: 0.85em; }}
figure {{ margin: 1em 0; }} figcaption {{ font-size: 0.9em; color: #444; }}
.no-js .js-only {{ display: none; }}
button.sort, button.class-pick {{ font: inherit; color: inherit; background: none; border: 0; padding: 2px;
  cursor: pointer; text-align: left; }}
button.sort {{ font-weight: bold; }}
th[aria-sort="ascending"] button.sort::after {{ content: " \\25B2"; }}
th[aria-sort="descending"] button.sort::after {{ content: " \\25BC"; }}
button:focus-visible, a:focus-visible {{ outline: 2px solid #1a62c7; outline-offset: 1px; }}
button.class-pick[aria-pressed="true"] {{ font-weight: bold; text-decoration: underline; }}
#class-panel {{ position: fixed; top: 0; right: 0; bottom: 0; width: {PANEL_WIDTH}; overflow-y: auto;
  box-sizing: border-box; padding: 0 1em 1em; background: #fafbfc; border-left: 1px solid #ddd; }}
#class-panel table {{ width: 100%; font-size: 0.85em; }}
#class-panel th, #class-panel td {{ padding: 2px 4px; }} #class-panel tbody th {{ font-weight: normal; }}
#class-panel h2 {{ margin-top: 1em; }} #class-panel h3 {{ font-size: 1em; overflow-wrap: anywhere; }}
#class-worst {{ padding-left: 1.5em; font-size: 0.85em; overflow-wrap: anywhere; }}
#class-worst li {{ margin: 0.3em 0; }}
#images td {{ vertical-align: top; }} #images td.figure, #images th:last-child {{ width: 65%; text-align: left; }}
#images td.name {{ overflow-wrap: anywhere; max-width: 14em; }}
#images tr:target {{ background: #fff6d5; }}
.pager {{ margin: 0.5em 0; }}
@media (max-width: 900px) {{
  main {{ margin-right: 2em; }}
  #class-panel {{ position: static; width: auto; border-left: 0; }}
}}
"""


def write_report(
    report_dir: Path,
    *,
    summary: Mapping[str, Any],
    class_names: Sequence[str],
    palette: np.ndarray,
    meta: Mapping[str, Any],
    charts: Mapping[str, Path | None],
    images: Sequence[ImageRow],
    worst_per_class: Mapping[str, Sequence[int]],
) -> Path:
    """Write report_dir/report.html with report.js and data.js beside it. `charts`: title -> image; `images`:
    every evaluated image, in evaluation order, with its figures where drawn; `worst_per_class`: class name ->
    indices into `images` where that class's IoU is lowest, lowest first (the side panel lists them)."""
    title = escaped(meta.get("checkpoint", ""))
    page = f"""<!DOCTYPE html>
<html lang="en" class="no-js"><head><meta charset="utf-8"><title>segkit evaluation: {title}</title>
<style>{_STYLE}</style></head><body>
{class_panel(summary, class_names, palette)}
<main>
<h1>Evaluation report</h1>
<h2>Summary</h2>
<div class="cards">{_cards(summary)}</div>
<table class="meta">{_meta_rows(meta)}</table>
<h2>Per class</h2>
{_class_table(summary, class_names, palette)}
<h2>Charts</h2>
{_charts(charts, report_dir)}
{images_section(images, report_dir)}
</main>
{script_tags()}
</body></html>
"""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_scripts(report_dir, class_names, images, worst_per_class)
    return safe_files.write_text(report_dir / "report.html", page)  # never through a planted link


def _cards(summary: Mapping[str, Any]) -> str:
    cards = "".join(
        f'<div class="card">{label}<b>{number(summary[key])}</b></div>'
        for label, key in (("mIoU", "miou"), ("mean Dice", "mdice"), ("pixel accuracy", "pixel_acc"))
    ) + "".join(  # the metrics the config chose (segkit.metrics.build_metrics), where they are single numbers
        f'<div class="card">{escaped(name)}<b>{number(value)}</b></div>'
        for name, value in (summary.get("metrics") or {}).items() if isinstance(value, (int, float))
    )
    calibration = summary.get("calibration")
    if calibration:  # expected calibration error (segkit.inference.calibration)
        cards += f'<div class="card">ECE ({calibration["n_bins"]} bins)<b>{number(calibration["ece"])}</b></div>'
    return cards


def _meta_rows(meta: Mapping[str, Any]) -> str:
    return "".join(f"<tr><td>{escaped(key)}</td><td class='name'>{escaped(value)}</td></tr>"
                   for key, value in meta.items())


def _class_table(summary: Mapping[str, Any], class_names: Sequence[str], palette: np.ndarray) -> str:
    iou, dice = summary["per_class_iou"], summary["per_class_dice"]
    precision, recall = summary.get("per_class_precision", {}), summary.get("per_class_recall", {})
    pixels = class_pixels(summary, len(class_names))
    rows = "".join(
        f'<tr class="class-row"><td class="name"><span class="swatch" style="background:{hex_color(palette[i])}">'
        f"</span>{escaped(name)}</td><td>{number(iou[name])}</td><td>{number(dice[name])}</td>"
        f"<td>{number(precision.get(name))}</td><td>{number(recall.get(name))}</td><td>{pixels[i]}</td></tr>"
        for i, name in enumerate(class_names)
    )
    return f"""<table id="per-class"><thead>
<tr><th>class</th><th>IoU</th><th>Dice</th><th>precision</th><th>recall</th><th>pixels (ground truth)</th></tr>
</thead>
<tbody>{rows}</tbody></table>"""


def _charts(charts: Mapping[str, Path | None], report_dir: Path) -> str:
    return "".join(
        f"<figure>{img(path, title, report_dir)}<figcaption>{escaped(title)}</figcaption></figure>"
        for title, path in charts.items()
        if path is not None
    )
