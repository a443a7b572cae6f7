"""Data parallelism on CPU (torchrun, gloo): `tunewise train --processes 2` with batch B split in two gives the
same loss curve and the same trained weights as one process with batch B (LoRA and full, with gradient
accumulation); after kill -9 of the whole launch, --resume with 2 processes ends where an uninterrupted run does.

The runs compare in float64 (model.dtype: float64, norms included: models.norms_in_float64), with a bound from what
summation order can produce. Two processes sum a gradient in another order than one: a difference dg of about 1e-16 of
the summands' magnitude in float64 (the loss is a sum over ~400 tokens: summands up to ~1e3, so dg ~ 1e-13), 1e-7 in
float32. Adam magnifies dg by up to lr/eps (its first steps move a weight by lr*g/(|g|+eps), whose slope is at most
lr/eps = 1e-2/1e-8 = 1e6 here, reached on near-zero gradients such as LoRA's A and full fine-tuning's): at most ~1e-7 a
step in float64; measured 1e-15 (LoRA) and 4e-14 (full) after 3 steps. In float32 the same bound reaches Adam's step
itself (~1e-2), so a float32 test passed or failed by machine (1.83e-5 against a 1e-5 bound on one). WEIGHT_TOL (1e-6)
is that worst case with margin, so it holds on any machine, and a real difference (a micro-batch lost or seen twice)
moves weights by ~1e-2, four orders above it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import banking_rows

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
WEIGHT_TOL = 1e-6  # float64 summation order (~1e-13) x Adam's lr/eps (1e6), over 3 steps: see the module docstring
LOSS_REL = 1e-6  # losses are logged to 6 decimals (1e-7 of a loss near 10), and each step's loss carries the weights' difference above


def _config(tmp_path, tiny_model, name, **training):
    (tmp_path / "train.csv").write_text(banking_rows(160))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "project": name, "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model), "dtype": "float64"},
        "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"},
                 "split": {"validation": 0.1, "test": 0.1, "seed": 1}, "max_length": 64, "clean": {"near_dedup": False}},
        "training": {"batch_size": 4, "grad_accum": 2, "max_steps": 3, "eval_every": 1000, "save_every": 1000, "learning_rate": 1e-2,
                     "eval_samples": 8, "seed": 7, **training}}))
    return path


def _train(path, processes=1, *extra):
    cmd = [sys.executable, "-m", "tunewise", "train", str(path), *extra] + (["--processes", str(processes)] if processes > 1 else [])
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _result(tmp_path, name):
    run = tmp_path / "runs" / name / "train"
    model = run / "model"
    weights = load_file(str(model / ("adapter_model.safetensors" if (model / "adapter_model.safetensors").exists() else "model.safetensors")))
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return weights, losses


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_exactly_like_one(tiny_model, tmp_path, method):
    one, two = _config(tmp_path, tiny_model, "one", method=method), _config(tmp_path, tiny_model, "two", method=method)
    _train(one)
    _train(two, 2)
    (w1, l1), (w2, l2) = _result(tmp_path, "one"), _result(tmp_path, "two")
    assert set(w1) == set(w2) and len(l1) == len(l2) == 3
    assert all(w.dtype == torch.float64 for w in w1.values())
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOL
    assert l1 == pytest.approx(l2, rel=LOSS_REL)


def test_resume_with_two_processes_after_kill_9(tiny_model, tmp_path):
    ref = _config(tmp_path, tiny_model, "ref", method="lora", max_steps=40, save_every=4)
    _train(ref, 2)
    cut = _config(tmp_path, tiny_model, "cut", method="lora", max_steps=40, save_every=4)
    proc = subprocess.Popen([sys.executable, "-m", "tunewise", "train", str(cut), "--processes", "2"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / "runs" / "cut" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and both workers
    proc.wait()
    metrics = (tmp_path / "runs" / "cut" / "train" / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(metrics) < 40, "the kill came too late to test a resume"
    _train(cut, 2, "--resume")
    (w1, l1), (w2, l2) = _result(tmp_path, "ref"), _result(tmp_path, "cut")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOL and l1 == pytest.approx(l2, rel=LOSS_REL) and len(l2) == 40


def test_eval_with_two_processes_gives_the_items_of_one(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    path = _config(tmp_path, tiny_model, "ev")
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"max_new_tokens": 6, "max_samples": 24, "variants": [{"name": "base", "kind": "base"}]}
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    items = {}
    for n in (1, 2):
        out = runner.invoke(app, ["eval", str(path), "-v", "base", "--processes", str(n)])
        assert out.exit_code == 0, out.output
        rows = [json.loads(x) for x in (tmp_path / "runs" / "ev" / "eval" / "base" / "items.jsonl").read_text().splitlines()]
        items[n] = [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]
        assert json.loads((tmp_path / "runs" / "ev" / "eval" / "base" / "summary.json").read_text())["processes"] == n
    assert len(items[1]) == 16 and items[1] == items[2]  # the whole test split (16 of the 160 rows)


@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_fsdp_two_processes_train_like_one(tiny_model, tmp_path, method):
    """training.fsdp: parameters, gradients and optimizer state sharded over 2 processes, the same result as 1 process
    unsharded (the saved model is the gathered full model)."""
    one = _config(tmp_path, tiny_model, "one", method=method, trainable_layers=1)
    two = _config(tmp_path, tiny_model, "two", method=method, trainable_layers=1, fsdp=True)
    _train(one)
    _train(two, 2)
    (w1, l1), (w2, l2) = _result(tmp_path, "one"), _result(tmp_path, "two")
    assert set(w1) == set(w2) and len(l1) == len(l2) == 3
    # reduce-scatter sums in another order than one process: the same float64 bound as DDP's all-reduce
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOL
    assert l1 == pytest.approx(l2, rel=LOSS_REL)
    summary = json.loads((tmp_path / "runs" / "two" / "train" / "train_summary.json").read_text())
    assert any(n.startswith("fsdp: parameters, gradients and optimizer state sharded over 2") for n in summary["notes"])


def test_an_fsdp_checkpoint_resumes_in_one_process(tiny_model, tmp_path):
    """A sharded run's checkpoint holds full tensors by name: cut a 2-process FSDP run back to its step-3 checkpoint and
    resume it in one unsharded process; it ends where an uninterrupted one-process run does."""
    import shutil

    ref = _config(tmp_path, tiny_model, "ref", method="lora", max_steps=6, save_every=3, keep_checkpoints=3)
    cut = _config(tmp_path, tiny_model, "cut", method="lora", max_steps=6, save_every=3, keep_checkpoints=3, fsdp=True)
    _train(ref)
    _train(cut, 2)
    ckpts = tmp_path / "runs" / "cut" / "train" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003", "step-0000006"]
    shutil.rmtree(ckpts / "step-0000006")
    _train(cut, 1, "--resume")
    (w1, l1), (w2, l2) = _result(tmp_path, "ref"), _result(tmp_path, "cut")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOL and l1 == pytest.approx(l2, rel=LOSS_REL) and len(l2) == 6


def test_a_global_batch_smaller_than_the_processes_trains_like_one_process(tiny_model, tmp_path):
    """batch_size 1 on 2 processes: the second runs a masked copy each step (no loss, no gradient) so the collectives
    meet; the result is one process's."""
    one = _config(tmp_path, tiny_model, "one", method="lora", batch_size=1)
    two = _config(tmp_path, tiny_model, "two", method="lora", batch_size=1)
    _train(one)
    _train(two, 2)
    (w1, l1), (w2, l2) = _result(tmp_path, "one"), _result(tmp_path, "two")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOL and l1 == pytest.approx(l2, rel=LOSS_REL)
    summary = json.loads((tmp_path / "runs" / "two" / "train" / "train_summary.json").read_text())
    assert any("batch_size=1 < 2 processes" in n for n in summary["notes"])


def test_fsdp_with_an_objective_it_cannot_shard_is_a_config_error(tiny_model, tmp_path):
    from tunewise.config import ConfigError, load_config

    path = _config(tmp_path, tiny_model, "x", method="lora", fsdp=True, objective="dpo")
    with pytest.raises(ConfigError, match="training.fsdp: shards sft and pretrain"):
        load_config(path)
