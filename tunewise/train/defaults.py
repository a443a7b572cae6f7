"""Automatic training defaults from data size and model size (used by `tunewise run`).

Only keys the user did not set in `training:` are filled, and each choice comes with its reason:
- learning rate: LoRA/DoRA 1e-3 below 0.5B parameters, 2e-4 above (the QLoRA paper's 2e-4 for 7B+;
  small models need larger steps, measured on the bundled 135M model: 2e-4 barely moved the validation
  loss in 40 steps); full fine-tuning 2e-5 below 1B, 1e-5 above; freeze 1e-4;
- LoRA rank 8 below 1,000 examples, 16 below 20,000, 32 above (alpha = 2 x rank);
- epochs 3 below 1,000 examples, 2 below 5,000, 1 above (OpenAI's fine-tuning API also lowers epochs as
  the data grows);
- batch 16 when an example is at most 256 tokens, else 8 with 2 accumulation steps;
- max_steps: when use_case.max_training_hours is set, the steps the cost model says fit in it.
"""

from __future__ import annotations

import math


def auto_training(cfg, examples: int, mean_tokens: float, params: int, steps_per_hour: float | None = None) -> list[str]:
    t = cfg.training
    given = t.model_fields_set
    notes = []

    def choose(key, value, why):
        if key in given:
            notes.append(f"{key}={getattr(t, key)} (from the config)")
            return
        setattr(t, key, value)
        notes.append(f"{key}={value} ({why})")

    if t.method in ("lora", "dora"):
        choose("learning_rate", 1e-3 if params < 5e8 else 2e-4, f"{t.method} on a {params / 1e6:.0f}M-parameter model")
        if "lora" not in given:
            r = 8 if examples < 1000 else 16 if examples < 20_000 else 32
            t.lora.r, t.lora.alpha = r, 2 * r
            notes.append(f"lora.r={r}, lora.alpha={2 * r} ({examples:,} examples)")
    elif t.method == "full":
        choose("learning_rate", 2e-5 if params < 1e9 else 1e-5, "full fine-tuning")
    else:
        choose("learning_rate", 1e-4, "freeze: only the last layers move")
    choose("epochs", 3.0 if examples < 1000 else 2.0 if examples < 5000 else 1.0, f"{examples:,} examples")
    if mean_tokens <= 256:
        choose("batch_size", 16, f"~{mean_tokens:.0f} tokens per example")
    else:
        choose("batch_size", 8, f"~{mean_tokens:.0f} tokens per example")
        choose("grad_accum", 2, "effective batch 16")
    hours = cfg.use_case.max_training_hours
    if hours and steps_per_hour and "max_steps" not in given:
        natural = math.ceil(examples * t.epochs / (t.batch_size * t.grad_accum))
        fit = max(1, int(hours * steps_per_hour))
        if fit < natural:
            t.max_steps = fit
            notes.append(f"max_steps={fit} (the {natural} steps of {t.epochs:g} epoch(s) would take "
                         f"{natural / steps_per_hour:.1f} h; use_case.max_training_hours={hours:g})")
    return notes
