"""A self-contained HTML evaluation report: a folder with report.html and its PNG images.

Plain HTML and inline CSS, no scripts and no network: it opens from a file share, a CI
artifact or an e-mail attachment unpacked anywhere. Image paths are relative to the folder.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segkit import safe_files

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.name { text-align: left; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: middle; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { background: #f5f7fa; border-radius: 6px; padding: 0.6em 1.2em; }
.card b { display: block; font-size: 1.4em; }
img { max-width: 100%; }
.meta { color: #666; font-size: 0.85em; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _img(src: Path | str | None, alt: str, report_dir: Path) -> str:
    if src is None:
        return ""
    rel = Path(src).relative_to(report_dir).as_posix() if Path(src).is_absolute() else str(src)
    return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">'


def write_report(
    report_dir: Path,
    *,
    summary: Mapping[str, Any],
    class_names: Sequence[str],
    palette: np.ndarray,
    meta: Mapping[str, Any],
    charts: Mapping[str, Path | None],
    worst: Sequence[Mapping[str, Any]],
) -> Path:
    """Write report_dir/report.html. `charts`: title -> image; `worst`: dicts with filename,
    miou, pixel_accuracy, image (the comparison figure) and optionally uncertainty (the uncertainty maps
    beside the prediction overlay, segkit-evaluate uncertainty_maps=true)."""
    iou, dice = summary["per_class_iou"], summary["per_class_dice"]
    precision, recall = summary.get("per_class_precision", {}), summary.get("per_class_recall", {})
    confusion = np.asarray(summary["confusion_matrix"])
    pixels = confusion.sum(1) if confusion.size else np.zeros(len(class_names))
    rows = []
    for i, name in enumerate(class_names):
        color = "#" + "".join(f"{int(c):02x}" for c in palette[i])
        rows.append(
            f'<tr class="class-row"><td class="name"><span class="swatch" style="background:{color}"></span>'
            f"{html.escape(name)}</td><td>{_fmt(iou[name])}</td><td>{_fmt(dice[name])}</td>"
            f"<td>{_fmt(precision.get(name))}</td><td>{_fmt(recall.get(name))}</td>"
            f"<td>{int(pixels[i]) if i < len(pixels) else 0}</td></tr>"
        )
    meta_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td class='name'>{html.escape(str(v))}</td></tr>"
        for k, v in meta.items()
    )
    chart_html = "".join(
        f"<figure>{_img(path, title, report_dir)}<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, path in charts.items()
        if path is not None
    )
    worst_html = "".join(
        f"<figure>{_img(item['image'], item['filename'], report_dir)}"
        f"{_img(item.get('uncertainty'), item['filename'] + ' uncertainty maps', report_dir)}<figcaption>"
        f"{html.escape(item['filename'])}: mIoU {_fmt(item['miou'])}, pixel accuracy "
        f"{_fmt(item['pixel_accuracy'])}</figcaption></figure>"
        for item in worst
    )
    cards = "".join(
        f'<div class="card">{label}<b>{_fmt(summary[key])}</b></div>'
        for label, key in (("mIoU", "miou"), ("mean Dice", "mdice"), ("pixel accuracy", "pixel_acc"))
    ) + "".join(  # the metrics the config chose (segkit.metrics.build_metrics), where they are single numbers
        f'<div class="card">{html.escape(name)}<b>{_fmt(value)}</b></div>'
        for name, value in (summary.get("metrics") or {}).items() if isinstance(value, (int, float))
    )
    calibration = summary.get("calibration")
    if calibration:  # expected calibration error (segkit.inference.calibration)
        cards += f'<div class="card">ECE ({calibration["n_bins"]} bins)<b>{_fmt(calibration["ece"])}</b></div>'
    uncertainty_note = (  # only when the worst images carry uncertainty maps
        "<p class=\"meta\">Below each: the prediction overlay, then the per-pixel confidence (largest "
        "probability), entropy / log C and, when sampled (uncertainty_method), the variance of the class "
        "probabilities across samples; all on one scale from 0 to 1.</p>"
        if any(item.get("uncertainty") for item in worst) else "")
    title = html.escape(str(meta.get("checkpoint", "")))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>segkit evaluation: {title}</title>
<style>{_STYLE}</style></head><body>
<h1>Evaluation report</h1>
<h2>Summary</h2>
<div class="cards">{cards}</div>
<table class="meta">{meta_rows}</table>
<h2>Per class</h2>
<table id="per-class"><thead>
<tr><th>class</th><th>IoU</th><th>Dice</th><th>precision</th><th>recall</th><th>pixels (ground truth)</th></tr>
</thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Charts</h2>
{chart_html}
<h2>Worst {len(worst)} images by mIoU</h2>
<p class="meta">Left: prediction overlay. Middle: ground-truth overlay. Right: wrong pixels in red,
ignored pixels in grey.</p>
{uncertainty_note}
{worst_html or "<p>No images.</p>"}
</body></html>
"""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "report.html"
    return safe_files.write_text(path, page)  # never through a planted link
