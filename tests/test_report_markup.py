"""Names from files in the evaluation report's HTML and script data: escaped, never markup
(segkit.reporting.markup, segkit.reporting.browsing; the browser side is tests/test_report_browser.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segkit.cli.evaluate import figure_stem
from segkit.reporting.browsing import ImageRow, class_panel, images_section, write_scripts
from segkit.reporting.markup import escaped, relative_url, script_literal

HOSTILE = ["<img src=x onerror=alert(1)>.png", "</script><script>alert(1)</script>", "a\u2028b", "\"'&<!--",
           "$\\frac{x}"]


@pytest.mark.parametrize("name", HOSTILE)
def test_script_data_holds_no_markup_and_reads_back_as_written(name):
    literal = script_literal({"filename": name, "per_class_iou": [0.5, None]})
    assert not set(literal) & set("<>&\u2028")
    assert json.loads(literal) == {"filename": name, "per_class_iou": [0.5, None]}


def test_script_data_refuses_nan():
    with pytest.raises(ValueError):
        script_literal({"miou": float("nan")})


def test_attribute_values_cannot_be_closed():
    assert escaped('" onmouseover="alert(1)') == "&quot; onmouseover=&quot;alert(1)"
    assert escaped("<b>'") == "&lt;b&gt;&#x27;"


def test_urls_to_files_keep_odd_characters_as_file_names(tmp_path):
    page_dir = tmp_path / "report"
    assert relative_url(page_dir / "images" / "a #1?.png", page_dir) == "images/a%20%231%3F.png"
    assert relative_url(Path("images/b.png"), Path(".")) == "images/b.png"


def test_figure_files_are_named_by_index_and_plain_characters():
    assert figure_stem(3, "<img src=x onerror=alert(1)>") == "figure_00003__img_src_x_onerror_alert_1_"
    assert figure_stem(12345, "frankfurt_000000_000294") == "figure_12345_frankfurt_000000_000294"


def test_the_panel_and_the_images_table_escape_names(tmp_path):
    name, filename = HOSTILE[1], HOSTILE[0]
    summary = {"per_class_iou": {name: 0.25}, "per_class_dice": {name: float("nan")}, "confusion_matrix": [[7]]}
    panel = class_panel(summary, [name], np.zeros((1, 3), dtype=np.uint8))
    assert name not in panel and escaped(name) in panel and 'data-iou="0.25"' in panel and 'data-dice=""' in panel
    figure = tmp_path / "images" / "figure.png"
    figure.parent.mkdir()
    Image.new("RGB", (30, 10)).save(figure)
    rows = [ImageRow(filename, 0.5, 0.5, [0.25], figure), ImageRow("plain.png", 0.1, 0.5, [None])]
    table = images_section(rows, tmp_path)
    assert filename not in table and escaped(filename) in table
    assert 'width="30" height="10"' in table and "plain.png" not in table  # no figure: only in data.js
    write_scripts(tmp_path, [name], rows, {name: [0]})
    data = (tmp_path / "data.js").read_text()
    assert data.startswith("window.segkitReport = ") and not set(data) & set("<>&")
    parsed = json.loads(data.removeprefix("window.segkitReport = ").rstrip().removesuffix(";"))
    assert [image["filename"] for image in parsed["images"]] == [filename, "plain.png"]
    assert parsed["worst_per_class"] == [[0]] and parsed["images"][1]["figure"] is None
    assert (tmp_path / "report.js").read_text().startswith("// segkit evaluation report")
