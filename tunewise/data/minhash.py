"""Near-duplicate search: MinHash signatures with LSH banding, vectorised with numpy.

datasketch computes the same thing one shingle at a time in Python (a SHA-1 per shingle), which took
~1 ms per record here; this takes a few tens of microseconds (bench/data_prep.py). Every candidate pair
is confirmed with the exact Jaccard
similarity of the shingle sets, so LSH only decides which pairs are compared; the banding is chosen so
that a pair at the threshold is compared with probability >= 0.99.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_WORD = re.compile(r"\w+")


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Sorted unique 32-bit hashes of the character k-grams of the text's lowercase words joined by spaces."""
    t = " ".join(_WORD.findall(text.lower())).encode("utf-8")
    if not t:
        return np.zeros(1, dtype=np.uint64)
    arr = np.frombuffer(t, dtype=np.uint8).astype(np.uint64)
    if len(arr) < k:
        arr = np.concatenate([arr, np.zeros(k - len(arr), dtype=np.uint64)])
    windows = sliding_window_view(arr, k)
    h = windows @ (np.uint64(257) ** np.arange(k - 1, -1, -1, dtype=np.uint64))  # polynomial, wraps mod 2^64
    return np.unique(_finalise(h))


def _finalise(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)  # splitmix-style finaliser spreads the bits before taking 32 of them
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h >> np.uint64(32)


def prompt_shingles(records) -> tuple[np.ndarray, np.ndarray]:
    """batch_shingle_hashes of records' prompts (prompt_key), each salted with its record's tool set (shingle_salt):
    the same question asked with other tools is another task, so it shares no shingle with it (never a near-duplicate),
    while records without tools hash as before."""
    return batch_shingle_hashes([r.prompt_key for r in records], salts=[r.shingle_salt for r in records])


def batch_shingle_hashes(texts: list[str], k: int = 5, salts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """shingle_hashes for many texts in a few numpy operations: (flat hashes, offsets); text i owns
    flat[offsets[i]:offsets[i + 1]] (not deduplicated: the minimum does not care). salts: a number per text added to
    its shingles before the finaliser (0 changes nothing)."""
    blobs = [" ".join(_WORD.findall(t.lower())).encode("utf-8").ljust(k, b"\0") for t in texts]
    lens = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    arr = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    counts = lens - k + 1
    h = sliding_window_view(arr, k) @ (np.uint64(257) ** np.arange(k - 1, -1, -1, dtype=np.uint64))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pos = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])  # window starts inside each text
    h = h[pos]
    if salts is not None and any(salts):
        h = h + np.repeat(np.array(salts, dtype=np.uint64), counts)  # wraps around mod 2^64, as the hashes do
    return _finalise(h), offsets


@lru_cache(maxsize=64)
def _bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """Bands x rows: the most rows per band (fewest false candidates) such that a pair exactly at the
    threshold becomes a candidate with probability >= recall. Candidates are verified exactly, so a
    false candidate costs a comparison while a missed pair is a duplicate kept: recall comes first
    (datasketch's default weighting found only 74% of pairs at J >= 0.9 on BANKING77-like text)."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


class NearDupIndex:
    """Insert shingle-hash arrays under ids; find an earlier one whose Jaccard similarity >= threshold."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        # Multiply-shift hashing (Dietzfelbinger): h(x) = (a*x + b mod 2^64) >> 32 with odd a; no modulo, so
        # numpy does three cheap operations per shingle and permutation.
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self.threshold = threshold
        self.b_count, self.rows = _bands(threshold, num_perm)
        self.buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(self.b_count)]
        self.sets: list[np.ndarray] = []

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        return ((hashes[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)

    def signatures(self, flat: np.ndarray, offsets: np.ndarray, chunk: int = 32_768) -> np.ndarray:
        """Signatures of many texts from batch_shingle_hashes, [texts, num_perm], in bounded memory."""
        n = len(offsets) - 1
        out = np.empty((n, len(self.a)), dtype=np.uint32)
        i = 0
        while i < n:  # texts whose shingles together fit in `chunk` rows
            j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + chunk, side="right")) - 1)
            j = min(j, n)
            part = flat[offsets[i] : offsets[j]]
            vals = self.a[:, None] * part[None, :]  # [perm, shingle]: the reduction runs along contiguous rows
            vals += self.b[:, None]
            vals >>= np.uint64(32)
            out[i:j] = np.minimum.reduceat(vals, offsets[i:j] - offsets[i], axis=1).T
            i = j
        return out

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """[texts, bands] uint64: each band's rows folded into one key (equal rows give equal keys)."""
        return band_keys(sigs, self.b_count, self.rows)

    def _keys(self, sig: np.ndarray) -> list[int]:
        return self.band_keys(sig[None, :])[0].tolist()

    def find(self, hashes: np.ndarray, sig: np.ndarray | None = None, keys: list[int] | None = None) -> tuple[int, float] | None:
        """The first inserted id (in insertion order) at or above the threshold, with its similarity."""
        if keys is None:
            keys = self._keys(self.signature(hashes) if sig is None else sig)
        cands = sorted({i for band, key in zip(self.buckets, keys) for i in band.get(key, ())})
        for i in cands:
            other = self.sets[i]
            inter = len(np.intersect1d(hashes, other, assume_unique=True))
            sim = inter / (len(hashes) + len(other) - inter)
            if sim >= self.threshold:
                return i, sim
        return None

    def add(self, hashes: np.ndarray, sig: np.ndarray | None = None, keys: list[int] | None = None) -> int:
        if keys is None:
            keys = self._keys(self.signature(hashes) if sig is None else sig)
        i = len(self.sets)
        self.sets.append(hashes)
        for band, key in zip(self.buckets, keys):
            band[key].append(i)
        return i


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """LSH band keys of many signatures at once: [texts, bands] uint64 (a multiplicative fold of each band's rows;
    equal rows always give equal keys, and unequal ones collide with probability ~2^-64)."""
    out = np.zeros((len(sigs), bands), dtype=np.uint64)
    for b in range(bands):
        key = out[:, b]
        for c in range(b * rows, (b + 1) * rows):
            key *= np.uint64(0x9E3779B97F4A7C15)
            key += sigs[:, c].astype(np.uint64)
    return out
