"""The typed stage results read what older versions wrote: a compare.json and a decision.json in the shape tunewise
wrote before the results were typed open, render and print, and write back what was read."""

import json

import pytest

from tunewise.results import Comparison, Decision, EvalSummary

_SUMMARY = {  # summary.json before the typed results: nulls where nothing was measured, no graders
    "variant": {"name": "base", "kind": "base"}, "model": "m", "split": "test", "items": 4, "constrained_to": None,
    "metrics": {"accuracy": {"mean": 0.5, "ci95": [0.0, 1.0], "n": 4}}, "reference_perplexity": None,
    "latency_s": {"p50": 0.1, "p95": 0.2}, "items_per_s": 10.0, "processes": 1, "generated_tokens_per_s": 30.0,
    "prompt_tokens_mean": 20.0, "completion_tokens_mean": 3.0, "cost_per_1k_queries_usd": 0.01, "wall_s": 0.4,
    "data": {"train": {"sha256": "a" * 64}, "test": {"sha256": "b" * 64}}, "config_sha256": "c" * 64, "fingerprint": "f", "config": {},
}
OLD_COMPARE_JSON = {
    "reference_variant": "base",
    "variants": {"base": _SUMMARY, "fine-tuned": {**_SUMMARY, "variant": {"name": "fine-tuned", "kind": "fine-tuned"},
                                                  "metrics": {"accuracy": {"mean": 0.75, "ci95": [0.25, 1.0], "n": 4}},
                                                  "reference_perplexity": {"mean": 3.5, "ci95": [3.0, 4.0], "n": 4}}},
    "paired_vs_reference": {"fine-tuned": {"accuracy": {"diff": {"mean": 0.25, "ci95": [0.0, 0.5], "n": 4}, "p_value": 0.5}}},
}
_ROW = {"route": "prompt", "variant": "base", "best_of_route": True, "validation": 0.5, "test": 0.5, "test_ci95": [0.0, 1.0], "meets_goal": False,
        "test_below_goal": False, "latency_p50_s": 0.1, "latency_p95_s": 0.2, "items_per_s": 10.0, "prompt_tokens": 20.0,
        "per_1k_queries_usd": 0.01, "hosted": False, "training_usd": 0.0, "training_hours": 0.0, "retraining_usd_per_year": 0.0,
        "serving_usd_per_year": 3.6, "first_year_usd": 3.6}
OLD_DECISION_JSON = {  # decision.json before the typed results (no gate: the chosen route was not trained)
    "goal": {"metric": "accuracy", "threshold": 0.7}, "met": True, "met_at": "fine-tune", "chosen": "fine-tune", "chosen_variant": "fine-tuned",
    "evidence": [_ROW, {**_ROW, "route": "fine-tune", "variant": "fine-tuned", "validation": 0.8, "test": 0.75, "meets_goal": True,
                        "training_usd": 0.2, "training_hours": 0.1, "first_year_usd": 4.0}],
    "roi": {"against": "base (prompt)", "extra_cost_usd_per_year": 0.4, "accuracy_gain": 0.25, "more_correct_answers_per_year": 91250.0,
            "cost_per_extra_correct_answer_usd": 4.4e-06},
    "why": "fine-tuned (fine-tune) meets accuracy >= 0.7.", "not_measured": [], "validation_only": [], "hosted_vs_local": None,
    "advice_before": {"recommendation": "fine-tune", "ranking": [{"route": "fine-tune", "points": 3, "reasons": ["labels"]}]},
    "estimates_for_untried": {"rag": {"per_query_usd": 1e-05, "training_usd": 0.0, "training_hours": 0.0, "first_year_usd": 3.7}},
    "hardware": {"name": "cpu", "device": "cpu", "tflops": 0.1, "hour_usd": 0.1}, "prices": {"cpu_hour_usd": 0.1},
    "use_case": {"queries_per_day": 1000}, "training": {"wall_s": 360.0}, "config_sha256": "c" * 64, "wall_s": 600.0,
    "steps": [{"step": "advise", "at_s": 1.0, "recommendation": "fine-tune"}], "report": "report.html", "compare_report": "compare.html",
}


def test_an_old_compare_json_opens_renders_and_writes_back_what_it_read(tmp_path):
    from tunewise.report.html import compare_report

    c = Comparison.model_validate(OLD_COMPARE_JSON)
    s = c.variants["fine-tuned"]
    assert isinstance(s, EvalSummary) and s.kind == "fine-tuned" and s.value("accuracy") == 0.75 and s.value("bleu") is None
    assert c.paired("fine-tuned", "accuracy").p_value == 0.5 and c.paired("base", "accuracy") is None
    assert str(s.metrics["accuracy"]) == "0.750 [0.250, 1.000]" and not s.reused
    back = c.to_json()
    for name, old in OLD_COMPARE_JSON["variants"].items():  # every key that held a value comes back as it was
        assert {k: v for k, v in old.items() if v is not None} == back["variants"][name]
    assert back["paired_vs_reference"] == OLD_COMPARE_JSON["paired_vs_reference"]
    for name in c.variants:
        (tmp_path / name).mkdir()
        (tmp_path / name / "items.jsonl").write_text("\n".join(json.dumps({"i": i, "input": f"q{i}", "reference": "a", "output": "a",
                                                                             "scores": {"accuracy": 1.0}}) for i in range(4)))
    page = compare_report(c, tmp_path, ["accuracy"]).read_text()
    assert "fine-tuned" in page and "0.750 (p=0.5)" in page and "3.50 [3.00, 4.00]" in page


