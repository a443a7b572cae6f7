"""`tunewise ui` in a real browser: Playwright driving Debian's chromium. Open a project, start a tiny-model training
from the page, watch its curve gain points while it runs, stop it; try to promote a model that was never gated and
see it refused; roll back with nothing to roll back to. Screenshots of the pages go to the test's directory, or to
$TUNEWISE_SHOTS (docs/screenshots/ holds those the README links: TUNEWISE_SHOTS=docs/screenshots)."""

import socket
import threading
import time
from pathlib import Path

import pytest

from tunewise.report.screenshot import find_chromium



def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui_url(tiny_project, tiny_model, tmp_path):
    import shutil

    import uvicorn

    from tunewise.config import load_config
    from tunewise.registry import Registry, registry_path
    from tunewise.ui.app import create_ui

    path = tiny_project(max_steps=300, eval_every=10, save_every=10)
    reg = Registry(registry_path(load_config(path)))
    model = shutil.copytree(tiny_model, tmp_path / "m1")
    reg.register("tiny", str(model), str(tiny_model), adapter=False)
    reg.close()
    port = _port()
    srv = uvicorn.Server(uvicorn.Config(create_ui([path], tmp_path / "ws"), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(timeout=10)


def test_the_dashboard_in_chromium(ui_url, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    import os

    SHOTS = Path(os.environ.get("TUNEWISE_SHOTS") or tmp_path / "shots")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(ui_url)
        page.click("text=tiny")
        page.select_option("select[name=command]", "train")
        page.click("button:has-text('start job')")
        page.wait_for_selector("text=running", timeout=30_000)
        deadline = time.time() + 120
        while time.time() < deadline:  # the run appears on the project page once its first step is logged
            page.goto(ui_url + "/p/0")
            if page.locator("a[href='/p/0/run/train']").count():
                break
            time.sleep(0.5)
        page.screenshot(path=str(SHOTS / "ui-project.png"), full_page=True)
        page.click("a[href='/p/0/run/train']")
        page.wait_for_function("document.getElementById('status').textContent.includes('rows')", timeout=60_000)
        first = int(page.text_content("#status").split()[0])
        page.wait_for_function(f"parseInt(document.getElementById('status').textContent) > {first}", timeout=60_000)
        assert page.locator("#loss polyline").count() == 1  # the curve is drawn, and it gained points while we watched
        page.screenshot(path=str(SHOTS / "ui-run.png"), full_page=True)
        page.click("button:has-text('stop job')")
        page.wait_for_selector("text=stopped", timeout=90_000)
        assert "--resume" in page.text_content("pre")
        page.goto(ui_url + "/p/0/registry")
        page.screenshot(path=str(SHOTS / "ui-registry.png"), full_page=True)
        page.click("button:has-text('promote')")
        assert "refused: tiny:1 cannot be promoted: it was never gated" in page.text_content("body")
        page.goto(ui_url + "/p/0/registry")
        page.click("button:has-text('rollback')")
        assert "refused" in page.text_content("body")
        browser.close()
