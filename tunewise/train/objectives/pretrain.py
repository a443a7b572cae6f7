"""Continued pre-training: documents end to end in blocks of data.max_length, every token a target.

The loss is SFT's (packing is moot: the blocks are already full); the model before training is measured as step 0,
so held-out perplexity before and after is in metrics.jsonl.
"""

from __future__ import annotations

import math

from ...data.text import text_blocks
from .sft import Sft


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Pretrain(Sft):
    name = "pretrain"
    measures_base = True
    closed_set_freeze = False

    def examples(self, tok, prepared, val_records):
        n_val = self.t.eval_samples
        train_ex, stats = text_blocks(tok, prepared.splits["train"], self.cfg.data.max_length)
        val_ex = text_blocks(tok, prepared.splits["validation"], self.cfg.data.max_length)[0]
        return train_ex, stats, (val_ex[:n_val] if n_val else val_ex)

    def example_count(self, records, examples):
        return len(examples)  # blocks, not documents

    def validate(self, setup, val_batches):
        val, _ = super().validate(setup, val_batches)
        return val, {"val_perplexity": round(perplexity(val), 4)}

    def describe_gain(self, base, best):
        return "val perplexity before -> best", f"{perplexity(base):.2f} -> {perplexity(best):.2f}"

    def default_batch(self, mean_tokens):
        return [("batch_size", 8 if mean_tokens <= 512 else 4, f"blocks of ~{mean_tokens:.0f} tokens"),
                ("packing", False, "pretrain blocks are already packed (documents end to end, no padding)")]
