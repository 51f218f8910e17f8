"""A real browser for the static pages segkit writes: Playwright driving the system Chromium.

The pages (the evaluation report, the dataset page) are opened from file:// as a user opens them, with
every request outside the page's own folder refused, so a page that reaches for a CDN or the network fails
its test. Keys are pressed through the browser's input pipeline (trusted events), not dispatched by script.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if BROWSER is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def open_page(browser, path: Path, *, width: int = 1280, height: int = 900):
    """Open a page written to disk; returns (page, requests_outside) - the URLs it tried outside its folder."""
    page = browser.new_page(viewport={"width": width, "height": height})
    folder = path.parent.resolve().as_uri() + "/"
    outside: list[str] = []

    def route(route) -> None:
        if route.request.url.startswith(folder):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, outside


def broken_images(page) -> list[str]:
    """Sources of <img> elements that are in the document, were asked to load and did not decode."""
    return page.evaluate("""() => Array.from(document.images)
        .filter(img => img.getAttribute('src') && img.complete && img.naturalWidth === 0)
        .map(img => img.getAttribute('src'))""")


def screenshot_spread(page) -> float:
    """Standard deviation of the screenshot's grey values: about 0 for a blank (single-colour) page."""
    grey = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("L"), dtype=np.float64)
    return float(grey.std())


def record_dialogs(page) -> list[str]:
    """What alert() / confirm() would show on `page` from now on (each dismissed): empty unless a name ran as
    script."""
    dialogs: list[str] = []

    def dismiss(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    return dialogs
