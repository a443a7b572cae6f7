"""`tunewise ui` in a real browser: Playwright driving Debian's chromium. Open a project, start a tiny-model training
from the page, watch its curve gain points while it runs, stop it; try to promote a model that was never gated and
see it refused; roll back with nothing to roll back to; on a project after `tunewise run`, filter compare's items by
label, see the decision's chart, and chat with two models at once in the playground, both answers streamed. Screenshots of the pages go to the test's directory, or to
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


def _finished_project(path: Path, where: Path) -> Path:
    """A second project beside the first, after `tunewise run` (data, compare and decision pages to look at)."""
    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app

    raw = yaml.safe_load(path.read_text())
    raw.update(project="tiny-done", output_dir=str(where / "runs"))
    raw["data"]["train"] = str(path.parent / raw["data"]["train"])
    raw["training"].update(max_steps=2, eval_every=2, save_every=2)
    where.mkdir(parents=True)
    (where / "tunewise.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["run", str(where / "tunewise.yaml"), "--set", "goal.threshold=1.01", "--set", "evaluation.max_new_tokens=4",
                                 "--set", "evaluation.perplexity=false", "--set", "hardware.matmul_tflops=0.05",
                                 "--set", "evaluation.variants=[{name: base, kind: base}, {name: fine-tuned, kind: fine-tuned}]",
                                 "--validation-samples", "12", "--test-samples", "12", "--no-gate"])
    assert r.exit_code == 0, r.output
    return where / "tunewise.yaml"


@pytest.fixture
def ui_url(tiny_project, tiny_model, tmp_path):
    import shutil

    import uvicorn

    from tunewise.config import load_config
    from tunewise.registry import Registry, registry_path
    from tunewise.ui.app import create_ui

    path = tiny_project(max_steps=300, eval_every=10, save_every=10)
    done = _finished_project(path, tmp_path / "p2")
    reg = Registry(registry_path(load_config(path)))
    model = shutil.copytree(tiny_model, tmp_path / "m1")
    reg.register("tiny", str(model), str(tiny_model), adapter=False)
    reg.close()
    port = _port()
    srv = uvicorn.Server(uvicorn.Config(create_ui([path, done], tmp_path / "ws"), host="127.0.0.1", port=port, log_level="warning"))
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
        rows = "window.views && window.views.loss ? window.views.loss.data('rows').length : 0"
        page.wait_for_function(f"({rows}) > 0", timeout=60_000)
        first = page.evaluate(rows)
        page.wait_for_function(f"({rows}) > {first}", timeout=60_000)  # the chart gained points while we watched
        assert page.locator("#loss svg path").count() >= 1 and "loss (nats per loss token)" in page.text_content("#loss")
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
        # a finished project: compare with its items filtered by label, the decision's quality-against-cost chart
        page.goto(ui_url + "/p/1/compare")
        page.wait_for_selector("#quality svg", timeout=30_000)
        label = page.locator("select[name=label] option").nth(1).text_content()
        page.select_option("select[name=label]", label)
        page.click("button:has-text('filter')")
        refs = [c.text_content() for c in page.locator("#items tbody tr td:nth-child(3)").all()]
        assert refs and set(refs) == {label}
        page.screenshot(path=str(SHOTS / "ui-compare.png"), full_page=True)
        page.goto(ui_url + "/p/1/decision")
        page.wait_for_selector("#tradeoff svg", timeout=30_000)
        assert "first-year cost (USD, log scale)" in page.text_content("#tradeoff")
        page.screenshot(path=str(SHOTS / "ui-decision.png"), full_page=True)
        # the playground: one message, two models, both answers streamed
        page.goto(ui_url + "/p/1/playground")
        page.fill("#prompt", "I lost my card, what do I do?")
        page.select_option("#m1", "production")
        page.click("#send")
        for i in (0, 1):
            page.wait_for_function(f"document.getElementById('s{i}').textContent.startsWith('done')", timeout=120_000)
        assert all(page.text_content(f"#o{i}").strip() for i in (0, 1))
        page.screenshot(path=str(SHOTS / "ui-playground.png"), full_page=True)
        browser.close()
