"""Check the cost model against real training runs on this machine (bench/cost_model.py, tests/test_costs.py).

Each run trains the configured model for a few steps in a fresh subprocess (so its peak RSS is the run's
own) and compares the measured tokens/s (steps after the first, which warms up) and peak memory with
what costs.py predicts for the same method, batch and sequence length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from . import costs


def measure_training(work: Path, train_csv: Path, model: str, method: str, steps: int = 4, batch_size: int = 8,
                     max_length: int = 64, rows: int = 200) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    lines = train_csv.read_text(encoding="utf-8").splitlines()
    (work / "train.csv").write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    cfg = {"project": f"cost-{method}", "output_dir": str(work / "runs"), "model": {"name": model},
           "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"},
                    "system_prompt": "Classify the intent.", "max_length": max_length, "split": {"validation": 0.1},
                    "clean": {"near_dedup": False}},
           "training": {"method": method, "max_steps": steps, "batch_size": batch_size, "eval_every": 1000, "save_every": 1000,
                        "eval_samples": 8, "learning_rate": 1e-5 if method == "full" else 1e-3}}
    (work / "tunewise.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tunewise.cli", "train", str(work / "tunewise.yaml"), "--fresh"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"training run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    run = work / "runs" / f"cost-{method}" / "train"
    summary = json.loads((run / "train_summary.json").read_text())
    rows_ = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows_ if "tokens_per_s" in r][1:]  # the first step warms up
    seconds = sum(r["tokens_per_s"] and (r["tokens"] - p["tokens"]) / r["tokens_per_s"] for p, r in zip(rows_, rows_[1:]) if r in steady)
    real = sum(r["tokens"] - p["tokens"] for p, r in zip(rows_, rows_[1:]) if r in steady)
    padded = sum(r["padded_tokens"] for r in steady)
    seq = padded / sum(r["rows"] for r in steady)  # mean padded length: what the matmuls and attention run on
    measured_tps = real / seconds

    shape = costs.model_shape(model)
    tflops = costs.probe_matmul_tflops("cpu", shape.hidden, shape.intermediate, tokens=batch_size * max_length)
    loss_share = summary["tokens"]["loss_tokens"] / summary["tokens"]["tokens"]
    per_token = costs.train_flops_per_token(shape, method, round(seq), loss_share=loss_share)
    eff = costs.TRAIN_EFFICIENCY["cpu"]
    predicted_tps = tflops * 1e12 * eff / per_token * (real / padded)  # compute runs on padded positions
    mem = costs.train_memory_gb(shape, method, batch_size, max_length, "cpu", loss_share=loss_share)
    return {"method": method, "steps": summary["steps"], "batch_size": batch_size, "seq": seq, "probe_tflops": tflops,
            "measured_tokens_per_s": measured_tps, "predicted_tokens_per_s": predicted_tps,
            "time_ratio": measured_tps / predicted_tps,  # > 1: faster than predicted
            "measured_peak_gb": summary["peak_memory_mb"] * 2**20 / 1e9, "predicted_peak_gb": mem["total"],
            "memory_ratio": summary["peak_memory_mb"] * 2**20 / 1e9 / mem["total"], "memory_parts_gb": mem,
            "achieved_tflops": padded / seconds * per_token / 1e12,
            "padding": padded / real, "mean_padded_length": seq, "loss_share": loss_share}
