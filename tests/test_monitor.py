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


def test_surges_flag_a_dense_new_topic_and_nothing_in_the_same_distribution():
    from tunewise.monitor import surges

    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(rng.normal(size=(30, 16)))
    draw = lambda n, c: unit(c[rng.integers(0, len(c), n)] + 0.2 * rng.normal(size=(n, 16)))  # noqa: E731
    ref = draw(1000, centres[:25])
    same, counts = surges(draw(300, centres[:25]), ref)
    assert len(same) <= 3 and counts.mean() < 0.3 * 20  # the null: about the 23% the sample sizes predict
    prod = np.concatenate([draw(240, centres[:25]), draw(60, centres[25:26])])  # one topic training never had
    flagged, _ = surges(prod, ref)
    assert len(flagged) >= 40 and (flagged >= 240).mean() >= 0.9  # the flagged are (nearly) all the new topic's


def test_monitor_finds_held_back_intents_that_are_not_far_as_surges(tiny_model, tmp_path):
    every = list(csv.DictReader(open(BANKING_TRAIN)))
    random.Random(2).shuffle(every)
    new = {"automatic_top_up", "pending_transfer", "exchange_rate"}
    old = [r for r in every if r["category"] not in new]
    path = _project(tmp_path, tiny_model, old[:800])
    prod = old[800:950] + [r for r in every if r["category"] in new][:75]
    random.Random(0).shuffle(prod)
    _log(tmp_path / "new", [(r["text"], "card_arrival") for r in prod])
    out = CliRunner().invoke(app, ["monitor", str(path), "--log-dir", str(tmp_path / "new")])
    assert out.exit_code == 3, out.output
    got = json.loads((tmp_path / "runs" / "tiny" / "monitor" / "monitor.json").read_text())
    intent = {r["text"]: r["category"] for r in prod}
    assert any(a.startswith("surges:") for a in got["alerts"]), got["alerts"]
    top = got["surges"]["clusters"][:3]
    assert {max(new, key=lambda n: sum(intent[q] == n for q in c["queries"])) for c in top} == new  # one cluster per new intent
    flagged = [q for c in got["surges"]["clusters"] for q in c["queries"]]
    assert sum(intent[q] in new for q in flagged) >= 0.8 * len(flagged)
    assert got["surges"]["clusters"][0]["answers"][0][0] == "card_arrival"  # what the model answered them
