"""The page at / in a real headless browser: draw a digit on the MNIST panel, read back the prediction.

The browser is the system's chromium (Debian: ``apt-get install -y chromium``), driven by playwright
through ``executable_path``: playwright never downloads a browser of its own here. The screenshot is
saved under tests/artifacts/ (git-ignored) and its path printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fpt_deploy.serving import ServeConfig

from tests.serving.live import live_server

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
INSTALL = "install one with `apt-get install -y chromium` (Debian) and `pip install -e '.[dev]'` (playwright)"


def system_chromium() -> str:
    for path in (os.environ.get("FPT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    pytest.skip(f"needs a chromium browser, none is on PATH; {INSTALL}")


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason=f"needs playwright; {INSTALL}")
    executable = system_chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def draw_a_one(page, canvas) -> None:
    """A vertical stroke down the middle of the canvas, as a user would draw a 1."""
    box = canvas.bounding_box()
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x + step * 0.5, box["y"] + box["height"] * (0.15 + 0.07 * step))
    page.mouse.up()


def test_draw_a_digit_and_read_back_the_prediction(browser, exported_repo):
    config = ServeConfig(repo=exported_repo, threads=1, max_queue_delay_ms=1)
    with live_server(config) as live:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"http://{live.http_url}/")
        panel = page.locator('section[data-task="mnist"]')
        panel.wait_for(timeout=15_000)
        assert page.locator('section[data-task="bit-xor"] [data-testid="bits"] button').count() > 0  # toggles
        draw_a_one(page, panel.locator('[data-testid="draw"]'))
        panel.locator('[data-testid="predict-mnist"]').click()
        prediction = panel.locator('[data-testid="prediction-mnist"]')
        page.wait_for_function(
            "el => el.textContent.startsWith('prediction:') || el.classList.contains('error')",
            arg=prediction.element_handle(),
            timeout=15_000,
        )
        text = prediction.text_content()
        assert text.startswith("prediction: "), text
        digit = text.removeprefix("prediction: ")
        labels = live.state.model.task("mnist").labels
        assert digit in labels
        bars = panel.locator('[data-testid="bars-mnist"] .bar')
        assert bars.count() == len(labels)  # one bar per class
        # the live panel reads the statistics: the request just made is counted for mnist
        page.wait_for_function(
            "() => { const r = document.querySelector('#live-tasks tr[data-task=\"mnist\"]');"
            " return r && Number(r.children[1].textContent) >= 1; }",
            timeout=15_000,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "page-after-prediction.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot} (prediction {digit!r})")
        assert shot.stat().st_size > 10_000
