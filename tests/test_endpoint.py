"""Endpoint variants against a real OpenAI-compatible server on localhost (tests/endpoint_server.py), the official
openai SDK as the client: cost from reported usage, latency, retries of 429/5xx, timeouts, the cache, the spending cap,
and the errors that must come before any work."""

import json
import os

import pytest
import yaml

from tunewise.config import load_config
from tunewise.eval.endpoint import EndpointError, SpendCapReached, match_label, worst_case_prompt_tokens

from .endpoint_server import FakeEndpoint


def _items(cfg):
    from tunewise.data.prepare import ensure_prepared
    from tunewise.data.split import sample_records
    from tunewise.models import load_tokenizer

    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    return sample_records(prepared.splits[cfg.evaluation.split], cfg.evaluation.max_samples)


def _project(tiny_project, url: str, variants=None, **endpoint):
    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    ep = {"base_url": url, "model": "hosted-mini", "api_key_env": None, "price_per_1m_input_tokens": 2.0,
          "price_per_1m_output_tokens": 8.0, "backoff_s": 0.0, **endpoint}
    raw["evaluation"] = {"max_samples": 12, "max_new_tokens": 8, "perplexity": False,
                         "variants": variants or [{"name": "hosted", "kind": "endpoint", "endpoint": ep}]}
    if variants:
        for v in raw["evaluation"]["variants"]:
            if v["kind"] == "endpoint":
                v["endpoint"] = ep
    path.write_text(yaml.safe_dump(raw))
    return path


def _answers(cfg, right: int) -> dict:
    """The hosted model's answers: the label for the first `right` items, a wrong one for the rest."""
    items = _items(cfg)
    out = {}
    for i, r in enumerate(items):
        out[r.messages[-2]["content"]] = r.label if i < right else "definitely_not_a_label"
    return out


def test_compare_local_variants_with_an_endpoint(tiny_project, tmp_path):
    from tunewise.eval.evaluate import compare
    from tunewise.train.loop import train

    with FakeEndpoint() as server:
        variants = [{"name": "base", "kind": "base"}, {"name": "few-shot", "kind": "few-shot", "k": 2},
                    {"name": "fine-tuned", "kind": "fine-tuned"}, {"name": "hosted", "kind": "endpoint"}]
        cfg = load_config(_project(tiny_project, server.url, variants))
        server.answers = _answers(cfg, right=9)
        train(cfg, cfg.train_dir)
        result = compare(cfg)
        assert list(result.variants) == ["base", "few-shot", "fine-tuned", "hosted"]
        s = result.variants["hosted"]
        assert s.items == 12 and server.requests == 12
        assert s.metrics["accuracy"].mean == pytest.approx(9 / 12)
        rows = [json.loads(x) for x in (cfg.run_dir / "eval" / "hosted" / "items.jsonl").read_text().splitlines()]
        # cost per 1k queries is what the server reported, at the configured prices (2 and 8 USD per 1M tokens)
        expected = 1000 * (sum(r["prompt_tokens"] for r in rows) / 12 * 2e-6 + sum(r["completion_tokens"] for r in rows) / 12 * 8e-6)
        assert s.cost_per_1k_queries_usd == pytest.approx(expected) and expected > 0
        assert all(r["prompt_tokens"] > 0 and r["latency_s"] > 0 for r in rows)
        assert s.endpoint["answered"] == 12 and s.endpoint["cache_hits"] == 0
        assert s.endpoint["spent_usd"] == pytest.approx(expected * 12 / 1000)
        # the labels were given to the hosted model in its system turn (the local variants decode through the trie)
        assert "Answer with exactly one of these labels" in server.seen[0]["messages"][0]["content"]
        assert "hosted" in result.paired_vs_reference
        # a second compare, evaluating everything again: every answer from the cache, no request sent
        again = compare(cfg, reuse=False)
        assert server.requests == 12
        h = again.variants["hosted"]
        assert h.endpoint["cache_hits"] == 12 and h.endpoint["requests"] == 0 and h.endpoint["spent_usd"] == 0
        assert h.metrics == s.metrics and h.cost_per_1k_queries_usd == pytest.approx(s.cost_per_1k_queries_usd)


