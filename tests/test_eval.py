"""Evaluation and comparison: variants as config, per-item output, CIs, paired tests, few-shot selection."""

import json

from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.config import load_config
from tunewise.data.records import Record
from tunewise.eval.evaluate import build_prompt, select_shots

from .conftest import BANKING_TRAIN

runner = CliRunner()


def rec(text, label, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    return Record(msgs, "f", label=label)


def test_build_prompt_places_system_shots_then_question():
    r = rec("where is my card", "card_arrival", system="own")
    shots = [rec("lost card", "lost_or_stolen_card"), rec("new card?", "card_arrival")]
    p = build_prompt(r, "Classify.", shots)
    assert [m["role"] for m in p] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert p[0]["content"] == "Classify." and p[2]["content"] == "lost_or_stolen_card" and p[-1]["content"] == "where is my card"
    assert build_prompt(r, None, None) == [{"role": "system", "content": "own"}, {"role": "user", "content": "where is my card"}]


def test_similar_shots_share_the_label_far_more_than_random():
    import csv

    rows = list(csv.DictReader(open(BANKING_TRAIN)))
    train = [rec(r["text"], r["category"]) for r in rows[::4]]  # the file is sorted by label: sample across it
    items = [rec(r["text"], r["category"]) for r in rows[1::170]]
    def share(shots):
        return sum(s.label == it.label for it, ss in zip(items, shots) for s in ss) / (len(items) * 3)
    similar, rand = share(select_shots(train, items, 3, "similar")), share(select_shots(train, items, 3, "random"))
    assert similar > 0.5 and rand < 0.1, (similar, rand)
    assert select_shots(train, items, 3, "random") == select_shots(train, items, 3, "random")  # seeded


def test_compare_three_variants_on_tiny_model(tiny_project, tmp_path):
    cfg_path = tiny_project(max_steps=4, method="lora")
    assert runner.invoke(app, ["train", str(cfg_path)]).exit_code == 0
    overrides = ["--set", "evaluation.max_samples=10", "--set", "evaluation.max_new_tokens=4",
                 "--set", "evaluation.variants=[{name: base, kind: base}, {name: shots, kind: few-shot, k: 2, selection: random}, {name: ft, kind: fine-tuned}]"]
    r = runner.invoke(app, ["compare", str(cfg_path), *overrides])
    assert r.exit_code == 0, r.output
    assert "base" in r.output and "shots" in r.output and "ft" in r.output and "p=" in r.output
    ev = tmp_path / "runs" / "tiny" / "eval"
    result = json.loads((ev / "compare.json").read_text())
    assert set(result["paired_vs_reference"]) == {"shots", "ft"}
    for name in ("base", "shots", "ft"):
        s = result["variants"][name]
        assert s["items"] == 10 and set(s["metrics"]) == {"accuracy", "exact_match", "token_f1"}
        ppl = s["reference_perplexity"]
        assert ppl["mean"] > 1 and ppl["ci95"][0] <= ppl["mean"] <= ppl["ci95"][1] and "reference_nll" in json.loads((ev / name / "items.jsonl").read_text().splitlines()[0])
        lo, hi = s["metrics"]["accuracy"]["ci95"]
        assert lo <= s["metrics"]["accuracy"]["mean"] <= hi
        rows = [json.loads(x) for x in (ev / name / "items.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and all("accuracy" in x["scores"] for x in rows)
    page = (ev / "report.html").read_text()
    assert "<svg" in page and "Lineage" in page and "shots" in page and "report:" in r.output
    v = result["variants"]
    assert v["shots"]["prompt_tokens_mean"] > v["base"]["prompt_tokens_mean"]  # shots cost context tokens
    assert v["shots"]["cost_per_1k_queries_usd"] > v["base"]["cost_per_1k_queries_usd"]
    # The fine-tuned variant really runs the adapter: same outputs as the engine loaded with it.
    from tunewise.engine import Engine
    from tunewise.eval.evaluate import build_prompt as bp
    from tunewise.data.prepared import load_prepared

    cfg = load_config(cfg_path)
    from tunewise.data.split import sample_records

    items = sample_records(load_prepared(cfg.run_dir / "data").splits["test"], 10)
    eng = Engine.load(cfg.model.name, str(cfg.run_dir / "train" / "model"))
    labels = sorted({x.label for x in load_prepared(cfg.run_dir / "data").splits["train"]})
    assert s["constrained_to"] == len(labels)  # classification with labels: answers constrained by default
    expected = [o.text for o in eng.generate([bp(x, cfg.data.system_prompt, None) for x in items], max_new_tokens=4, adapter="default",
                                             choices=labels)]
    got = [json.loads(x)["output"] for x in (ev / "ft" / "items.jsonl").read_text().splitlines()]
    assert got == expected and all(g in labels for g in got)
    # evaluation.constrain: none is free decoding, which the random tiny model does not turn into labels
    r = runner.invoke(app, ["eval", str(cfg_path), "--variant", "ft", *overrides, "--set", "evaluation.constrain=none"])
    assert r.exit_code == 0, r.output
    free = [json.loads(x)["output"] for x in (ev / "ft" / "items.jsonl").read_text().splitlines()]
    assert free == [o.text for o in eng.generate([bp(x, cfg.data.system_prompt, None) for x in items], max_new_tokens=4, adapter="default")]
    assert not all(f in labels for f in free)


def test_constrain_labels_on_data_without_labels_names_the_key(tiny_project, tmp_path):
    import yaml

    cfg_path = tiny_project()
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["columns"].pop("label")
    cfg["evaluation"] = {"constrain": "labels", "max_samples": 2}
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["eval", str(cfg_path), "--variant", "base"])
    assert r.exit_code == 2 and "evaluation.constrain: labels" in r.output and "data.columns.label" in r.output, r.output


def test_eval_unknown_variant_and_missing_model(tiny_project):
    cfg_path = tiny_project()
    r = runner.invoke(app, ["eval", str(cfg_path), "--variant", "nope"])
    assert r.exit_code == 2 and "unknown variant 'nope'" in r.output
    r = runner.invoke(app, ["eval", str(cfg_path), "--variant", "fine-tuned", "--set", "evaluation.max_samples=2"])
    assert r.exit_code == 2 and "no trained model" in r.output


def test_report_renders_in_headless_chromium(tmp_path):
    """Renders a report page built from real compare output shapes and checks the screenshot is not blank."""
    import pytest

    from tunewise.report.html import compare_report
    from tunewise.report.screenshot import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    ev = tmp_path / "eval"
    variants = {}
    for n, acc in (("base", 0.1), ("fine-tuned", 0.6)):
        (ev / n).mkdir(parents=True)
        rows = [{"input": f"q{i}", "reference": "a", "output": "a" if i < acc * 10 else "b", "scores": {"accuracy": float(i < acc * 10)}} for i in range(10)]
        (ev / n / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        variants[n] = {"items": 10, "split": "test", "model": str(tmp_path / n), "variant": {"kind": "base"},
                       "metrics": {"accuracy": {"mean": acc, "ci95": [acc - 0.1, acc + 0.1], "n": 10}},
                       "latency_s": {"p50": 0.1, "p95": 0.2}, "items_per_s": 5.0, "prompt_tokens_mean": 50, "cost_per_1k_queries_usd": 0.01,
                       "config_sha256": "0" * 64, "data": {}}
    from tunewise.results import Comparison

    result = Comparison.model_validate({"reference_variant": "base", "variants": variants, "paired_vs_reference": {
        "fine-tuned": {"accuracy": {"diff": {"mean": 0.5, "ci95": [0.2, 0.8], "n": 10}, "p_value": 0.01}}}})
    page = compare_report(result, ev, ["accuracy"])
    png = screenshot(page, tmp_path / "report.png", height=900)
    import struct

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 900)
    assert len(data) > 15000  # a blank 1200x900 page compresses to a few KB; text and bars do not
