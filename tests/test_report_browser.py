"""The HTML report as a person sees it: opened in headless Chromium, every image loads, every class listed."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from segkit.cli import evaluate as evaluate_cli
from segkit.engine.trainer import fit

from .conftest import CONF_DIR, TINY

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")
CLASSES = ["background", "disc", "square", "triangle"]

# Appended to a copy of the report: after the page has loaded, mark each image as decoded or broken.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    img.setAttribute('data-loaded', img.complete && img.naturalWidth > 0 ? 'yes' : 'no');
  }
  document.body.setAttribute('data-checked', 'yes');
});
</script></body>"""


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
            "progress_bar=false", "save_masks=false", "worst_n=3", *overrides,
        ])
    evaluate_cli.run(evaluate)
    return run_dir.parent / name / "report" / "report.html"


@pytest.fixture(scope="module")
def report(run_dir):
    return evaluated_report(run_dir, "eval")


def chromium(*args: str, profile) -> str:
    assert BROWSER is not None
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def loaded_dom(page, profile) -> str:
    checked = page.with_name(f"{page.stem}_checked.html")
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT))
    dom = chromium("--dump-dom", checked.as_uri(), profile=profile)
    assert 'data-checked="yes"' in dom, "the check script did not run"
    return dom


def test_every_image_loads_and_every_class_is_in_the_table(report, tmp_path):
    dom = loaded_dom(report, tmp_path / "profile")
    images = re.findall(r"<img [^>]*>", dom)
    assert len(images) == 4 + 3  # IoU bars, confusion matrix, reliability diagram, training curves + 3 worst images
    broken = [tag for tag in images if 'data-loaded="yes"' not in tag]
    assert not broken, broken
    found = re.search(r'<table id="per-class">(.*?)</table>', dom, re.S)
    assert found is not None
    table = found.group(1)
    rows = re.findall(r'<tr class="class-row">(.*?)</tr>', table, re.S)
    names = [re.sub(r"<[^>]+>", "", row.split("</td>")[0]).strip() for row in rows]
    assert names == CLASSES


def test_uncertainty_maps_show_beside_each_worst_image(run_dir, report, tmp_path):
    with_maps = evaluated_report(run_dir, "eval_uncertainty", "uncertainty_maps=true", "tta=true",
                                 "tta_scales=[1.0]", "uncertainty_method=tta_variance")
    dom = loaded_dom(with_maps, tmp_path / "profile")
    images = re.findall(r"<img [^>]*>", dom)
    panels = [tag for tag in images if "_uncertainty.png" in tag]
    assert len(images) == 4 + 3 + 3 and len(panels) == 3  # + the maps of each of the 3 worst images
    broken = [tag for tag in images if 'data-loaded="yes"' not in tag]
    assert not broken, broken
    assert "entropy / log C" in dom and "variance" in dom
    without = loaded_dom(report, tmp_path / "profile")  # uncertainty_maps=false (the default): none
    assert "_uncertainty.png" not in without and "entropy / log C" not in without


def test_the_check_notices_a_broken_image(report, tmp_path):
    page = report.with_name("broken.html")
    page.write_text(
        '<html><body><img src="images/missing.png"><img src="images/confusion.png"></body></html>\n'
    )
    dom = loaded_dom(page, tmp_path / "profile")
    assert re.findall(r'data-loaded="(\w+)"', dom) == ["no", "yes"]


def test_screenshot_shows_the_report(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1100,1400", "--hide-scrollbars", report.as_uri(),
             profile=tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1100)
    assert pixels.std() > 20  # text, tables and charts, not a blank page
