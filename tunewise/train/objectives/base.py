"""What an objective is to the training loop: the one interface every objective implements.

The loop (train/loop.py) holds the optimiser loop, checkpoints, the budget and logging; it asks the objective for
everything that differs between objectives:

  examples()       the tokenized training and validation examples (sft: conversations; pretrain: text blocks)
  setup()          the loss module, the micro-batch maker and what it trains on (pairs, prompts or examples)
  n_loss(b)        what a micro-batch's summed loss is divided by (loss tokens, or pairs)
  stats(b)         (real tokens, computed tokens, rows) of a micro-batch, for throughput
  validate()       the validation loss and the objective's own validation numbers
  step_fields()    the objective's own numbers of a training step (preference margin, rewards, KL)
  eval_metrics()   what evaluation measures for it beyond the task metrics (grpo: its rewards)

A new objective is one file here with one Objective subclass, and one entry in the registry (__init__.py);
config.py's `training.objective` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ...data.tokenize import IGNORE, tokenize_records
from ...errors import TunewiseError


class TrainError(TunewiseError, RuntimeError):
    pass


@dataclass
class Context:
    """What an objective's setup may use: the model with its method applied, and the prepared data."""

    cfg: Any  # ProjectConfig, with the training settings as they will run (defaults applied)
    t: Any  # cfg.training, possibly adjusted by the loop (share_prefix off under fsdp)
    model: Any
    loaded: Any  # models.Loaded: tokenizer, path, device, dtype
    device: torch.device  # where batches go (the accelerator's device)
    prepared: Any  # data.prepared.Prepared
    train_records: list
    val_records: list
    train_ex: list  # examples() output
    val_ex: list
    notes: list[str]
    say: Callable[[str], None] | None = None


@dataclass
class Setup:
    """What an objective trains on and how: the loop's view of it."""

    loss_module: torch.nn.Module
    batches: Any  # .make(examples, keys) -> micro-batch; .sorted_batches(examples, tag, batch_size) -> list
    train: list
    validation: list
    start: int = 0  # the prefix every example shares (sft with share_prefix), which the frozen cache is keyed on
    cache: Any = None  # forward.FrozenCache when freeze runs its frozen layers once per example


def token_count(b) -> int:
    """Loss tokens of a micro-batch: a (Layout, keys) pair or padded rows with labels."""
    if isinstance(b, tuple):
        return b[0].n_loss
    return int((b["labels"][:, 1:] != IGNORE).sum())


def padded_stats(b: dict) -> tuple[int, int, int]:
    return int(b["attention_mask"].sum()), b["input_ids"].numel(), len(b["input_ids"])


def call_loss(loss_fn, b):
    return loss_fn(*b) if isinstance(b, tuple) else loss_fn(**b)


class Objective:
    """Defaults fit a supervised token loss; subclasses override what differs."""

    name: ClassVar[str]
    # sft and pretrain can hand a process with no example a masked copy (no loss, no gradient); the others cannot
    idle_rows: ClassVar[bool] = False
    measures_base: ClassVar[bool] = False  # the model before training is validated as step 0 (pretrain, grpo)
    closed_set_freeze: ClassVar[bool] = False  # short closed-set answers make `freeze` the default method

    def __init__(self, cfg):
        self.cfg, self.t = cfg, cfg.training

    def examples(self, tok, prepared, val_records) -> tuple[list, Any, list]:
        """(training examples, their token statistics, validation examples): tokenized conversations."""
        train_ex, stats = tokenize_records(tok, prepared.splits["train"], self.cfg.data.max_length)
        val_ex, _ = tokenize_records(tok, val_records, self.cfg.data.max_length)
        return train_ex, stats, val_ex

    def example_count(self, records: list, examples: list) -> int:
        """How many examples the training defaults count (epochs, LoRA rank): the records."""
        return len(records)

    def setup(self, ctx: Context) -> Setup:
        raise NotImplementedError

    def n_loss(self, b) -> int:
        return token_count(b)

    def stats(self, b) -> tuple[int, int, int]:
        return padded_stats(b)

    def validate(self, setup: Setup, val_batches: list) -> tuple[float, dict]:
        """(validation loss, the objective's own numbers for the metrics row)."""
        return validation_loss(setup.loss_module, val_batches, self.n_loss), {}

    def base_validation(self, setup: Setup, val_batches: list) -> tuple[float, dict]:
        """The model before training (measures_base): (validation loss, its row fields)."""
        return self.validate(setup, val_batches)

    def step_fields(self, setup: Setup) -> dict:
        return {}

    def describe_gain(self, base: float, best: float) -> tuple[str, str] | None:
        """How `tunewise train` shows the validation before and after (measures_base objectives)."""
        return None

    def eval_metrics(self, preds: list[str], items: list) -> dict[str, list]:
        """Per-item scores evaluation records for this objective beyond the task's metrics."""
        return {}

    # the training defaults (train/defaults.py) that depend on the objective
    def default_learning_rate(self, method: str, params: float) -> tuple[float, str] | None:
        """None: the method's supervised default."""
        return None

    def default_batch(self, mean_tokens: float) -> list[tuple[str, Any, str]] | None:
        """(key, value, why) choices for batch_size and packing; None: the supervised default by example length."""
        return None


@torch.no_grad()
def validation_loss(loss_fn, batches, n_loss=token_count) -> float:
    """Mean loss per loss unit (token, pair) over micro-batches."""
    loss_fn.model.eval()
    total, count = 0.0, 0
    for b in batches:
        total += call_loss(loss_fn, b).item()
        count += n_loss(b)
    loss_fn.model.train()
    return total / max(count, 1)
