"""`tunewise advise` on three contrasting use cases, the cost model's arithmetic, and `tunewise run`."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunewise.advise import costs
from tunewise.advise.decide import advise
from tunewise.cli import app
from tunewise.config import load_config

from .conftest import banking_rows

HW = costs.Hardware(device="cpu", name="test CPU", tflops=0.05, memory_gb=24, hour_usd=0.1)  # fixed: no probe in unit tests


def _project(tmp_path, tiny_model, use_case: dict, rows: int, kb: bool = False, task_rows: str | None = None) -> object:
    (tmp_path / "train.csv").write_text(task_rows or banking_rows(rows))
    cfg = {"project": "adv", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
           "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"},
                    "system_prompt": "Answer briefly."},
           "use_case": use_case}
    if kb:
        (tmp_path / "kb").mkdir()
        (tmp_path / "kb" / "faq.md").write_text("# Fees\n\nTransfers within the EU are free. Card top-ups cost 1%.\n")
        cfg["rag"] = {"knowledge_base": ["kb"]}
    (tmp_path / "tunewise.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(tmp_path / "tunewise.yaml")


def test_fast_changing_faq_with_citations_gets_rag(tmp_path, tiny_model, smol_tokenizer):
    cfg = _project(tmp_path, tiny_model, {"task": "qa", "knowledge_changes": "weekly", "citations": True, "queries_per_day": 2000}, rows=60, kb=True)
    a = advise(cfg, smol_tokenizer, hw=HW)
    assert a.recommendation == "rag"
    why = " ".join(a.ranking[0].reasons)
    assert "cite" in why and "weekly" in why
    ft = a.route("fine-tune")
    assert ft.points < 0 and any("stale" in x for x in ft.reasons)


def test_high_volume_stable_classification_gets_fine_tuning(tmp_path, tiny_model, smol_tokenizer):
    cfg = _project(tmp_path, tiny_model, {"task": "classification", "knowledge_changes": "never", "queries_per_day": 50_000,
                                          "latency_ms": 300}, rows=1500)
    a = advise(cfg, smol_tokenizer, hw=HW)
    assert a.recommendation == "fine-tune"
    why = " ".join(a.ranking[0].reasons)
    assert "labelled examples to learn it from" in why and a.facts["examples"] > 1400 and "50,000 queries" in why and "latency" in why
    ft = a.ranking[0].cost
    prompt = a.route("prompt").cost
    assert ft["prompt_tokens"] < prompt["prompt_tokens"] and ft["per_query_usd"] < prompt["per_query_usd"]  # shorter prompts
    assert ft["training_usd"] > 0 and ft["break_even_vs_prompt_queries_per_day"] is not None


def test_tiny_context_formatting_task_gets_prompting(tmp_path, tiny_model, smol_tokenizer):
    rows = "text,category\n" + "\n".join(f"date {d} March 2024,2024-03-{d:02d}" for d in range(1, 31)) + "\n"
    cfg = _project(tmp_path, tiny_model, {"task": "formatting", "queries_per_day": 100}, rows=0, task_rows=rows)
    a = advise(cfg, smol_tokenizer, hw=HW)
    assert a.recommendation == "prompt"
    assert any("short prompt" in x for x in a.ranking[0].reasons)
    assert any("too few" in x for x in a.route("fine-tune").reasons)


def test_three_use_cases_differ_from_the_cli(tmp_path, tiny_model):
    cfg = _project(tmp_path, tiny_model, {"task": "qa", "knowledge_changes": "daily", "citations": True}, rows=40, kb=True)
    r = CliRunner().invoke(app, ["advise", str(tmp_path / "tunewise.yaml"), "--set", "hardware.matmul_tflops=0.05"])
    assert r.exit_code == 0, r.output
    assert "recommended: rag" in r.output and "training estimate" in r.output
    r = CliRunner().invoke(app, ["advise", str(tmp_path / "tunewise.yaml"), "--set", "hardware.matmul_tflops=0.05", "--json"])
    assert json.loads(r.output)["recommendation"] == "rag"
    assert cfg.use_case.citations


def test_flops_and_memory_arithmetic():
    shape = costs.ModelShape(layers=2, hidden=64, intermediate=256, heads=4, kv_heads=2, vocab=1000, params=200_000)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 256
    assert shape.layer_matmul_params == per_layer
    assert shape.matmul_params == 2 * per_layer + 1000 * 64
    fwd = costs.forward_flops_per_token(shape, seq=10)
    assert fwd == 2 * shape.matmul_params + 2 * 2 * 64 * 10
    assert costs.train_flops_per_token(shape, "full", 10) == 3 * fwd
    lora = costs.train_flops_per_token(shape, "lora", 10, lora_r=4)
    assert lora == 2 * fwd + 6 * costs.lora_params(shape, 4)
    assert costs.train_flops_per_token(shape, "qlora", 10, lora_r=4) == pytest.approx(lora * costs.QLORA_DEQUANT_OVERHEAD)
    assert lora < costs.train_flops_per_token(shape, "freeze", 10, trainable_layers=2) <= 3 * fwd + 2 * 1000 * 64
    full = costs.train_memory_gb(shape, "full", 4, 16)
    lo = costs.train_memory_gb(shape, "lora", 4, 16)
    assert full["grads_optimizer"] > lo["grads_optimizer"] and full["weights"] == lo["weights"]
    assert costs.train_memory_gb(shape, "qlora", 4, 16, device="cuda")["weights"] < costs.train_memory_gb(shape, "lora", 4, 16, device="cuda")["weights"]
    # b pays 100 up front and saves 0.01 per query: even after 100 / (0.01 * 365) queries a day
    assert costs.break_even_queries_per_day(0, 0.02, 100, 0.01) == pytest.approx(100 / (0.01 * 365))
    assert costs.break_even_queries_per_day(0, 0.01, 100, 0.02) is None


def test_run_stops_when_the_goal_is_met_and_goes_on_when_not(tiny_project, tmp_path):
    path = tiny_project(max_steps=2, eval_every=2, save_every=2)
    base = ["--set", "evaluation.max_new_tokens=4", "--set", "evaluation.perplexity=false", "--set", "hardware.matmul_tflops=0.05",
            "--set", "evaluation.variants=[{name: base, kind: base}, {name: fine-tuned, kind: fine-tuned}]",
            "--validation-samples", "12", "--test-samples", "12"]
    r = CliRunner().invoke(app, ["run", str(path), "--set", "goal.threshold=0.0"] + base)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "runs" / "tiny" / "run" / "decision.json").read_text())
    assert d["met"] and d["met_at"] == "prompt" and d["chosen"] == "prompt"
    assert [e["route"] for e in d["evidence"]] == ["prompt"] and not (tmp_path / "runs" / "tiny" / "train").exists()
    assert "fine-tune" in d["estimates_for_untried"] and (tmp_path / "runs" / "tiny" / "run" / "report.html").exists()

    r = CliRunner().invoke(app, ["run", str(path), "--set", "goal.threshold=1.01"] + base)  # unreachable: every route is tried
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "runs" / "tiny" / "run" / "decision.json").read_text())
    assert not d["met"] and [e["route"] for e in d["evidence"]] == ["prompt", "fine-tune"]
    assert d["training"]["steps"] == 2 and "goal not met" in r.output
    steps = [s["step"] for s in d["steps"]]
    assert "train" in steps and "validate fine-tuned" in steps and "goal met" not in steps
    validated = [s for s in d["steps"] if s["step"] == "validate base"]
    assert validated[0]["reused"]  # the first run's validation result, same fingerprint

    r = CliRunner().invoke(app, ["run", str(path), "--set", "goal.threshold=1.01"] + base)  # nothing changed: all reused
    d = json.loads((tmp_path / "runs" / "tiny" / "run" / "decision.json").read_text())
    assert d["training"]["reused"] and all(s.get("reused", True) for s in d["steps"] if s["step"].startswith("validate"))


def test_run_needs_a_threshold(tiny_project):
    r = CliRunner().invoke(app, ["run", str(tiny_project())])
    assert r.exit_code == 2 and "goal.threshold" in r.output