def test_a_typo_in_a_result_fails_where_it_is_made():
    s = EvalSummary.model_validate(_SUMMARY)
    with pytest.raises(AttributeError):
        s.metrcs  # noqa: B018
    assert s.reused is False and "reused" not in s.to_json()  # a flag of the returned object, never written


def test_an_old_decision_json_opens_renders_and_prints(tmp_path, capsys):
    from tunewise.cli import _run_and_print
    from tunewise.report.decision_html import decision_report

    (tmp_path / "decision.json").write_text(json.dumps(OLD_DECISION_JSON))
    d = Decision.read(tmp_path / "decision.json")
    assert d.goal.metric == "accuracy" and d.row("fine-tuned").meets and not d.row("base").meets and d.gate is None
    assert d.roi.roi is None and d.roi.more_correct_answers_per_year == 91250.0
    back = d.to_json()
    assert {k: back[k] for k in OLD_DECISION_JSON} == OLD_DECISION_JSON | {"roi": {**OLD_DECISION_JSON["roi"], "roi": None}}
    page = decision_report(d, tmp_path / "report.html").read_text()
    assert "fine-tuned" in page and "91,250 more correct answers a year" in page
    _run_and_print(lambda step, live: d)
    out = capsys.readouterr().out
    assert "chosen:" in out and "fine-tune (fine-tuned)" in out and "wall time 600 s" in out


def test_an_old_trials_json_opens_and_renders(tmp_path):
    from tunewise.report.html import tune_report
    from tunewise.results import TuneResult

    old = {"study": "tiny", "direction": "minimize", "objective": "validation loss",
           "best": {"number": 1, "value": 2.5, "ci95": None, "params": {"training.learning_rate": 0.001}, "is_defaults": False},
           "defaults": {"number": 0, "value": 2.7}, "importances": {"training.learning_rate": 1.0},
           "trials": [{"number": 0, "state": "COMPLETE", "value": 2.7, "params": {"training.learning_rate": 0.0002}, "is_defaults": True,
                       "defaults": ["learning_rate=2e-4"], "steps": 6, "best_val_loss": 2.7, "wall_s": 3.0, "duration_s": 3.1},
                      {"number": 1, "state": "COMPLETE", "value": 2.5, "params": {"training.learning_rate": 0.001}, "pid": 7, "duration_s": 2.9},
                      {"number": 2, "state": "PRUNED", "value": None, "params": {"training.learning_rate": 0.01}, "duration_s": 1.0}],
           "best_yaml": "best.yaml", "set": "--set training.learning_rate=0.001"}
    r = TuneResult.model_validate(old)
    assert [t.number for t in r.completed] == [0, 1] and r.trials[0].is_defaults and r.trials[1].pid == 7  # unknown keys kept
    page = tune_report(r, tmp_path / "report.html").read_text()
    assert "0 (defaults)" in page and "pruned" in page and "--set training.learning_rate=0.001" in page


def test_files_of_kb_index_export_bfcl_and_the_gate_suites_written_before_typing_still_read(tmp_path):
    from tunewise.results import BfclReport, ExportResult, IndexManifest, SuiteResult

    manifest = {"documents": 3, "chunks": 7, "stored": 7, "removed_from_store": 0, "bad_files": [{"path": "a.pdf", "reason": "unsupported"}],
                "embedding_model": "m", "dim": 384, "embedding_cache": {"hits": 1, "misses": 6}, "store": "embedded",
                "bm25_stemmer": None, "chunk_tokens": 256, "chunk_overlap": 32, "seconds": 1.5}
    m = IndexManifest.model_validate(manifest)
    assert m.bad_files[0].path == "a.pdf" and m.dim == 384 and m.to_json() == manifest
    export = {"source": "s", "base_model": "b", "name": "n:1", "gguf": {"path": "x.gguf", "arch": "llama", "quant": "f16", "pre": "smollm",
              "tensors": {"F16": 18, "F32": 2}, "bytes": 10}, "stop_tokens": ["<|im_end|>"], "commands": {"llama.cpp": "llama-server"}}
    e = ExportResult.model_validate(export)
    assert e.gguf.tensors["F16"] == 18 and e.adapter is None and e.to_json() == export  # no nulls written for what a format lacks
    bfcl = {"variant": {"name": "base"}, "model": "m", "categories": {"simple_python": {"mean": 0.5, "ci95": [0.2, 0.8], "n": 4, "wall_s": 2.0}},
            "max_new_tokens": 128, "non_live_ast_mean": None, "irrelevance": None, "wall_s": 2.0, "samples_per_category": 4}
    b = BfclReport.model_validate(bfcl)
    assert str(b.categories["simple_python"]) == "0.500 [0.200, 0.800]" and {k: b.to_json()[k] for k in bfcl} == bfcl
    b.dir = "somewhere"
    assert "dir" not in b.to_json()  # where the files are is not written into them
    suite = {"suite": "advbench", "refusal_rate": {"mean": 0.9, "ci95": [0.8, 1.0], "n": 10}, "items": 10, "wall_s": 3.0}
    s = SuiteResult.model_validate(suite)
    assert s.value("refusal_rate").mean == 0.9 and s.to_json() == suite
    with pytest.raises(KeyError, match="no accuracy"):
        s.value("accuracy")
