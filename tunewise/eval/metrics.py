"""Metrics registry: name -> function(predictions, references) -> per-item scores.

Per-item scores (not just a mean) so confidence intervals and paired tests can be computed on them.
"""

from __future__ import annotations

import re
import string
from typing import Callable

METRICS: dict[str, Callable[[list[str], list[str]], list[float]]] = {}


def metric(name: str):
    def register(fn):
        METRICS[name] = fn
        return fn

    return register


def normalize_label(text: str) -> str:
    """Lowercase, first line only, strip surrounding punctuation/quotes and whitespace; spaces -> underscores."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.strip().strip(string.punctuation + " \"'`").lower()
    return re.sub(r"[\s-]+", "_", first)


@metric("exact_match")
def exact_match(preds: list[str], refs: list[str]) -> list[float]:
    return [float(p.strip() == r.strip()) for p, r in zip(preds, refs)]


@metric("accuracy")
def accuracy(preds: list[str], refs: list[str]) -> list[float]:
    """Exact match after label normalisation (the classification metric)."""
    return [float(normalize_label(p) == normalize_label(r)) for p, r in zip(preds, refs)]


def score(name: str, preds: list[str], refs: list[str]) -> list[float]:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")
    return METRICS[name](preds, refs)
