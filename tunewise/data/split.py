"""Deterministic train/validation/test split and the exact-duplicate leakage check.

Records that ask the same thing (same normalised user turns) are one group and land in one split, so a
duplicate can never leak from train into validation. Within each label the groups are ordered by a
seeded hash, which makes the split independent of input order and stratified by label.

The work is done on compact per-record arrays (a 64-bit group rank, a label id, a 64-bit record rank), so
`data prepare` can split a file far larger than memory; `split_records` is the same on a list of records.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from .records import Record


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def rank64(seed: int, key: str) -> int:
    """The first 64 bits of _rank as an integer: sorting by it is sorting by _rank (up to a 2^-64 tie)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


def split_positions(group: np.ndarray, label: np.ndarray, names: list[str | None], record_rank: np.ndarray,
                    validation: float, test: float, stratify: bool = True) -> dict[str, np.ndarray]:
    """Positions (into the arrays) of each split, each split ordered by record_rank.

    group: [n] uint64, the seeded rank of the record's prompt (equal prompts, equal group); label: [n] int,
    an index into names (-1: no label). A group's stratum is the label of its first record; within a stratum
    groups are taken in rank order: the first share goes to test, the next to validation, the rest to train."""
    out = {"train": [], "validation": [], "test": []}
    if len(group):
        groups, first, inv = np.unique(group, return_index=True, return_inverse=True)  # ascending = rank order
        stratum = label[first] if stratify else np.full(len(groups), -2)
        name = {-2: None, -1: None, **dict(enumerate(names))}
        present = sorted(set(stratum.tolist()), key=lambda s: (name[s] is None, str(name[s])))
        where = {s: i for i, s in enumerate(present)}
        order = np.lexsort((np.arange(len(groups)), np.array([where[s] for s in stratum.tolist()])))
        bounds = np.flatnonzero(np.diff(np.array([where[s] for s in stratum[order].tolist()]))) + 1
        assign = np.zeros(len(groups), dtype=np.int8)  # 0 train, 1 validation, 2 test
        carry = {"validation": 0.0, "test": 0.0}  # fractional remainders carried across strata keep totals exact
        for keys in np.split(order, bounds):
            n = len(keys)
            counts = {}
            for part, share in (("test", test), ("validation", validation)):
                want = n * share + carry[part]
                counts[part] = int(want)
                carry[part] = want - counts[part]
            n_test, n_val = counts["test"], counts["validation"]
            if n_test + n_val >= n:  # keep at least one group for training in every stratum
                n_val = max(0, n - 1 - n_test)
            assign[keys[:n_test]] = 2
            assign[keys[n_test : n_test + n_val]] = 1
        which = assign[inv]
        for k, part in enumerate(("train", "validation", "test")):
            pos = np.flatnonzero(which == k)
            out[part] = pos[np.argsort(record_rank[pos], kind="stable")]
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def label_ids(labels: list[str | None]) -> tuple[np.ndarray, list[str]]:
    names: dict[str, int] = {}
    ids = np.array([-1 if x is None else names.setdefault(x, len(names)) for x in labels], dtype=np.int64)
    return ids, list(names)


def split_records(
    records: list[Record], validation: float, test: float, seed: int, stratify: bool = True
) -> dict[str, list[Record]]:
    group = np.array([rank64(seed, r.prompt_key) for r in records], dtype=np.uint64)
    rrank = np.array([rank64(seed, r.prompt_key + "\x00" + r.source) for r in records], dtype=np.uint64)
    ids, names = label_ids([r.label for r in records])
    pos = split_positions(group, ids, names, rrank, validation, test, stratify)
    return {k: [records[i] for i in v] for k, v in pos.items()}


def leaking_groups(groups_by_split: dict[str, np.ndarray]) -> list[int]:
    """Group ids found in more than one split, in order of first appearance (splits in the order given)."""
    seq = np.concatenate([np.asarray(g, dtype=np.uint64) for g in groups_by_split.values()] or [np.zeros(0, np.uint64)])
    if not len(seq):
        return []
    which = np.concatenate([np.full(len(g), k) for k, g in enumerate(groups_by_split.values())])
    pairs = np.unique(np.stack([seq, which.astype(np.uint64)], axis=1), axis=0)
    ug, counts = np.unique(pairs[:, 0], return_counts=True)
    multi = ug[counts > 1]
    if not len(multi):
        return []
    pos = np.flatnonzero(np.isin(seq, multi))
    ids, first = np.unique(seq[pos], return_index=True)
    return ids[np.argsort(pos[first])].tolist()


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
