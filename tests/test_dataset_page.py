"""The data set page of `segkit-check-data page=<dir>` as a person uses it: written beside its pictures, opened
from file:// in Chromium (tests/browser.py), nothing fetched from outside its folder, thumbnails, the detail view
with its legend, opacity slider and keys, the filters, the findings linked to their images, names kept as
text, and a 20,000-image set interactive within seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from segkit.cli import check_data
from segkit.errors import ConfigError
from segkit.reporting.dataset_page import (
    PageHeader,
    PageImage,
    SplitSummary,
    page_data,
    page_markup,
    sample_path,
    write_data,
)
from segkit.reporting.plots import stable_palette
from segkit.safe_files import UnsafePathError
from segkit.tools.page import check_options

from .browser import broken_images, needs_browser, open_page, record_dialogs, screenshot_spread
from .conftest import CONF_DIR

EVIL = "<img src=x onerror=alert(1)>"
CLASSES = ["background", EVIL, "road"]
SIZE = (36, 44)  # height, width
ODD_NAME = 'odd <b>name<b> & "quote" #1'  # a file name that is markup, a fragment and a quote
UNKNOWN = 7  # a mask value outside the class ids: a warning under dataset.unknown_labels=ignore


def mask_of(split: str, i: int) -> np.ndarray:
    """Class 0 everywhere, class 1 on the left third for even i, class 2 in a square for i % 3 == 0; one mask of
    train holds UNKNOWN in its top rows (the planted finding)."""
    mask = np.zeros(SIZE, dtype=np.uint8)
    if i % 2 == 0:
        mask[:, : SIZE[1] // 3] = 1
    if i % 3 == 0:
        mask[10:20, 20:30] = 2
    if (split, i) == ("train", 2):
        mask[:4] = UNKNOWN
    if (split, i) == ("val", 1):
        mask[30:, :] = 255  # ignored pixels
    return mask


def stems(split: str) -> list[str]:
    return [f"img{i}" if (split, i) != ("train", 4) else ODD_NAME for i in range(5 if split == "train" else 3)]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """A folder data set (train 5, val 3), checked with page=..., in this process (page_workers=1)."""
    base = tmp_path_factory.mktemp("datapage")
    root = base / "data"
    rng = np.random.default_rng(0)
    masks = {}
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, stem in enumerate(stems(split)):
            pixels = rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{stem}.jpg")
            masks[(split, f"{stem}.jpg")] = mask_of(split, i)
            Image.fromarray(mask_of(split, i)).save(root / "masks" / split / f"{stem}.png")
    (root / "dataset.json").write_text(json.dumps({"class_names": CLASSES}))
    page_dir = base / "page"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(base / "cache"))
        status = check_data.run(check_config(root, f"page={page_dir}"))
    return {"root": root, "page": page_dir / "index.html", "masks": masks, "status": status}


def check_config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="check_data", overrides=[
            "dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "dataset.unknown_labels=ignore",
            "page_workers=1", "progress_bar=false", "page_thumb_size=64", *overrides])


def expected_names(written: dict, class_id: int | None = None) -> set[str]:
    """File names (relative to the root) of the images containing `class_id` (all images for None)."""
    return {f"images/{split}/{name}" for (split, name), mask in written["masks"].items()
            if class_id is None or bool((mask == class_id).any())}


def shown_names(page) -> set[str]:
    return set(page.locator("#grid button.thumb span.name").all_inner_texts())


def load_every_image(page) -> None:
    page.evaluate("""() => Promise.all(Array.from(document.images).map(img => {
        img.loading = 'eager';
        return img.decode().catch(() => null);
    }))""")


def test_the_page_its_data_and_every_samples_pictures_are_written(written):
    assert written["status"] == 0  # the planted value is a warning under unknown_labels=ignore
    page_dir = written["page"].parent
    assert {p.name for p in page_dir.iterdir()} >= {"index.html", "data.js", "dataset_page.js", "thumbs", "images",
                                                    "masks"}
    samples = len(written["masks"])
    assert len(list((page_dir / "thumbs").rglob("*.jpg"))) == samples
    assert len(list((page_dir / "images").rglob("*.jpg"))) == samples
    assert len(list((page_dir / "masks").rglob("*.png"))) == samples
    with Image.open(page_dir / "masks" / f"{sample_path('val', 1)}.png") as mask:  # ignored rows: transparent
        alpha = np.asarray(mask)[..., 3]
        assert mask.mode == "RGBA" and alpha[30:].max() == 0 and alpha[:30].min() == 255
    with Image.open(page_dir / "thumbs" / f"{sample_path('train', 0)}.jpg") as thumb:
        assert max(thumb.size) == 44  # never upscaled (page_thumb_size=64)
    html = written["page"].read_text()
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # escaped in the frequency tables
    assert "Content-Security-Policy" in html


def test_the_check_prints_where_the_page_is(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((*SIZE, 3), dtype=np.uint8)).save(root / "images" / "train" / "a.jpg")
    Image.fromarray(mask_of("train", 0)).save(root / "masks" / "train" / "a.png")
    assert check_data.run(check_config(root, f"page={tmp_path / 'out'}", "splits=[train]")) == 0
    assert f"page -> {tmp_path / 'out' / 'index.html'}" in capsys.readouterr().out


@needs_browser
def test_thumbnails_frequencies_and_a_drawn_page(browser, written):
    page, outside = open_page(browser, written["page"])
    alerts = record_dialogs(page)
    assert shown_names(page) == expected_names(written)
    load_every_image(page)
    assert not broken_images(page) and not outside
    for position in (0, 1):  # a row per class in each split's table, with its swatch
        rows = page.locator(f"#frequency-{position} tr.class-row")
        assert rows.count() == len(CLASSES)
        assert rows.nth(1).inner_text().startswith(EVIL)  # the name as text
    assert screenshot_spread(page) > 15
    assert page.locator("img[src='x']").count() == 0 and not alerts


@needs_browser
def test_the_class_filter_shows_exactly_the_images_containing_it(browser, written):
    page, _ = open_page(browser, written["page"])
    for class_id in range(len(CLASSES)):
        page.select_option("#filter-class", str(class_id))
        assert shown_names(page) == expected_names(written, class_id), CLASSES[class_id]
    page.select_option("#filter-split", "1")  # val only
    page.select_option("#filter-class", "-1")
    assert shown_names(page) == {name for name in expected_names(written) if name.startswith("images/val/")}


@needs_browser
def test_the_findings_filter_and_a_findings_link_open_the_planted_image(browser, written):
    page, _ = open_page(browser, written["page"])
    page.check("#filter-findings")
    assert shown_names(page) == {"images/train/img2.jpg"}
    finding = page.locator("#findings a")
    assert finding.count() == 1 and "values outside" in finding.inner_text()
    finding.click()
    assert page.locator("#detail").evaluate("d => d.open")
    assert page.locator("#detail-name").inner_text() == "images/train/img2.jpg"
    assert "values outside" in page.locator("#detail-findings").inner_text()
    mask = written["masks"][("train", "img2.jpg")]
    labelled = mask[mask < len(CLASSES)]
    legend = page.locator("#legend li.legend-row").evaluate_all(
        "rows => rows.map(r => [Number(r.dataset.class), Number(r.dataset.share)])")
    assert sum(share for _, share in legend) == pytest.approx(1.0)
    assert dict(legend) == pytest.approx({c: float((labelled == c).mean()) for c in np.unique(labelled).tolist()})
    assert page.locator("#detail-ignore").inner_text().startswith("ignored:")


@needs_browser
def test_keys_open_step_through_and_close_the_detail_view(browser, written):
    page, _ = open_page(browser, written["page"])
    alerts = record_dialogs(page)
    page.select_option("#filter-split", "0")  # train: img0 .. img3 and the odd name
    thumbs = page.locator("#grid button.thumb")
    thumbs.first.focus()
    page.keyboard.press("Enter")
    name = page.locator("#detail-name")
    assert page.locator("#detail").evaluate("d => d.open") and name.inner_text() == "images/train/img0.jpg"
    legend_names = page.locator("#legend .class-name").all_inner_texts()
    assert EVIL in legend_names and not alerts  # class 1 is in img0: its name is text
    page.keyboard.press("ArrowRight")
    assert name.inner_text() == "images/train/img1.jpg"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert name.inner_text() == f"images/train/{ODD_NAME}.jpg"
    assert page.evaluate("location.hash") == "#train/4"
    page.keyboard.press("ArrowLeft")
    assert name.inner_text() == "images/train/img3.jpg"
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('detail').open")
    page.wait_for_function("() => document.activeElement.dataset.key === 'train/3'")  # back at its thumbnail
    page.keyboard.press("Space")
    assert page.locator("#detail").evaluate("d => d.open") and name.inner_text() == "images/train/img3.jpg"
    load_every_image(page)
    assert not broken_images(page)


@needs_browser
def test_the_opacity_slider_and_the_mask_toggle(browser, written):
    page, _ = open_page(browser, written["page"])
    page.locator("#grid button.thumb").first.click()
    mask = page.locator("#detail-mask")
    assert mask.evaluate("m => getComputedStyle(m).opacity") == "0.5"
    page.locator("#detail-opacity").fill("20")
    assert mask.evaluate("m => getComputedStyle(m).opacity") == "0.2"
    page.locator("#detail-toggle").click()
    assert mask.evaluate("m => getComputedStyle(m).opacity") == "1"
    assert page.locator("#detail-image").evaluate("m => getComputedStyle(m).visibility") == "hidden"
    page.keyboard.press("m")
    assert page.locator("#detail-image").evaluate("m => getComputedStyle(m).visibility") == "visible"
    assert screenshot_spread(page) > 15


def test_a_link_or_a_file_as_the_page_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    for name, words in (("link", "is a symlink"), ("file", "is not a folder")):
        with pytest.raises(UnsafePathError, match=words):
            check_data.run(check_config(root, f"page={tmp_path / name}", "splits=[train]"))
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("override, key", [
    ("page_thumb_size=0", "page_thumb_size"), ("page_image_size=-5", "page_image_size"),
    ("page_workers=-1", "page_workers"),
])
def test_page_options_are_checked_with_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        check_data.run(check_config(tmp_path, f"page={tmp_path / 'page'}", override))
    assert error.value.key == key
    with pytest.raises(ConfigError, match="page_workers"):
        check_options(10, 10, True)


def test_a_process_pool_draws_the_same_page(tmp_path):
    def records(workers: int) -> list:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="check_data", overrides=[
                "dataset.train_size=6", "dataset.image_size=[24,24]", "splits=[train]", "progress_bar=false",
                f"page={tmp_path / str(workers)}", f"page_workers={workers}"])
        assert check_data.run(cfg) == 0
        text = (tmp_path / str(workers) / "data.js").read_text()
        return json.loads(text.removeprefix("window.segkitDataset = ").rstrip().rstrip(";"))["images"]

    pooled = records(2)
    assert pooled == records(1) and len(pooled) == 6
    assert len(list((tmp_path / "2" / "thumbs").rglob("*.jpg"))) == 6


@needs_browser
def test_twenty_thousand_images_are_interactive_within_seconds(browser, tmp_path):
    """Only data.js grows with the set; the page draws one page of thumbnails. The bound is generous on
    purpose (machines differ); the page is interactive in well under a second on a laptop."""
    count, splits = 20_000, ["train", "val"]
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        split = splits[i % 2]
        present = rng.choice(3, size=int(rng.integers(1, 4)), replace=False)
        images.append(PageImage(split, i // 2, f"images/{split}/{i // 2:06d}.jpg", 640, 480,
                                sample_path(split, i // 2), {int(c): 1000 * (int(c) + 1) for c in present}))
    header = PageHeader("big", None, ["a", "b", "c"], stable_palette(3), 192)
    summaries = [SplitSummary(split, count // 2, count // 2, 0, 0, [1, 1, 1], [1, 1, 1]) for split in splits]
    write_data(tmp_path, page_data(header, splits, images, []))
    (tmp_path / "dataset_page.js").write_text(
        (Path(__file__).parents[1] / "segkit" / "reporting" / "dataset_page.js").read_text())
    (tmp_path / "index.html").write_text(page_markup(header, summaries, count, 0))
    assert (tmp_path / "index.html").stat().st_size < 20_000  # the markup does not grow with the images
    with_class_2 = sum(1 for image in images if 2 in image.pixels)

    started = time.monotonic()
    page, outside = open_page(browser, tmp_path / "index.html")
    assert page.locator("#grid button.thumb").count() == 60
    page.select_option("#filter-class", "2")
    assert page.locator("#page-range").inner_text().startswith(f"1\u201360 of {with_class_2} ")
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"{elapsed:.1f} s to an interactive page of {count} images"
    assert not outside