def test_429_and_500_are_retried_and_counted(tiny_project):
    from tunewise.eval.evaluate import compare

    with FakeEndpoint() as server:
        cfg = load_config(_project(tiny_project, server.url, concurrency=1))
        server.answers = _answers(cfg, right=12)
        server.failures = [429, 500, 503]
        s = compare(cfg).variants["hosted"]
        assert s.metrics["accuracy"].mean == 1.0
        assert s.endpoint["retries"] == {"429": 1, "500": 1, "503": 1}
        assert s.endpoint["requests"] == server.requests == 15


def test_a_timeout_is_an_error_naming_the_variant(tiny_project):
    from tunewise.eval.evaluate import compare

    with FakeEndpoint() as server:
        cfg = load_config(_project(tiny_project, server.url, concurrency=1, timeout_s=0.3, max_retries=1))
        server.failures = [("sleep", 2.0), ("sleep", 2.0)]
        with pytest.raises(EndpointError, match=r"evaluation\.variants\[hosted\]\.endpoint\.timeout_s.*no answer within "
                                                r"timeout_s=0\.3 \(2 tries; max_retries=1\)"):
            compare(cfg)


def test_the_spending_cap_stops_before_it_is_crossed(tiny_project):
    from tunewise.eval.evaluate import Engines, compare

    with FakeEndpoint() as server:
        path = _project(tiny_project, server.url, concurrency=3)
        cfg = load_config(path)
        server.answers = _answers(cfg, right=12)
        spent = compare(cfg).variants["hosted"].endpoint["spent_usd"]  # uncapped: what the 12 answers cost
        # a request is sent only while spent + in flight + its worst case (prompt bytes as tokens at 2 USD/1M, 8 output
        # tokens at 8 USD/1M) stays within the cap: with the cap at half the bill plus the largest worst case, at least
        # one request goes and never all 12
        worst = max(worst_case_prompt_tokens(b["messages"]) * 2e-6 + 8 * 8e-6 for b in server.seen)
        cap = spent / 2 + worst
        cfg.endpoint_cache.unlink()
        raw = yaml.safe_load(path.read_text())
        raw["evaluation"]["variants"][0]["endpoint"]["max_usd"] = cap
        path.write_text(yaml.safe_dump(raw))
        server.requests = 0
        engines = Engines(load_config(path))
        with pytest.raises(SpendCapReached, match=r"variants\[hosted\]\.endpoint\.max_usd: the spending cap .* would be crossed .* of 12 items"):
            compare(load_config(path), engines=engines, reuse=False)
        client = engines.endpoints["hosted"]
        assert 0 < server.requests < 12
        assert client.ledger.spent <= cap and client.ledger.reserved == pytest.approx(0.0, abs=1e-12)
        # what was answered is cached: a re-run without the cap pays only for the rest
        raw["evaluation"]["variants"][0]["endpoint"]["max_usd"] = None
        path.write_text(yaml.safe_dump(raw))
        before = server.requests
        s = compare(load_config(path), reuse=False).variants["hosted"]
        assert s.endpoint["cache_hits"] == before and server.requests == 12


