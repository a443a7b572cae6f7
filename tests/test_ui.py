"""`tunewise ui` through its HTTP interface: pages, the live metrics stream, jobs that run and stop as processes
and survive a restart of the UI, registry promote (refused without a passing verdict) and rollback, and the
guards: token, cross-site requests, CSRF, names that are not in the lists, a config that stops validating."""

import json
import re
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from tunewise.config import load_config
from tunewise.registry import Registry, registry_path
from tunewise.ui.app import create_ui


def _csrf(page: str) -> str:
    return re.search(r'name="csrf" content="([^"]+)"', page).group(1)


def _wait(client, jid, states=("done", "failed", "stopped", "lost"), timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{jid}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {jid} still {job['state']}")


@pytest.fixture
def ui(tiny_project, tmp_path):
    path = tiny_project(max_steps=4, eval_every=2, save_every=2)
    app = create_ui([path], tmp_path / "ws")
    return TestClient(app), path, app


def test_pages_jobs_and_the_live_stream(ui, tmp_path):
    client, path, app = ui
    assert "tiny" in client.get("/").text
    page = client.get("/p/0").text
    csrf = _csrf(page)
    r = client.post("/p/0/jobs", data={"command": "train", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    jid = r.headers["location"].rsplit("/", 1)[1]
    job = _wait(client, jid)
    assert job["state"] == "done" and job["rc"] == 0, client.get(f"/jobs/{jid}").text
    assert 'href="/p/0/run/train"' in client.get("/p/0").text
    events = client.get("/p/0/run/train/events?once=1").text
    rows = [json.loads(x[6:]) for x in events.splitlines() if x.startswith("data: {") and '"step"' in x]
    metrics = [json.loads(x) for x in (load_config(path).train_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == metrics and "event: end" in events
    assert "EventSource" in client.get("/p/0/run/train").text and "data" in client.get("/p/0").text
    assert client.get("/p/0/report/data").status_code == 200  # the data report the training's preparation wrote
    # the job list survives a restart of the UI
    again = TestClient(create_ui([path], tmp_path / "ws"))
    assert again.get(f"/api/jobs/{jid}").json()["state"] == "done" and jid in again.get("/jobs").text


def test_a_running_training_job_stops_with_a_checkpoint(tiny_project, tmp_path):
    path = tiny_project(max_steps=400, eval_every=1000, save_every=3)
    client = TestClient(create_ui([path], tmp_path / "ws"))
    csrf = _csrf(client.get("/p/0").text)
    jid = client.post("/p/0/jobs", data={"command": "train", "csrf": csrf}, follow_redirects=False).headers["location"].rsplit("/", 1)[1]
    ckpts = load_config(path).train_dir / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        time.sleep(0.3)
    assert "stop job" in client.get("/p/0/run/train").text
    client.post(f"/jobs/{jid}/stop", data={"csrf": csrf})
    job = _wait(client, jid)
    assert job["state"] == "stopped" and job["rc"] == 130, client.get(f"/jobs/{jid}").text
    assert "--resume" in client.get(f"/jobs/{jid}").text  # the log says how to go on


def test_registry_promote_needs_a_passing_verdict_or_a_reason(ui, tiny_model, tmp_path):
    client, path, _ = ui
    cfg = load_config(path)
    reg = Registry(registry_path(cfg))
    import shutil

    dirs = []
    for k in (1, 2):  # two different models (the registry keeps one version per content)
        d = shutil.copytree(tiny_model, tmp_path / f"m{k}")
        (d / "note.txt").write_text(f"model {k}")
        dirs.append(d)
    a = reg.register("tiny", str(dirs[0]), str(tiny_model), adapter=False)
    b = reg.register("tiny", str(dirs[1]), str(tiny_model), adapter=False)
    reg.promote(a.id, {"passed": True})
    reg.close()
    csrf = _csrf(client.get("/p/0/registry").text)
    refused = client.post("/p/0/registry/promote", data={"csrf": csrf, "version": str(b.version)})
    assert refused.status_code == 409 and "refused: tiny:2 cannot be promoted: it was never gated" in refused.text, re.findall(r"<p class=\"bad\">(.*?)</p>", refused.text)
    forced = client.post("/p/0/registry/promote", data={"csrf": csrf, "version": "2", "force": "1", "reason": "hotfix approved by Ana"})
    assert forced.status_code == 200 and "hotfix approved by Ana" in forced.text and "tiny:2 <b" in forced.text
    back = client.post("/p/0/registry/rollback", data={"csrf": csrf})
    assert back.status_code == 200 and "production: <b>tiny:1</b>" in back.text


def test_guards(tiny_project, tmp_path):
    path = tiny_project()
    app = create_ui([path], tmp_path / "ws", token="s3cret")
    client = TestClient(app)
    assert client.get("/").status_code == 401 and client.get("/?token=wrong").status_code == 401
    assert client.get("/?token=s3cret").status_code == 200 and client.get("/p/0").status_code == 200  # the cookie keeps it
    csrf = _csrf(client.get("/p/0").text)
    cross = client.post("/p/0/jobs", data={"command": "train", "csrf": csrf}, headers={"origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.text
    assert client.post("/p/0/jobs", data={"command": "train", "csrf": "forged"}).status_code == 403
    assert client.post("/p/0/jobs", data={"command": "rm -rf", "csrf": csrf}).status_code == 400
    assert client.get("/p/0/run/..%2F..%2Fetc").status_code == 404 and client.get("/p/0/report/passwd").status_code == 404
    assert client.get("/p/7").status_code == 404
    raw = yaml.safe_load(path.read_text())
    raw["training"]["method"] = "nope"
    path.write_text(yaml.safe_dump(raw))  # the config stops validating after the UI started
    bad = client.post("/p/0/jobs", data={"command": "train", "csrf": csrf})
    assert bad.status_code == 400 and "the config does not validate" in bad.text and "training.method" in bad.text
    assert client.get("/").status_code == 200  # and the UI goes on


def _run(path, samples: int):
    """`tunewise run` on the tiny project through every route (an unreachable goal), base and fine-tuned, no gate."""
    from typer.testing import CliRunner

    from tunewise.cli import app as cli

    r = CliRunner().invoke(cli, ["run", str(path), "--set", "goal.threshold=1.01", "--set", "evaluation.max_new_tokens=4",
                                 "--set", "evaluation.perplexity=false", "--set", "hardware.matmul_tflops=0.05",
                                 "--set", "evaluation.variants=[{name: base, kind: base}, {name: fine-tuned, kind: fine-tuned}]",
                                 "--validation-samples", str(samples), "--test-samples", str(samples), "--no-gate"])
    assert r.exit_code == 0, r.output
    return load_config(path)


def test_data_compare_decision_pages_and_the_playground_api(tiny_project, tmp_path):
    path = tiny_project(max_steps=2, eval_every=2, save_every=2)
    cfg = _run(path, 12)
    client = TestClient(create_ui([path], tmp_path / "ws"))
    # data: counts per step, the quarantine searchable (the 240 rows hold exact and near duplicates)
    quarantine = [json.loads(x) for x in (cfg.run_dir / "data" / "quarantine.jsonl").read_text().splitlines()]
    page = client.get("/p/0/data").text
    assert "Cleaning steps" in page and f"of {len(quarantine):,}" in page
    where = quarantine[0]["where"]
    found = client.get("/p/0/data", params={"q": where}).text
    assert html_escape(f"{quarantine[0]['file']}:{where}") in found and f"(1 of {len(quarantine):,})" in found
    assert "(0 of" in client.get("/p/0/data", params={"q": "no such text anywhere"}).text
    # compare: the run's test items, filtered by label; confusions
    items = [json.loads(x) for x in (cfg.run_dir / "run" / "test" / "base" / "items.jsonl").read_text().splitlines()]
    page = client.get("/p/0/compare").text
    assert f"Items ({len(items)} of {len(items)} match" in page and "vegaEmbed" in page and "Confusions of fine-tuned" in page
    label = items[0]["reference"]
    n_label = sum(1 for x in items if x["reference"] == label)
    assert f"Items ({n_label} of {len(items)} match" in client.get("/p/0/compare", params={"label": label}).text
    # decision: the routes, the goal, the quality-against-cost chart
    dec = json.loads((cfg.run_dir / "run" / "decision.json").read_text())
    page = client.get("/p/0/decision").text
    assert all(e["variant"] in page for e in dec["evidence"]) and "first-year cost (USD, log scale)" in page
    assert client.get("/static/vega-lite.min.js").status_code == 200 and client.get("/static/../app.py").status_code == 404
    # playground: the project's server behind the UI's CSRF header; streamed chunks end with [DONE]
    page = client.get("/p/0/playground").text
    csrf = _csrf(page)
    assert '<option selected>base</option>' in page
    body = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 5, "temperature": 0}
    assert client.post("/p/0/api/v1/chat/completions", json=body).status_code == 403
    streamed = client.post("/p/0/api/v1/chat/completions", json=body, headers={"x-csrf": csrf})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(x[6:]) for x in streamed.text.splitlines() if x.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    missing = client.post("/p/0/api/v1/chat/completions", json={**body, "model": "tiny:9"}, headers={"x-csrf": csrf})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]
    assert not cfg.serve_log_dir.exists() or not any(cfg.serve_log_dir.iterdir()), "playground chats are not production traffic"


def html_escape(s):
    import html

    return html.escape(s)


PAYLOAD = "<script>alert(1)</script>"


def test_a_records_markup_is_escaped_on_every_page_and_report(tiny_project, tmp_path):
    """Training records whose text and label are `<script>alert(1)</script>` (one duplicated, so it is quarantined too):
    through the data, compare and decision pages, the project and registry pages, and the data, compare and decision
    reports, the payload shows only escaped."""
    path = tiny_project(max_steps=2, eval_every=2, save_every=2)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    rows = [lines[0]] + [f'"{PAYLOAD} {x.rsplit(",", 1)[0]}",{x.rsplit(",", 1)[1]}' if i % 3 == 0 else x for i, x in enumerate(lines[1:])]
    rows += [f'"{PAYLOAD} top up",{PAYLOAD}'] * 2 + [f'"{PAYLOAD} card {i}",{PAYLOAD}' for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = _run(path, 24)
    client = TestClient(create_ui([path], tmp_path / "ws"))
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    shown = {}
    for url in ("/", "/p/0", "/p/0/data", "/p/0/compare", "/p/0/decision", "/p/0/registry", "/jobs"):
        shown[url] = client.get(url).text
    for report in ("data/report.html", "run/test/report.html", "run/report.html"):
        shown[report] = (cfg.run_dir / report).read_text()
    for where, text in shown.items():
        assert PAYLOAD not in text, f"{where} shows the record's markup unescaped"
    for where in ("/p/0/data", "/p/0/compare", "data/report.html", "run/test/report.html"):
        assert escaped in shown[where], f"{where} does not show the record at all"
    for where, text in shown.items():  # and nothing of our own markup was escaped by the change
        assert "&lt;h2&gt;" not in text and "&lt;table&gt;" not in text and "&lt;form" not in text and "&lt;a href" not in text, where
