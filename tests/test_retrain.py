"""`tunewise retrain`: re-trains when the data changed and only then (a second call says there is nothing new),
gates and journals each decision in the registry, continues from the production adapter, and resumes after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.config import load_config
from tunewise.registry import Registry, registry_path

from .conftest import banking_rows


def _project(tmp_path, tiny_model, **training):
    (tmp_path / "train.csv").write_text(banking_rows(160))
    cfg = {"project": "rt", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
           "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"},
                    "split": {"validation": 0.1, "test": 0.15, "seed": 1}, "max_length": 64, "clean": {"near_dedup": False}},
           "training": {"method": "lora", "batch_size": 8, "max_steps": 3, "eval_every": 1000, "save_every": 1000, "eval_samples": 8,
                        "learning_rate": 1e-3, **training},
           "evaluation": {"max_new_tokens": 8, "perplexity": False, "max_samples": 16},
           "gate": {"advbench_samples": 8, "xstest_samples": 8, "mmlu_samples": 8, "max_new_tokens": 8, "alpha": 0.5,
                    "max_refusal_drop": 1.0, "max_over_refusal_rise": 1.0, "max_forgetting": 1.0}}
    path = tmp_path / "rt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_retrain_acts_only_on_new_data_and_journals_every_decision(tiny_model, tmp_path):
    path = _project(tmp_path, tiny_model)
    runner = CliRunner()
    first = runner.invoke(app, ["retrain", str(path)])
    assert first.exit_code == 0, first.output
    assert "the data changed since nothing" in first.output and "fresh from the base model" in first.output
    second = runner.invoke(app, ["retrain", str(path)])
    assert second.exit_code == 0 and "nothing new: the data is that of the last re-training" in second.output, second.output
    reg = Registry(registry_path(load_config(path)))  # the tiny model cannot beat the base: its candidate was blocked
    assert reg.retrains("rt")[0]["decision"] == "blocked" and reg.production("rt") is None
    reg.promote(reg.get("rt:1").id, {"passed": False}, forced=True)  # promote it anyway, to continue from it
    reg.close()
    with open(tmp_path / "train.csv", "a") as f:  # new labelled tickets arrive
        f.write(banking_rows(20, start=400).split("\n", 1)[1])
    third = runner.invoke(app, ["retrain", str(path)])
    assert third.exit_code == 0 and "the data changed since the last re-training (#1)" in third.output, third.output
    cfg = load_config(path)
    reg = Registry(registry_path(cfg))
    journal = reg.retrains("rt")
    assert [(j["state"], j["decision"]) for j in journal] == [("done", "blocked"), ("skipped", "nothing to do"), ("done", "blocked")]
    assert journal[0]["data_key"] == journal[1]["data_key"] != journal[2]["data_key"]
    assert journal[2]["details"]["start"] == "from the production adapter rt:1" and journal[2]["details"]["candidate"] == "rt:2"
    assert reg.production("rt").version == 1  # a blocked candidate does not replace production
    reg.close()


def test_retrain_resumes_after_kill_9(tiny_model, tmp_path):
    path = _project(tmp_path, tiny_model, max_steps=60, save_every=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunewise", "retrain", str(path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / "runs" / "rt" / "retrain" / "0001" / "train" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpts.exists(), "no checkpoint before the kill"
    out = CliRunner().invoke(app, ["retrain", str(path)])
    assert out.exit_code == 0, out.output
    assert "re-training #1: resuming (started)" in out.output and "resuming from the last checkpoint" in out.output
    reg = Registry(registry_path(load_config(path)))
    journal = reg.retrains("rt")
    reg.close()
    assert len(journal) == 1 and journal[0]["state"] == "done" and journal[0]["details"]["steps"] == 60
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "rt" / "retrain" / "0001" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 61))  # every step once: resumed, not restarted
