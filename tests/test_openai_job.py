"""`tunewise import openai-job`: three OpenAI fine-tuning jobs (supervised with tools and a validation file, dpo with
beta, reinforcement with a multi grader) become configs that `tunewise train` runs as written; what cannot be carried
over is named."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunewise.cli import app


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "system", "content": "You route tickets."}, {"role": "user", "content": f"My card {i} never arrived"},
                         {"role": "assistant", "content": "card_arrival" if i % 2 else "lost_card"}]}


def _import(tmp_path, job, *args):
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = CliRunner().invoke(app, ["import", "openai-job", str(tmp_path / "job.json"), *args])
    assert r.exit_code == 0, r.output
    return yaml.safe_load((tmp_path / "tunewise.yaml").read_text()), r.output


def _train(tmp_path):
    r = CliRunner().invoke(app, ["train", str(tmp_path / "tunewise.yaml")])
    assert r.exit_code == 0, r.output
    return r.output


def test_supervised_job_with_tools_and_a_validation_file(tmp_path, tiny_model):
    tool_call = {"messages": [{"role": "user", "content": "Freeze card 4"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "freeze_card", "arguments": "{\"card\": 4}"}}]}],
        "tools": [{"type": "function", "function": {"name": "freeze_card", "parameters": {"type": "object", "properties": {"card": {"type": "integer"}}}}}]}
    _jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(24)] + [tool_call])
    _jsonl(tmp_path / "file-val9.jsonl", [_chat(100 + i) for i in range(6)])
    job = {"object": "fine_tuning.job", "id": "ftjob-abc123", "model": "gpt-4.1-mini-2025-04-14", "status": "succeeded",
           "fine_tuned_model": "ft:gpt-4.1-mini-2025-04-14:acme:support:abc123", "training_file": "file-train1",
           "validation_file": "file-val9", "suffix": "support", "seed": 7, "metadata": {"team": "ops"}, "integrations": [],
           "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}}}
    cfg, out = _import(tmp_path, job, "--file", f"file-train1={tmp_path / 'train.jsonl'}", "--model", str(tiny_model))
    assert cfg["project"] == "support" and cfg["data"]["format"] == "openai" and cfg["data"]["validation"].endswith("file-val9.jsonl")
    t = cfg["training"]
    assert t == {"objective": "sft", "epochs": 2, "batch_size": 4, "learning_rate": pytest.approx(1e-4), "seed": 7}
    assert cfg["serve"]["aliases"] == {"ft:gpt-4.1-mini-2025-04-14:acme:support:abc123": "support:production"}
    assert "1 records carry tools or tool calls: read, each call checked" in out and "OpenAI's weights are not available" in out and "multiplier x 2e-4" in out
    assert (tmp_path / "tunewise.yaml").read_text().startswith("# Imported from the OpenAI fine-tuning job ftjob-abc123")
    _train(tmp_path)
    assert (tmp_path / "runs" / "support" / "train" / "model" / "tunewise.json").exists()


def test_dpo_job_with_beta(tmp_path, tiny_model):
    pairs = [{"input": {"messages": [{"role": "user", "content": f"Say hi to {i}"}]},
              "preferred_output": [{"role": "assistant", "content": f"Hello {i}!"}],
              "non_preferred_output": [{"role": "assistant", "content": "no"}]} for i in range(16)]
    _jsonl(tmp_path / "file-pref.jsonl", pairs)
    job = {"model": "gpt-4o-mini-2024-07-18", "training_file": "file-pref", "suffix": "polite",
           "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"}}}}
    cfg, out = _import(tmp_path, job, "--model", str(tiny_model))
    assert cfg["data"]["format"] == "openai-preference" and cfg["training"]["objective"] == "dpo"
    assert cfg["training"]["preference"] == {"beta": 0.2} and "learning_rate" not in cfg["training"]
    assert "learning_rate_multiplier: auto -> training.learning_rate left unset" in out
    _train(tmp_path)
    summary = json.loads((tmp_path / "runs" / "polite" / "train" / "train_summary.json").read_text())
    assert summary["steps"] >= 1


def test_reinforcement_job_with_a_multi_grader(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1? Answer with the number."}], "reference_answer": str(i + 1)}
            for i in range(12)]
    _jsonl(tmp_path / "file-rft.jsonl", rows)
    grader = {"type": "multi", "name": "answer", "calculate_output": "0.7 * exact + 0.3 * close",
              "graders": {"exact": {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}", "operation": "eq"},
                          "close": {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}",
                                    "evaluation_metric": "fuzzy_match"}}}
    job = {"model": "o4-mini-2025-04-16", "training_file": "file-rft", "suffix": "math",
           "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "response_format": {"type": "json_schema"},
                                                                 "hyperparameters": {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 1.0,
                                                                                     "reasoning_effort": "low", "eval_interval": 2}}}}
    cfg, out = _import(tmp_path, job, "--model", str(tiny_model))
    assert cfg["data"]["format"] == "openai-rft" and cfg["training"]["objective"] == "grpo" and cfg["training"]["eval_every"] == 2
    assert cfg["training"]["grpo"]["rewards"] == [{"name": "grader", "args": {"file": "grader.json"}}]
    assert cfg["evaluation"]["graders"] == ["grader.json"] and cfg["goal"]["metric"] == "answer"
    assert json.loads((tmp_path / "grader.json").read_text()) == grader
    for name in ("compute_multiplier", "reasoning_effort", "response_format"):
        assert f"{name}" in out
    _train(tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "math" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert "reward_answer" in metrics[1]


def test_a_job_whose_files_are_not_here_names_the_field(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"training_file": "file-nowhere", "model": "gpt-4o-mini"}))
    r = CliRunner().invoke(app, ["import", "openai-job", str(tmp_path / "job.json")])
    assert r.exit_code == 2 and "training_file: 'file-nowhere' is an OpenAI file id with no local copy" in r.output
    (tmp_path / "job.json").write_text(json.dumps({"training_file": "file-nowhere", "method": {"type": "distillation"}}))
    r = CliRunner().invoke(app, ["import", "openai-job", str(tmp_path / "job.json")])
    assert r.exit_code == 2 and "method.type: 'distillation'" in r.output