def test_endpoint_errors_come_before_any_work(tiny_project, monkeypatch):
    from tunewise.eval.evaluate import compare

    monkeypatch.delenv("TUNEWISE_TEST_KEY", raising=False)
    with FakeEndpoint(key="sk-right") as server:
        cases = [({"api_key_env": "TUNEWISE_TEST_KEY"}, r"variants\[hosted\]\.endpoint\.api_key_env: the environment variable TUNEWISE_TEST_KEY is not set"),
                 ({"base_url": "http://127.0.0.1:9/v1", "api_key_env": None, "max_retries": 0}, r"variants\[hosted\]\.endpoint\.base_url: cannot reach"),
                 ({"model": "gpt-9-imaginary", "api_key_env": "TUNEWISE_TEST_KEY"}, r"variants\[hosted\]\.endpoint\.model: .* does not serve 'gpt-9-imaginary'"),
                 ({"api_key_env": "TUNEWISE_TEST_KEY", "_key": "sk-wrong"}, r"variants\[hosted\]\.endpoint\.api_key_env: .* refused the key in TUNEWISE_TEST_KEY")]
        for endpoint, message in cases:
            key = endpoint.pop("_key", "sk-right")
            if "model" in endpoint or key != "sk-right":
                monkeypatch.setenv("TUNEWISE_TEST_KEY", key)
            cfg = load_config(_project(tiny_project, server.url, **endpoint))
            with pytest.raises(EndpointError, match=message) as err:
                compare(cfg)
            assert "sk-right" not in str(err.value) and "sk-wrong" not in str(err.value)  # a key is never printed
            assert not (cfg.run_dir / "data").exists(), "the error came after data preparation"
            monkeypatch.delenv("TUNEWISE_TEST_KEY", raising=False)
        assert server.requests == 0


def test_endpoint_config_errors_name_the_key(tmp_path):
    from tunewise.config import ConfigError

    (tmp_path / "train.csv").write_text("text,label\nhi,greet\n")
    for variant, message in [({"name": "h", "kind": "endpoint"}, r"evaluation\.variants\.0.*give the endpoint keys"),
                             ({"name": "h", "kind": "base", "endpoint": {"base_url": "http://x/v1", "model": "m"}}, "only a kind: endpoint variant"),
                             ({"name": "h", "kind": "endpoint", "endpoint": {"base_url": "x", "model": "m"}}, r"endpoint\.base_url"),
                             ({"name": "h", "kind": "endpoint", "endpoint": {"base_url": "http://x/v1", "model": "m", "api_key": "sk-1"}},
                              r"endpoint\.api_key: unknown key")]:
        (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": {"format": "csv", "train": "train.csv"}, "evaluation": {"variants": [variant]}}))
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "t.yaml")


def test_match_label():
    labels = ["card_arrival", "card_linking", "top_up_failed"]
    assert match_label(" Card_Arrival.", labels) == "card_arrival"
    assert match_label("The intent is top up failed.", labels) == "top_up_failed"
    assert match_label("no idea", labels) == "no idea"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def _all_answers(cfg) -> dict:
    from tunewise.data.prepare import ensure_prepared
    from tunewise.models import load_tokenizer

    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    return {r.messages[-2]["content"]: r.label for split in prepared.splits.values() for r in split}


RUN = ["--set", "evaluation.max_new_tokens=4", "--set", "hardware.matmul_tflops=0.05", "--set", "goal.threshold=1.01",
       "--validation-samples", "12", "--test-samples", "12", "--no-gate"]


