"""The steps of `data prepare` that look across records, on compact per-record arrays and a disk spool.

The cleaned records live in a JSONL spool on disk and are read back by position when a step needs a text
(to verify a near-duplicate candidate, to name the record a duplicate repeats, to write the splits). In
memory there are only fixed-size numbers per record (hashes, ranks, label ids, LSH band keys), so a file
larger than memory goes through in bounded memory: see docs/data.md for the bytes per record.

Near-duplicates: MinHash signatures with LSH banding (tunewise/data/minhash.py); every candidate pair is
confirmed with the exact Jaccard similarity of the character 5-gram sets, which are written to a work file
the first time they are computed and read back from it (ShingleSets).
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

import numpy as np

from .minhash import prompt_shingles
from .records import Record


class Spool:
    """Records appended to a JSONL file and read back by position, as the same bytes `write_jsonl` writes."""

    def __init__(self, path: Path, resume: tuple[np.ndarray, int] | None = None):
        """resume: (offsets, end) of a checkpoint: the file is reopened and cut back to `end` bytes."""
        self.path = path
        self.offsets = array("q")
        self._end = 0
        if resume is None:
            self._f = open(path, "w+b")
        else:
            self._f = open(path, "r+b")
            self.offsets.frombytes(np.asarray(resume[0], dtype=np.int64).tobytes())
            self._end = int(resume[1])
            self._f.truncate(self._end)
            self._f.seek(self._end)

    @property
    def end(self) -> int:
        """Bytes written (flushed to the OS by this call, so a checkpoint that records it is safe)."""
        self._f.flush()
        return self._end

    def add(self, records: list[Record]) -> None:
        for r in records:
            line = (json.dumps(r.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
            self._f.write(line)
            self.offsets.append(self._end)
            self._end += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def line(self, i: int) -> bytes:
        self._f.seek(self.offsets[int(i)])  # a seek flushes pending writes
        return self._f.readline()

    def get(self, i: int) -> Record:
        return Record.from_json(json.loads(self.line(i)))

    def records(self, positions) -> list[Record]:
        return [self.get(i) for i in positions]

    def close(self) -> None:
        self._f.close()


class ShingleSets:
    """Sorted unique 5-gram hashes (uint32) of records' prompts by position. Each set, once computed, is written
    to a file beside the spool and read back with one pread (the page cache keeps the hot ones); in memory
    there are 12 bytes per record. A set not yet there is computed from the spool."""

    def __init__(self, spool: Spool, n: int):
        self.spool = spool
        self._f = open(spool.path.with_suffix(f".shingles-{id(self)}"), "w+b")
        self._fd = self._f.fileno()
        self._off = np.full(n, -1, dtype=np.int64)
        self._len = np.zeros(n, dtype=np.int32)
        self._end = 0

    def put(self, i: int, h: np.ndarray) -> None:
        if self._off[i] >= 0:
            return
        data = h.astype(np.uint32).tobytes()
        os.pwrite(self._fd, data, self._end)
        self._off[i], self._len[i] = self._end, len(h)
        self._end += len(data)

    def get(self, i: int) -> np.ndarray:
        if self._off[i] < 0:
            flat, _ = prompt_shingles([self.spool.get(i)])
            self.put(i, np.unique(flat))
        return np.frombuffer(os.pread(self._fd, int(self._len[i]) * 4, int(self._off[i])), dtype=np.uint32)

    def close(self) -> None:
        self._f.close()
        Path(self._f.name).unlink(missing_ok=True)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _verify(h: np.ndarray, cands: np.ndarray, positions, sigs, sig: np.ndarray, sets: ShingleSets, threshold: float,
            margin: float = 0.25) -> tuple[int, float] | None:
    """The first candidate (ascending) whose exact Jaccard with h is >= threshold, as (index into cands' positions, J).

    With many candidates (a template repeated with small changes puts thousands in one LSH bucket) the MinHash
    estimate from the signatures first rules out those far below the threshold: with 128 permutations a pair
    at the threshold is estimated `margin` (0.25) below it with probability < 1e-12, so no true match is lost."""
    if len(cands) > 8 and sigs is not None:
        est = (np.asarray(sigs[np.asarray(positions)[cands]]) == sig).mean(axis=1)
        cands = cands[est >= threshold - margin]
    for c in cands.tolist():
        sim = jaccard(h, sets.get(int(positions[c])))
        if sim >= threshold:
            return c, sim
    return None


def _buckets(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSH buckets of the rows of a [n, bands] key matrix, as flat arrays: bucket[row, band] (-1 where nobody
    else has that key in that band), and each bucket's start and size in one flat member array."""
    bucket = np.full(k.shape, -1, dtype=np.int64)
    sizes, base = [], 0
    for b in range(k.shape[1]):
        _, inv, counts = np.unique(k[:, b], return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        multi = counts > 1
        sid = np.cumsum(multi) - 1  # compact ids of the keys that at least two rows share
        bucket[:, b] = np.where(multi[inv], base + sid[inv], -1)
        sizes.append(counts[multi])
        base += int(multi.sum())
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    start = (np.cumsum(sizes) - sizes).astype(np.int64)
    return bucket, start, sizes


def near_dedup(pos: np.ndarray, keys: np.ndarray, spool: Spool, threshold: float, on_drop, chunk: int = 20_000, sigs=None) -> np.ndarray:
    """Positions (ascending, input order) whose prompt is within the Jaccard threshold of an earlier kept one.

    Only rows sharing a band key with another can be anybody's candidate; they go through a sequential
    find-or-add in input order (the earliest kept match wins, as a reader would expect). The buckets are
    flat numpy arrays sized in advance (every row's buckets are known from the keys), holding the kept rows
    only: ~100 bytes per colliding row, no Python object per entry. sigs[position] (MinHash signatures, may
    be a memmap) lets large candidate lists be thinned by estimate first. on_drop(record, match_record,
    jaccard) is called for every drop."""
    if not len(pos):
        return np.zeros(0, dtype=np.int64)
    bucket, start, sizes = _buckets(keys[pos])
    hit = (bucket >= 0).any(axis=1)
    cand, bucket = pos[hit], bucket[hit]
    members = np.zeros(int(sizes.sum()), dtype=np.int64)  # indices into `indexed`, bucket by bucket
    fill = np.zeros(len(start), dtype=np.int64)
    indexed = np.zeros(len(cand), dtype=np.int64)  # positions of the kept rows, in the order they were added
    m = 0
    sets = ShingleSets(spool, len(spool))
    dropped = []
    for s in range(0, len(cand), chunk):
        recs = spool.records(cand[s : s + chunk])
        flat, off = prompt_shingles(recs)
        block_sigs = None if sigs is None else np.asarray(sigs[cand[s : s + chunk]])
        for t, r in enumerate(recs):
            i, bs = int(cand[s + t]), bucket[s + t]
            bs = bs[bs >= 0]
            h = np.unique(flat[off[t] : off[t + 1]]).astype(np.uint32)
            st, fl = start[bs], fill[bs]
            match = None
            if fl.any():
                found = np.unique(np.concatenate([members[a : a + f] for a, f in zip(st.tolist(), fl.tolist()) if f]))
                match = _verify(h, found, indexed, sigs, None if block_sigs is None else block_sigs[t], sets, threshold)
            if match is not None:
                on_drop(r, spool.get(int(indexed[match[0]])), match[1])
                dropped.append(i)
                continue
            members[st + fl] = m
            fill[bs] += 1
            indexed[m] = i
            m += 1
            sets.put(i, h)
    sets.close()
    return np.array(dropped, dtype=np.int64)


def near_leaks(train: np.ndarray, evals: np.ndarray, keys: np.ndarray, spool: Spool, threshold: float, sigs=None) -> list[tuple[int, int, float]]:
    """(train index, eval index, Jaccard) for every training row (in the given order) whose prompt is within the
    threshold of an evaluation prompt; the earliest such evaluation row is named. Only training rows sharing a
    band key with an evaluation row are compared (vectorised with sorted keys; sigs as in near_dedup)."""
    if not len(train) or not len(evals):
        return []
    ek, tk = keys[evals], keys[train]
    orders = [np.argsort(ek[:, b], kind="stable") for b in range(ek.shape[1])]
    sorted_keys = [ek[o, b] for b, o in enumerate(orders)]
    cand = np.zeros(len(train), dtype=bool)
    for b in range(ek.shape[1]):
        cand |= np.isin(tk[:, b], ek[:, b])
    rows = np.flatnonzero(cand)
    ranges = [(np.searchsorted(sk, tk[rows, b], "left"), np.searchsorted(sk, tk[rows, b], "right")) for b, sk in enumerate(sorted_keys)]
    sets = ShingleSets(spool, len(spool))
    out = []
    for x, t in enumerate(rows.tolist()):
        spans = [o[lo[x] : hi[x]] for o, (lo, hi) in zip(orders, ranges) if hi[x] > lo[x]]
        found = np.unique(np.concatenate(spans))
        match = _verify(sets.get(int(train[t])), found, evals, sigs, None if sigs is None else np.asarray(sigs[int(train[t])]), sets, threshold)
        if match is not None:
            out.append((t, match[0], match[1]))
    sets.close()
    return out
