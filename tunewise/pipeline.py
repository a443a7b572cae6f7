"""Workflows that chain stages. `demo`: prepare -> short fine-tune -> compare variants -> HTML report."""

from __future__ import annotations

import shutil
import time

from .config import ProjectConfig
from .data.prepare import ensure_prepared
from .eval.run import compare
from .models import load_tokenizer
from .train.loop import train

# A CPU-sized budget: ~40 optimizer steps of 16 examples is a few minutes for the 135M model here.
DEMO_TRAINING = {"max_steps": 40, "eval_every": 20, "save_every": 20, "eval_samples": 64}


def demo(cfg: ProjectConfig, samples: int = 100, progress=None) -> dict:
    t0 = time.time()
    for key, value in DEMO_TRAINING.items():
        if key == "max_steps" and cfg.training.max_steps:
            continue  # the user's --set wins
        setattr(cfg.training, key, value)
    cfg.evaluation.max_samples = samples
    cfg.evaluation.perplexity = False  # its forward pass does not use the engine's prefix cache yet: minutes on long prompts
    ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    train_dir = cfg.run_dir / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    if progress:
        progress("training")
    result = train(cfg, train_dir)
    out = compare(cfg, progress=progress)
    out["training"] = {"steps": result.steps, "first_val_loss": result.first_val_loss, "best_val_loss": result.best_val_loss,
                       "tokens_per_s": round(result.tokens_per_s, 1), "model_dir": result.model_dir}
    out["wall_s"] = round(time.time() - t0, 1)
    return out
