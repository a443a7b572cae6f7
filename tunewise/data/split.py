"""Deterministic train/validation/test split and the exact-duplicate leakage check.

Records that ask the same thing (same normalised user turns) are one group and land in one split, so a
duplicate can never leak from train into validation. Within each label the groups are ordered by a
seeded hash, which makes the split independent of input order and stratified by label.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from .records import Record


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def split_records(
    records: list[Record], validation: float, test: float, seed: int, stratify: bool = True
) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.prompt_key].append(r)
    # A group's stratum is its first record's label (duplicates with other labels go along with it).
    strata: dict[str | None, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[members[0].label if stratify else None].append(key)

    out: dict[str, list[Record]] = {"train": [], "validation": [], "test": []}
    carry = {"validation": 0.0, "test": 0.0}  # fractional remainders carried across strata keep totals exact
    for label in sorted(strata, key=lambda x: (x is None, str(x))):
        keys = sorted(strata[label], key=lambda k: _rank(seed, k))
        n = len(keys)
        counts = {}
        for name, share in (("test", test), ("validation", validation)):
            want = n * share + carry[name]
            counts[name] = int(want)
            carry[name] = want - counts[name]
        n_test, n_val = counts["test"], counts["validation"]
        if n_test + n_val >= n:  # keep at least one group for training in every stratum
            n_val = max(0, n - 1 - n_test)
        assigned = {"test": keys[:n_test], "validation": keys[n_test : n_test + n_val], "train": keys[n_test + n_val :]}
        for name, ks in assigned.items():
            for k in ks:
                out[name].extend(groups[k])
    # Restore a stable, input-independent order within each split.
    for name in out:
        out[name].sort(key=lambda r: _rank(seed, r.prompt_key + "\x00" + r.source))
    return out


def find_leaks(splits: dict[str, list[Record]]) -> list[dict]:
    """Exact duplicates (same normalised user turns) that appear in more than one split."""
    where: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, recs in splits.items():
        for r in recs:
            where[r.prompt_key][name].append(r.source)
    leaks = []
    for key, by_split in where.items():
        if len(by_split) > 1:
            leaks.append({"prompt": key[:200], "splits": {k: v for k, v in sorted(by_split.items())}})
    return leaks


def sample_records(records: list[Record], n: int | None, seed: int = 0) -> list[Record]:
    """A seeded, order-independent sample of n records (files are often sorted by label: never take the first n)."""
    if n is None or n >= len(records):
        return records
    return sorted(records, key=lambda r: _rank(seed, r.prompt_key + "\x00" + r.source))[:n]
