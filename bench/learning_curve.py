"""Learning curve: BANKING77 test accuracy (95% CI) against the training budget, per method.

Each point is one training run of the example project (examples/support-intents) from scratch with the
given method and budget, then the fine-tuned model scored on the test split (the whole split unless
--test-samples), answers constrained to the label set as `tunewise eval` does by default. The table
gives tokens processed, training wall time and this machine's measured float32 matmul rate, so figures
from different machines compare. Rows are appended to bench/out/learning_curve.jsonl as they finish
(an interrupted sweep keeps what it measured; --skip-done goes on from there).

    python bench/learning_curve.py --methods freeze --epochs 0.25,0.5,1          # a sweep
    python bench/learning_curve.py --methods freeze --minutes 10                   # what 10 minutes buy
    python bench/learning_curve.py --methods lora,freeze --minutes 10 --set training.learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "support-intents" / "tunewise.yaml"
OUT = ROOT / "bench" / "out" / "learning_curve.jsonl"


def point(method: str, epochs: float | None, minutes: float | None, sets: list[str], test_samples: int | None, work: Path) -> dict:
    from tunewise.config import load_config
    from tunewise.eval.evaluate import evaluate
    from tunewise.train.loop import train

    overrides = [f"output_dir={work}", f"training.method={method}", *sets]
    if epochs is not None:
        overrides.append(f"training.epochs={epochs}")
    if minutes is not None:
        overrides.append(f"training.max_minutes={minutes}")
    if test_samples:
        overrides.append(f"evaluation.max_samples={test_samples}")
    overrides.append("evaluation.perplexity=false")
    cfg = load_config(CONFIG, overrides)
    import shutil

    shutil.rmtree(cfg.run_dir / "train", ignore_errors=True)
    from tunewise.data.prepare import ensure_prepared

    ensure_prepared(cfg)  # before the clock: a budget is for training, not for preparing (e.g. another data.clean.select)
    r = train(cfg, cfg.run_dir / "train", progress=True, defaults=True)
    variant = next(v for v in cfg.evaluation.variants if v.kind == "fine-tuned")
    s = evaluate(cfg, variant, out_root=cfg.run_dir / "eval")
    acc = s["metrics"]["accuracy"]
    return {"method": method, "epochs": epochs, "minutes": minutes, "set": sets, "steps": r.steps,
            "epochs_done": _epochs_done(cfg.run_dir / "train" / "metrics.jsonl"),
            "train_wall_s": round(r.wall_s, 1), "tokens_per_s": round(r.tokens_per_s, 1), "best_val_loss": r.best_val_loss,
            "accuracy": acc["mean"], "ci95": acc["ci95"], "test_items": s["items"], "eval_items_per_s": round(s["items_per_s"], 2),
            "defaults": r.defaults, "notes": r.notes}


def _epochs_done(metrics: Path) -> float | None:
    """Epochs as the loop counted them (the batch size train/defaults.py chose, not the config's field)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"epoch"' in x]
    return rows[-1]["epoch"] if rows else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="freeze,lora")
    ap.add_argument("--epochs", default=None, help="Comma-separated budgets in epochs (e.g. 0.25,0.5,1,2,3).")
    ap.add_argument("--minutes", default=None, help="Comma-separated budgets in minutes of training (training.max_minutes).")
    ap.add_argument("--set", action="append", default=[], help="Extra config override for every run (repeatable).")
    ap.add_argument("--test-samples", type=int, default=None, help="Score a seeded sample of the test split (default: all 3,080).")
    ap.add_argument("--work", default="/tmp/tunewise-learning-curve")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunewise.advise.costs import probe_matmul_tflops

    tflops = probe_matmul_tflops()
    budgets: list[tuple[float | None, float | None]] = []
    budgets += [(float(e), None) for e in (args.epochs.split(",") if args.epochs else [])]
    budgets += [(None, float(m)) for m in (args.minutes.split(",") if args.minutes else [])]
    if not budgets:
        budgets = [(None, 10.0)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        for epochs, minutes in budgets:
            t0 = time.time()
            row = point(method, epochs, minutes, args.set, args.test_samples, Path(args.work))
            row.update({"matmul_tflops": round(tflops, 3), "wall_s": round(time.time() - t0, 1), "at": time.strftime("%Y-%m-%d %H:%M")})
            rows.append(row)
            with open(OUT, "a") as f:
                f.write(json.dumps(row) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"BANKING77 learning curve (test accuracy, 95% CI), {tflops:.3f} TFLOP/s float32 matmul")
    for col in ("method", "budget", "steps", "train s", "tok/s", "best val loss", "accuracy [95% CI]", "items"):
        table.add_column(col, justify="right")
    for r in rows:
        budget = f"{r['epochs']:g} ep" if r["epochs"] is not None else f"{r['minutes']:g} min"
        table.add_row(r["method"], budget, str(r["steps"]), f"{r['train_wall_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-",
                      f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", str(r["test_items"]))
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
