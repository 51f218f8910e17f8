"""The evaluation report as a person uses it: opened from file:// in Chromium (tests/browser.py), every image
loads, nothing is fetched from outside the report's folder, the side panel sorts and lists each class's worst
images, the table of every image sorts, keys work, and file names stay text."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from segkit.cli import evaluate as evaluate_cli
from segkit.engine.trainer import fit
from segkit.reporting.browsing import ImageRow
from segkit.reporting.html import write_report

from .browser import broken_images, needs_browser, open_page, record_dialogs, screenshot_spread
from .conftest import CONF_DIR, TINY

pytestmark = needs_browser
CLASSES = ["background", "disc", "square", "triangle"]
WORST_N, WORST_PER_CLASS = 2, 2  # of 8 images: some are drawn, some are not


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        train = compose(config_name="train", overrides=[*TINY, "trainer.max_steps=2"])
    fit(train, base / "run")
    return base / "run"


def evaluated_report(run_dir, name, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        evaluate = compose(config_name="evaluate", overrides=[
            f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output_dir={run_dir.parent / name}",
            "progress_bar=false", "save_masks=false", f"worst_n={WORST_N}", f"worst_per_class={WORST_PER_CLASS}",
            *overrides,
        ])
    evaluate_cli.run(evaluate)
    return run_dir.parent / name / "report" / "report.html"


@pytest.fixture(scope="module")
def report(run_dir):
    return evaluated_report(run_dir, "eval")


@pytest.fixture(scope="module")
def report_with_maps(run_dir):
    return evaluated_report(run_dir, "eval_uncertainty", "uncertainty_maps=true", "tta=true", "tta_scales=[1.0]",
                            "uncertainty_method=tta_variance")


def records(report) -> list[dict]:
    """per_image.jsonl beside the report, in evaluation order."""
    return [json.loads(line) for line in (report.parent.parent / "per_image.jsonl").read_text().splitlines()]


def lowest(values: list[tuple[float | None, int]], k: int) -> list[int]:
    """Positions of the k lowest values that exist; equal values in evaluation order."""
    present = [(value, position) for value, position in values if value is not None]
    return [position for _, position in sorted(present)[:k]]


def expected_figures(report) -> set[int]:
    rows = records(report)
    shown = set(lowest([(r["miou"], i) for i, r in enumerate(rows)], WORST_N))
    for name in CLASSES:
        shown |= set(lowest([(r["per_class_iou"][name], i) for i, r in enumerate(rows)], WORST_PER_CLASS))
    return shown


def load_every_image(page) -> None:
    """Lazy images load when scrolled to: load them all now, so a broken one cannot hide below the fold."""
    page.evaluate("""() => Promise.all(Array.from(document.images).map(img => {
        img.loading = 'eager';
        return img.decode().catch(() => null);
    }))""")


def panel_names(page) -> list[str]:
    return page.locator("#panel-classes tbody button.class-pick").all_inner_texts()


def image_rows(page) -> list[dict]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('#images tbody tr')).map(row => ({
        index: Number(row.id.replace('image-', '')), name: row.cells[0].textContent,
        sources: Array.from(row.querySelectorAll('img')).map(img => img.getAttribute('src'))}))""")


