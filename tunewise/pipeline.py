"""Workflows that chain stages. `demo`: prepare -> short fine-tune -> score base vs fine-tuned on test items."""

from __future__ import annotations

import time
from pathlib import Path

from .config import ProjectConfig
from .data.prepare import ensure_prepared
from .engine import Engine
from .eval.metrics import score
from .models import load_tokenizer
from .train.loop import train
from .util import atomic_write_json

# A CPU-sized budget: ~40 optimizer steps of 16 examples is a few minutes for the 135M model here.
DEMO_DEFAULTS = {"max_steps": 40, "eval_every": 20, "save_every": 20, "eval_samples": 64}


def demo(cfg: ProjectConfig, samples: int = 100, console=None) -> dict:
    t0 = time.time()
    for key, value in DEMO_DEFAULTS.items():
        if key == "max_steps" and cfg.training.max_steps:
            continue
        setattr(cfg.training, key, value)
    out_dir = cfg.run_dir / "demo"
    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    train_dir = out_dir / "train"
    if train_dir.exists():
        import shutil

        shutil.rmtree(train_dir)
    result = train(cfg, train_dir)

    items = prepared.splits[cfg.evaluation.split][:samples]
    convs = [[m for m in r.messages if m["role"] != "assistant"] for r in items]
    refs = [r.label or r.answer for r in items]
    eng = Engine.load(cfg.model.name, result.model_dir)
    table = {}
    for variant, adapter in (("base", None), ("fine-tuned", "default" if eng.adapters else None)):
        if console:
            console.print(f"scoring {variant} on {len(items)} {cfg.evaluation.split} items")
        t = time.time()
        outs = eng.generate(convs, max_new_tokens=cfg.evaluation.max_new_tokens, batch_size=cfg.evaluation.batch_size, adapter=adapter)
        per_item = score(cfg.goal.metric, [o.text for o in outs], refs)
        table[variant] = {
            cfg.goal.metric: round(sum(per_item) / len(per_item), 4),
            "items": len(items),
            "seconds": round(time.time() - t, 1),
            "examples": [{"input": c[-1]["content"], "reference": ref, "output": o.text} for c, ref, o in list(zip(convs, refs, outs))[:5]],
        }
    summary = {
        "table": {k: {m: v for m, v in row.items() if m != "examples"} for k, row in table.items()},
        "variants": table,
        "training": {"steps": result.steps, "first_val_loss": result.first_val_loss, "best_val_loss": result.best_val_loss,
                     "tokens_per_s": round(result.tokens_per_s, 1), "model_dir": result.model_dir},
        "wall_s": round(time.time() - t0, 1),
        "path": str(out_dir / "summary.json"),
    }
    atomic_write_json(Path(summary["path"]), summary)
    return summary
