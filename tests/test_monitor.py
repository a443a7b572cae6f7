"""`tunewise monitor`: quiet on production queries drawn from the same data as training, alerting (drift, far
queries in clusters, exit 3) on a planted shift; the drift test on synthetic samples in both directions."""

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.data.prodlog import RequestLog

from .conftest import BANKING_TRAIN

QA = Path(__file__).resolve().parents[1] / "examples" / "knowledge-qa" / "data" / "test.jsonl"


def test_mmd_test_tells_a_shift_from_the_same_distribution():
    from tunewise.monitor import mmd_test

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 8)), rng.normal(size=(90, 8))
    assert mmd_test(a, b, 200)[1] > 0.05  # the same distribution: no evidence of a difference
    assert mmd_test(a, b + 0.6, 200)[1] < 0.01  # a shifted mean


def _log(path: Path, queries: list[tuple[str, str]]):
    plog = RequestLog(path, fsync=False)
    for i, (q, a) in enumerate(queries):
        plog.log_request(f"r{i}", "production", "p:1", "chat.completion", [{"role": "user", "content": q}],
                         [SimpleNamespace(text=a, finish_reason="stop", prompt_tokens=9, completion_tokens=2)], 0.2)


def _project(tmp_path, tiny_model, rows) -> Path:
    import yaml

    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "project": "tiny", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"}}}))
    return tmp_path / "t.yaml"


def test_monitor_is_quiet_on_the_same_data_and_alerts_on_a_planted_shift(tiny_model, tmp_path):
    every = list(csv.DictReader(open(BANKING_TRAIN)))
    random.Random(1).shuffle(every)
    path = _project(tmp_path, tiny_model, every[:600])  # training: 600 random queries of the 77 intents
    rows = every[600:800]  # production: 200 other queries drawn the same way
    _log(tmp_path / "same", [(r["text"], r["category"]) for r in rows])
    runner = CliRunner()
    quiet = runner.invoke(app, ["monitor", str(path), "--log-dir", str(tmp_path / "same")])
    assert quiet.exit_code == 0, quiet.output
    got = json.loads((tmp_path / "runs" / "tiny" / "monitor" / "monitor.json").read_text())
    assert got["verdict"] == "ok" and got["drift"]["p_value"] >= 0.01 and got["far"]["share"] <= 0.05, got["alerts"]

    qa = [json.loads(x)["messages"][0]["content"] for x in QA.read_text().splitlines()[:120]]
    mixed = [(r["text"], r["category"]) for r in rows[:100]] + [(q, "card_arrival") for q in qa]
    random.Random(0).shuffle(mixed)
    _log(tmp_path / "shift", mixed)
    loud = runner.invoke(app, ["monitor", str(path), "--log-dir", str(tmp_path / "shift")])
    assert loud.exit_code == 3, loud.output
    got = json.loads((tmp_path / "runs" / "tiny" / "monitor" / "monitor.json").read_text())
    assert got["drift"]["p_value"] < 0.01 and got["far"]["share"] > 0.2
    far_examples = {e for c in got["far"]["clusters"] for e in c["examples"]}
    assert len(far_examples & set(qa)) >= 0.9 * len(far_examples)  # what is far is the planted questions
    assert any(a.startswith("drift:") for a in got["alerts"]) and any(a.startswith("far queries:") for a in got["alerts"])
    assert "alert: drift" in " ".join(loud.output.split())


def test_monitor_with_too_few_queries_gives_no_verdict(tiny_model, tmp_path):
    path = _project(tmp_path, tiny_model, list(csv.DictReader(open(BANKING_TRAIN)))[:50])
    _log(tmp_path / "few", [("where is my card", "card_arrival")] * 3)
    out = CliRunner().invoke(app, ["monitor", str(path), "--log-dir", str(tmp_path / "few")])
    assert out.exit_code == 0 and "too few logged queries" in out.output
