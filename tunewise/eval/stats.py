"""Confidence intervals and paired tests on per-item scores.

Every quality number tunewise reports is a mean of per-item scores with a bootstrap 95% interval, and
two variants scored on the same items are compared with a paired test (sign-flip permutation on the
per-item differences), so "B beats A" is a claim with a p-value, not a difference of two means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(scores, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile bootstrap of the mean (resample items with replacement)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks bound memory for large n
        k = min(256, n_boot - start)
        means[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return Estimate(float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(x.size))


@dataclass
class PairedResult:
    diff: Estimate  # mean of b - a, with its bootstrap CI
    p_value: float  # two-sided, sign-flip permutation

    def as_dict(self) -> dict:
        return {"diff": self.diff.as_dict(), "p_value": self.p_value}


def paired_test(a, b, n_perm: int = 10000, seed: int = 0) -> PairedResult:
    """Is variant b different from a on the same items? Randomly flip the sign of each per-item
    difference (the null: the labels a/b are exchangeable per item) and count how often the mean
    difference is at least as extreme as observed."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
    d = b - a
    observed = abs(d.mean()) if d.size else 0.0
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 512):
        k = min(512, n_perm - start)
        signs = rng.choice((-1.0, 1.0), size=(k, d.size))
        hits += int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return PairedResult(bootstrap_ci(d, seed=seed), (hits + 1) / (n_perm + 1))


def percentile(values, q: float) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.percentile(v, q)) if v.size else float("nan")