def test_run_puts_the_hosted_route_beside_the_fine_tune(tiny_project, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    path = tiny_project(max_steps=2, eval_every=2, save_every=2)
    with FakeEndpoint() as server:
        variants = [{"name": "base", "kind": "base"}, {"name": "gpt-mini", "kind": "endpoint"}, {"name": "fine-tuned", "kind": "fine-tuned"}]
        _project(lambda: path, server.url, variants)
        server.answers = _all_answers(load_config(path))
        r = CliRunner().invoke(app, ["run", str(path)] + RUN)
        assert r.exit_code == 0, r.output
        d = json.loads((tmp_path / "runs" / "tiny" / "run" / "decision.json").read_text())
        assert [e["route"] for e in d["evidence"]] == ["prompt", "hosted", "fine-tune"]
        hosted = next(e for e in d["evidence"] if e["route"] == "hosted")
        assert hosted["test"] == 1.0 and hosted["hosted"] and hosted["training_usd"] == 0 and hosted["per_1k_queries_usd"] > 0
        s = json.loads((tmp_path / "runs" / "tiny" / "run" / "test" / "gpt-mini" / "summary.json").read_text())
        assert hosted["per_1k_queries_usd"] == pytest.approx(s["cost_per_1k_queries_usd"])  # from the usage the server reported
        assert hosted["serving_usd_per_year"] == pytest.approx(s["cost_per_1k_queries_usd"] / 1000 * 1000 * 365)  # 1,000 queries a day
        hv = d["hosted_vs_local"]
        assert hv["hosted"] == "gpt-mini" and hv["local"] == "fine-tuned" and hv["hosted_test"] == 1.0
        ft = next(e for e in d["evidence"] if e["route"] == "fine-tune")
        if hv["break_even_queries_per_day"] is not None:  # where the two first-year costs meet
            q = hv["break_even_queries_per_day"]
            year = lambda e: e["training_usd"] + e["retraining_usd_per_year"] + e["per_1k_queries_usd"] / 1000 * q * 365  # noqa: E731
            assert year(ft) == pytest.approx(year(hosted))
        assert d["not_measured"] == [] and "hosted or local" in r.output
        assert "Hosted or local" in (tmp_path / "runs" / "tiny" / "run" / "report.html").read_text()


def test_run_without_the_key_reports_the_hosted_route_as_not_measured(tiny_project, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunewise.cli import app

    monkeypatch.delenv("TUNEWISE_NO_SUCH_KEY", raising=False)
    path = tiny_project(max_steps=2, eval_every=2, save_every=2)
    variants = [{"name": "base", "kind": "base"}, {"name": "gpt-mini", "kind": "endpoint"}]
    _project(lambda: path, "https://api.openai.com/v1", variants, api_key_env="TUNEWISE_NO_SUCH_KEY")
    r = CliRunner().invoke(app, ["run", str(path)] + RUN)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "runs" / "tiny" / "run" / "decision.json").read_text())
    assert [n["variant"] for n in d["not_measured"]] == ["gpt-mini"]
    assert "TUNEWISE_NO_SUCH_KEY is not set" in d["not_measured"][0]["reason"] and "hosted" not in [e["route"] for e in d["evidence"]]
    assert "not measured" in r.output and "gpt-mini (hosted) was not measured" in d["why"]
    assert any(s["step"] == "hosted" and "not measured" in s["skipped"] for s in d["steps"])
    assert "hosted" in d["estimates_for_untried"]  # its cost-model estimate stays in the report
    assert "not measured: " in (tmp_path / "runs" / "tiny" / "run" / "report.html").read_text()


def test_on_premises_keeps_data_off_hosted_endpoints(tiny_project):
    from tunewise.eval.endpoint import is_local
    from tunewise.eval.evaluate import compare

    assert is_local("http://127.0.0.1:8000/v1") and is_local("http://10.1.2.3/v1") and is_local("http://vllm.internal/v1")
    assert not is_local("https://api.openai.com/v1") and not is_local("http://8.8.8.8/v1")
    path = _project(tiny_project, "https://api.openai.com/v1", api_key_env=None)
    raw = yaml.safe_load(path.read_text())
    raw["use_case"] = {"on_premises": True}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(EndpointError, match=r"variants\[hosted\]\.endpoint\.base_url: use_case\.on_premises is true.*would leave our machines"):
        compare(load_config(path))
    with FakeEndpoint() as server:  # a server of our own (loopback) is measured under on_premises
        path = _project(tiny_project, server.url)
        raw = yaml.safe_load(path.read_text())
        raw["use_case"] = {"on_premises": True}
        path.write_text(yaml.safe_dump(raw))
        assert compare(load_config(path)).variants["hosted"].items == 12