def test_every_image_loads_and_every_class_is_in_both_tables(browser, report):
    page, outside = open_page(browser, report)
    load_every_image(page)
    figured = expected_figures(report)
    sources = [img.get_attribute("src") for img in page.locator("img").all()]
    assert len(sources) == 4 + len(figured)  # IoU bars, confusion, reliability, training curves + the figures
    assert not broken_images(page) and not outside
    names = [row.inner_text().split("\t")[0].strip() for row in page.locator("#per-class tr.class-row").all()]
    assert names == CLASSES
    assert panel_names(page) == CLASSES  # one panel row per class, each with its colour swatch
    swatches = page.locator("#panel-classes tbody .swatch").evaluate_all(
        "spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert len(set(swatches)) == len(CLASSES)


def test_sorting_the_panel_by_iou_follows_metrics_json(browser, report):
    metrics = json.loads((report.parent.parent / "metrics.json").read_text())["per_class_iou"]
    page, _ = open_page(browser, report)
    iou_header = page.locator("#panel-classes thead button[data-sort='iou']")
    iou_header.click()
    ascending = sorted(CLASSES, key=lambda name: (metrics[name] is None, metrics[name] or 0.0))
    assert panel_names(page) == ascending
    shown = [float(v) for v in page.locator("#panel-classes tbody tr td:nth-child(2)").all_inner_texts()]
    assert shown == [round(metrics[name], 4) for name in ascending]
    iou_header.click()
    assert panel_names(page) == sorted(CLASSES, key=lambda name: (metrics[name] is None, -(metrics[name] or 0.0)))
    page.locator("#panel-classes thead button[data-sort='name']").click()
    assert panel_names(page) == sorted(CLASSES)


def test_choosing_a_class_lists_its_worst_images_with_their_figures(browser, report):
    rows = records(report)
    page, outside = open_page(browser, report)
    for name in CLASSES:
        page.locator("#panel-classes button.class-pick", has_text=name).click()
        assert page.locator("#class-worst-title").inner_text() == f"Lowest IoU of {name}"
        listed = page.locator("#class-worst li[data-image]").evaluate_all(
            "items => items.map(li => [Number(li.dataset.image), Number(li.dataset.iou), li.textContent])")
        expected = lowest([(r["per_class_iou"][name], i) for i, r in enumerate(rows)], WORST_PER_CLASS)
        assert [index for index, _, _ in listed] == expected
        ious = [iou for _, iou, _ in listed]
        assert ious == sorted(ious) == [rows[i]["per_class_iou"][name] for i in expected]
        assert all(text.startswith(rows[i]["filename"]) for i, _, text in listed)
    page.locator("#class-worst a").last.click()  # the link shows the image's row, with its figure
    target = page.locator("#images tr:target")
    assert target.get_attribute("id") == f"image-{expected[-1]}"
    assert target.locator("img").count() == 1
    load_every_image(page)  # the figures above it take their room as they load: the row stays in view
    assert -2 < target.evaluate("row => row.getBoundingClientRect().top") < 900 - 100
    assert not broken_images(page) and not outside


def test_the_images_table_sorts_by_miou_and_pixel_accuracy_as_per_image_records(browser, report):
    rows = records(report)
    page, _ = open_page(browser, report)
    by_miou = [i for _, i in sorted((r["miou"], i) for i, r in enumerate(rows))]
    assert [row["index"] for row in image_rows(page)] == by_miou  # worst first, the default
    assert [row["name"] for row in image_rows(page)] == [rows[i]["filename"] for i in by_miou]
    figured = expected_figures(report)
    for row in image_rows(page):  # a figure (prediction | ground truth | errors) for the drawn images only
        assert len(row["sources"]) == (row["index"] in figured)
    page.locator("#images thead button[data-sort='miou']").click()
    assert [row["index"] for row in image_rows(page)] == [i for _, i in sorted((-r["miou"], i)
                                                                                for i, r in enumerate(rows))]
    page.locator("#images thead button[data-sort='pixel_accuracy']").click()
    assert [row["index"] for row in image_rows(page)] == [i for _, i in sorted((r["pixel_accuracy"], i)
                                                                                for i, r in enumerate(rows))]
    assert page.locator("#images-range").inner_text() == f"1\u2013{len(rows)} of {len(rows)}"


def test_uncertainty_maps_show_where_computed(browser, report, report_with_maps):
    page, outside = open_page(browser, report_with_maps)
    load_every_image(page)
    figured = [row for row in image_rows(page) if row["sources"]]
    assert figured and all(len(row["sources"]) == 2 and row["sources"][1].endswith("_uncertainty.png")
                           for row in figured)
    assert not broken_images(page) and not outside
    assert "entropy / log C" in page.content() and "variance" in page.content()
    page, _ = open_page(browser, report)  # uncertainty_maps=false (the default): none
    assert "_uncertainty.png" not in page.content() and "entropy / log C" not in page.content()


def test_the_keyboard_reaches_sorts_and_chooses_classes(browser, report):
    page, _ = open_page(browser, report)

    def focused() -> str:
        return page.evaluate("() => document.activeElement.className + ':' + document.activeElement.textContent")

    for _ in range(8):  # past the panel's sort headers to the class rows (one tab stop, arrows move inside)
        page.keyboard.press("Tab")
        if focused().startswith("class-pick"):
            break
    assert focused() == f"class-pick:{CLASSES[0]}"
    page.keyboard.press("ArrowDown")
    assert focused() == f"class-pick:{CLASSES[1]}"
    page.keyboard.press("Enter")
    assert page.locator("#class-worst-title").inner_text() == f"Lowest IoU of {CLASSES[1]}"
    assert page.locator("#class-worst li[data-image]").count() > 0
    page.keyboard.press("End")
    page.keyboard.press(" ")
    assert page.locator("#class-worst-title").inner_text() == f"Lowest IoU of {CLASSES[-1]}"
    page.keyboard.press("Tab")  # on to the chosen class's images: links
    assert page.evaluate("() => document.activeElement.closest('#class-worst') !== null")
    page.keyboard.press("Shift+Tab")  # back to the class rows: the chosen one is their tab stop
    assert focused() == f"class-pick:{CLASSES[-1]}"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # follows the link to the image's row
    assert page.locator("#images tr:target").count() == 1
    page.locator("#panel-classes thead button[data-sort='iou']").focus()
    page.keyboard.press("Enter")
    assert page.locator("#panel-classes thead th[aria-sort='ascending'] button").inner_text() == "IoU"


def test_a_screenshot_shows_the_report(browser, report):
    page, _ = open_page(browser, report, width=1280, height=900)
    assert page.locator("#class-panel").bounding_box()["x"] > 800  # at the side, beside the report
    # Grey-value spread, measured at 1280x900: a blank page 0, the side panel alone (main hidden) about 14, the
    # report's text without images, swatches and cards about 24, the whole first screen about 30. Over 20: the
    # report itself is drawn, not just an empty frame.
    assert screenshot_spread(page) > 20


def test_the_check_notices_a_broken_image(browser, report):
    page = report.with_name("broken.html")
    page.write_text('<html><body><img src="images/missing.png"><img src="images/confusion.png"></body></html>\n')
    opened, _ = open_page(browser, page)
    assert broken_images(opened) == ["images/missing.png"]


def hostile_report(directory, rows: int, num_classes: int = 3, figure: bool = True):
    """A report written directly, with a file name and a class name that would run script if parsed as HTML."""
    filename = "<img src=x onerror=alert(1)>.png"
    names = ["<script>alert(2)</script>", *(f"class_{i}" for i in range(1, num_classes))]
    summary = {"per_class_iou": dict.fromkeys(names, 0.5), "per_class_dice": dict.fromkeys(names, 0.5),
               "confusion_matrix": np.eye(num_classes, dtype=int).tolist(), "miou": 0.5, "mdice": 0.5,
               "pixel_acc": 0.5}
    picture = directory / "images" / "figure_00000_x.png"
    picture.parent.mkdir(parents=True)
    Image.new("RGB", (60, 20), (200, 30, 30)).save(picture)
    rng = np.random.default_rng(0)
    images = [ImageRow(filename if i == 0 else f"img_{i:05d}.png", float(rng.random()), float(rng.random()),
                       [float(v) for v in rng.random(num_classes)], picture if figure and i == 0 else None)
              for i in range(rows)]
    path = write_report(directory, summary=summary, class_names=names, palette=np.zeros((num_classes, 3)),
                        meta={"checkpoint": filename}, charts={}, images=images,
                        worst_per_class={names[0]: [0]})
    return path, filename, names[0]


def test_file_and_class_names_stay_text(browser, tmp_path):
    path, filename, class_name = hostile_report(tmp_path / "report", rows=3)
    page, outside = open_page(browser, path)
    dialogs = record_dialogs(page)
    page.reload()  # now with the listener from the first script on
    assert panel_names(page)[0] == class_name
    page.locator("#panel-classes button.class-pick").first.click()
    assert page.locator("#class-worst-title").inner_text() == f"Lowest IoU of {class_name}"
    assert page.locator("#class-worst a").inner_text() == filename
    assert filename in page.locator("#images tbody").inner_text()
    assert page.locator("img[src='x'], script:not([src])").count() == 0 and not outside and not dialogs


def test_a_large_evaluation_opens_at_once_and_pages(browser, tmp_path):
    path, _, _ = hostile_report(tmp_path / "report", rows=5000, num_classes=19, figure=False)
    started = time.monotonic()
    page, _ = open_page(browser, path)
    assert page.locator("#images tbody tr").count() == 25  # one page drawn, not 5000 rows
    assert time.monotonic() - started < 10  # measured about 0.3 s; the bound allows for a loaded machine
    page.locator("#images-next").click()
    assert page.locator("#images-range").inner_text() == "26\u201350 of 5000"
