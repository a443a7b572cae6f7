"""Automatic training defaults from the task, the data and the model (`tunewise run` and `tunewise train`).

Only keys the user did not set in `training:` are filled (a key `tunewise init` wrote commented out is not
set), and each choice comes with its reason. The choices come from the learning curves measured with
`bench/learning_curve.py` on BANKING77 and the bundled SmolLM2-135M (docs/results.md, "The learning curve"):

- a closed label set with short answers (classification): **freeze** (train the last 20% of the decoder
  layers, 6 of 30, and the final norm) at 1e-3. Within 10 minutes of training on the 2-core reference
  CPU it reaches 0.877 on the whole BANKING77 test split (5e-4: 0.834; the old LoRA default: 0.530 after
  18 minutes): the frozen layers run forward only (no backward through 24 layers), their hidden states
  are cached from the second epoch on, and a shared prefix runs once per batch. Models of 1B and more
  keep LoRA (not measured here: their frozen forward is the cost and LoRA's memory wins).
- otherwise LoRA/DoRA at 1e-3 below 0.5B parameters, 2e-4 above (the QLoRA paper's 2e-4 for 7B+; small
  models need larger steps); rank 8 below 1,000 examples, 16 below 20,000, 32 above (alpha = 2 x rank);
  full fine-tuning 2e-5 below 1B, 1e-5 above;
- epochs 3 below 1,000 examples, 2 below 5,000, 1 above (OpenAI's fine-tuning API also lowers epochs as
  the data grows);
- batch 16 when an example is at most 256 tokens, else 8 with 2 accumulation steps;
- packing on only when examples are long (> 256 tokens on average): on short, length-grouped batches
  padding is already small and the block-diagonal mask costs more than it saves (measured 6% slower on
  BANKING77);
- max_minutes from use_case.max_training_hours: the loop plans the steps to fit, re-plans from the
  measured step time, and stops at the budget with the learning rate decayed.
"""

from __future__ import annotations

from .objectives import objective_of

CLASSIFICATION_MAX_ANSWER_TOKENS = 16  # answers this short (a label) make a closed-set task


def auto_training(cfg, examples: int, mean_tokens: float, params: int, answer_tokens: float | None = None,
                  n_layers: int | None = None, labelled: bool = False):
    """The config with the training keys the user did not set filled in (a copy: cfg is not changed), and one
    note per key (its value and why)."""
    t = cfg.training
    given = t.model_fields_set
    chosen: dict = {}
    notes = []

    def now(key):
        return chosen.get(key, getattr(t, key))

    def choose(key, value, why):
        if key in given:
            notes.append(f"{key}={getattr(t, key)} (from the config)")
            return
        chosen[key] = value
        notes.append(f"{key}={value} ({why})")

    closed = (labelled or cfg.use_case.task == "classification") and answer_tokens is not None \
        and answer_tokens <= CLASSIFICATION_MAX_ANSWER_TOKENS
    objective = objective_of(cfg)
    if closed and params < 1e9 and n_layers and objective.closed_set_freeze:
        choose("method", "freeze", f"short closed-set answers (~{answer_tokens:.0f} tokens) on a {params / 1e6:.0f}M model: "
                                   "the last layers learn the labels; no backward through the rest")
    method = now("method")
    if method == "freeze" and n_layers:
        choose("trainable_layers", max(1, round(0.2 * n_layers)), f"the last 20% of {n_layers} layers")
    start = _init_from_rank(cfg) if method in ("lora", "dora", "qlora") and "lora" not in given else None
    if start:  # the adapter training starts from fixes the rank: another one would not load
        chosen["lora"] = t.lora.model_copy(update={"r": start[0], "alpha": start[1]})
        notes.append(f"lora.r={start[0]}, lora.alpha={start[1]} (training.init_from's adapter)")
        given = given | {"lora"}
    low = objective.default_learning_rate(method, params)
    if low:  # preference and RL objectives
        choose("learning_rate", *low)
    elif method in ("lora", "dora", "qlora"):
        choose("learning_rate", 1e-3 if params < 5e8 else 2e-4, f"{method} on a {params / 1e6:.0f}M-parameter model")
        if "lora" not in given:
            r = 8 if examples < 1000 else 16 if examples < 20_000 else 32
            chosen["lora"] = t.lora.model_copy(update={"r": r, "alpha": 2 * r})
            notes.append(f"lora.r={r}, lora.alpha={2 * r} ({examples:,} examples)")
    elif method == "full":
        choose("learning_rate", 2e-5 if params < 1e9 else 1e-5, "full fine-tuning")
    else:
        choose("learning_rate", 1e-3, "freeze on a short budget: 1e-3 beat 5e-4 (0.877 vs 0.834 on BANKING77 in 10 min)")
    choose("epochs", 3.0 if examples < 1000 else 2.0 if examples < 5000 else 1.0, f"{examples:,} examples")
    batch = objective.default_batch(mean_tokens)
    if batch:  # grpo: prompts; pretrain: blocks
        for key, value, why in batch:
            choose(key, value, why)
    elif mean_tokens <= 256:
        choose("batch_size", 16, f"~{mean_tokens:.0f} tokens per example")
        choose("packing", False, "short examples in length-grouped batches: little padding to remove")
    else:
        choose("batch_size", 8, f"~{mean_tokens:.0f} tokens per example")
        choose("grad_accum", 2, "effective batch 16")
        choose("packing", True, f"~{mean_tokens:.0f} tokens per example: rows packed end to end, no padding")
    hours = cfg.use_case.max_training_hours
    if hours and "max_minutes" not in given:
        choose("max_minutes", round(hours * 60, 2), f"use_case.max_training_hours={hours:g}; planned from the measured step time")
    return cfg.model_copy(update={"training": t.model_copy(update=chosen)}), notes


def _init_from_rank(cfg) -> tuple[int, int] | None:
    """(r, alpha) of the adapter training.init_from names, when it is one."""
    import json

    if not cfg.training.init_from:
        return None
    path = cfg.path(cfg.training.init_from) / "adapter_config.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return int(saved["r"]), int(saved.get("lora_alpha", 2 * saved["r"]))


def is_labelled(records) -> bool:
    """Whether the records carry class labels (checked on the first 2,000)."""
    sample = records[:2000]
    return bool(sample) and all(r.label for r in sample)


def data_facts(records, examples) -> dict:
    """What the defaults are chosen from: examples, mean tokens per example, mean answer tokens, labels
    (from the records and their tokenized examples, as training has them)."""
    n = max(1, len(examples))
    return {"examples": len(records),
            "mean_tokens": sum(len(e.input_ids) for e in examples) / n,
            "answer_tokens": sum(sum(1 for x in e.labels if x != -100) for e in examples) / n,
            "labelled": is_labelled(records)}