def test_a_goal_met_on_validation_but_not_on_test_is_not_met(tmp_path, tiny_model):
    """A test file with a class the training file (and so validation) lacks: `data prepare` says the two differ, and a
    variant that meets the goal on validation but whose test CI lies below it is not reported as meeting it."""
    from typer.testing import CliRunner

    from tunewise.cli import app

    train = [f"alpha request number {i},A" for i in range(60)] + [f"beta question number {i},B" for i in range(60)]
    test = [f"alpha request {i} again,A" for i in range(10)] + [f"beta question {i} again,B" for i in range(10)] + \
           [f"gamma issue number {i},C" for i in range(10)]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(train) + "\n")
    (tmp_path / "test.csv").write_text("text,label\n" + "\n".join(test) + "\n")
    with FakeEndpoint() as server:
        path = tmp_path / "tunewise.yaml"
        path.write_text(yaml.safe_dump({
            "project": "shift", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
            "data": {"format": "csv", "train": "train.csv", "test": "test.csv", "columns": {"user": "text", "assistant": "label", "label": "label"},
                     "split": {"validation": 0.2, "seed": 1}, "max_length": 64, "clean": {"near_dedup": False}},
            "evaluation": {"max_new_tokens": 4, "perplexity": False, "variants": [
                {"name": "hosted", "kind": "endpoint", "endpoint": {"base_url": server.url, "model": "hosted-mini", "api_key_env": None}}]},
            "goal": {"metric": "accuracy", "threshold": 0.9}, "hardware": {"matmul_tflops": 0.05}}))
        r = CliRunner().invoke(app, ["data", "prepare", str(path)])
        assert r.exit_code == 0, r.output
        assert "validation and test differ" in r.output and "in test only: C" in r.output
        shift = json.loads((tmp_path / "runs" / "shift" / "data" / "summary.json").read_text())["split_shift"]
        assert shift["warning"] and shift["missing_in_validation"] == ["C"] and shift["labels"][0]["label"] == "C"
        # right on every validation item, wrong on every test item
        server.answers = {t.rsplit(",", 1)[0]: t.rsplit(",", 1)[1] for t in train} | {t.rsplit(",", 1)[0]: "B" for t in test}
        r = CliRunner().invoke(app, ["run", str(path), "--no-gate", "--set", "evaluation.variants=[{name: hosted, kind: endpoint, endpoint: "
                                     f"{{base_url: '{server.url}', model: hosted-mini, api_key_env: null}}}}, {{name: base, kind: base}}]"])
        assert r.exit_code == 0, r.output
        d = json.loads((tmp_path / "runs" / "shift" / "run" / "decision.json").read_text())
        hosted = next(e for e in d["evidence"] if e["variant"] == "hosted")
        assert hosted["meets_goal"] and hosted["validation"] == 1.0 and hosted["test_below_goal"]
        assert not d["met"] and d["validation_only"] == ["hosted"]
        assert "hosted met the goal on validation (1.000) but not on test" in d["why"] and "label distributions differ" in d["why"]
        assert "goal not met" in r.output and "meets accuracy" not in d["why"]


def test_the_gate_takes_the_hosted_model_it_replaces_as_the_task_reference(tiny_project, tmp_path):
    """gate.reference: the candidate must be non-inferior to the endpoint it replaces (the margin: a negative
    min_improvement); a candidate far below it is blocked with the endpoint named, a generous margin lets it through."""
    from tunewise.gate import run_gate
    from tunewise.train.loop import train

    with FakeEndpoint() as server:
        path = _project(tiny_project, server.url)
        raw = yaml.safe_load(path.read_text())
        raw["training"].update(max_steps=2)
        raw["gate"] = {"reference": "hosted", "min_improvement": -0.05, "advbench_samples": 4, "xstest_samples": 4, "mmlu_samples": 4,
                       "max_new_tokens": 4}
        path.write_text(yaml.safe_dump(raw))
        cfg = load_config(path)
        server.answers = _answers(cfg, right=12)
        train(cfg, cfg.train_dir)
        g = run_gate(cfg)
        task = g.checks[0]
        assert task.check.startswith("task: accuracy (vs hosted (hosted-mini at http://127.0.0.1")
        assert task.reference == 1.0 and not task.passed and g.blocked
        assert "(task); base" in g.reference and server.requests == 12
        raw["gate"]["min_improvement"] = -1.0  # any candidate is within a margin of 1
        path.write_text(yaml.safe_dump(raw))
        g = run_gate(load_config(path))
        assert g.checks[0].passed and server.requests == 12  # the endpoint's answers came from its saved result


def test_a_gate_reference_must_be_a_variant(tiny_project):
    from tunewise.config import ConfigError

    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    raw["gate"] = {"reference": "gpt-4.1-mini"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"gate\.reference: 'gpt-4\.1-mini' is not one of evaluation\.variants"):
        load_config(path)
