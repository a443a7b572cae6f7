"""The cleaning pipeline of `tunewise data prepare`: each step configurable, each counting what it did.

Steps, in order: Unicode/whitespace normalisation -> PII redaction -> filters (empty or too short/long
turns, repetitive answers, answers that copy the prompt) -> exact dedup -> near-duplicate removal
(MinHash LSH over the prompt: tunewise/data/minhash.py). A record a step drops goes to quarantine with the reason
(and, for duplicates, the record it duplicates); a record a step changes is counted, with examples.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from .pii import PII_TYPES, redact
from .records import BadRecord, Record

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


@dataclass
class StepReport:
    changed: int = 0
    dropped: int = 0
    examples: list = field(default_factory=list)  # up to 5: {"source", "before", "after"} or {"source", "reason"}

    def note(self, example: dict) -> None:
        if len(self.examples) < 5:
            self.examples.append(example)


def normalize_text(text: str) -> str:
    """NFC, no control or zero-width characters, runs of spaces collapsed, lines and ends trimmed."""
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text)).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _map_contents(r: Record, fn) -> Record:
    msgs = [{**m, "content": fn(m["content"])} for m in r.messages]
    return Record(messages=msgs, source=r.source, label=r.label, meta=r.meta)


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none; a looping answer tends to 1)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_prompt(r: Record) -> bool:
    """The answer is (almost) the user's text again: its words are >= 90% the prompt's and it is not a short label."""
    user = next((m["content"] for m in reversed(r.messages) if m["role"] == "user"), "")
    a, u = _words(r.answer), set(_words(user))
    return len(a) >= 5 and sum(w in u for w in a) / len(a) >= 0.9 and len(a) >= 0.6 * len(u)


def shingles(text: str, k: int = 5) -> set[bytes]:
    t = " ".join(_words(text))
    if len(t) <= k:
        return {t.encode()}
    return {t[i : i + k].encode() for i in range(len(t) - k + 1)}


class Cleaner:
    def __init__(self, cfg):
        self.c = cfg
        self.steps: dict[str, StepReport] = {}
        self.pii_found: Counter = Counter()
        self.clusters: list[dict] = []
        self.label_conflicts = 0
        self._sigs: dict = {}  # prompt text -> MinHash signature
        self._redact_fn = redact
        if cfg.pii and cfg.pii_backend == "presidio":
            from .pii import PresidioDetector

            self._redact_fn = PresidioDetector(cfg.presidio_model).redact

    def step(self, name: str) -> StepReport:
        return self.steps.setdefault(name, StepReport())

    def run(self, records: list[Record], bad: list[BadRecord], drop: bool = True) -> list[Record]:
        """Clean records; with drop=False (a given validation/test file) only normalise and redact, never thin."""
        c = self.c
        if c.normalize:
            records = [self._normalize(r) for r in records]
        if c.pii:
            records = [self._redact(r) for r in records]
        if not drop:
            return records
        records = [r for r in records if self._keep(r, bad)]
        if c.dedup:
            records = self._dedup(records, bad)
        if c.near_dedup:
            records = self._near_dedup(records, bad)
        return records

    def _normalize(self, r: Record) -> Record:
        out = _map_contents(r, normalize_text)
        if out.messages != r.messages:
            s = self.step("normalize")
            s.changed += 1
            before = next(m["content"] for m, n in zip(r.messages, out.messages) if m["content"] != n["content"])
            s.note({"source": r.source, "before": before[:200], "after": normalize_text(before)[:200]})
        return out

    def _redact(self, r: Record) -> Record:
        types = tuple(self.c.pii_types)
        found: Counter = Counter()

        def fn(text: str) -> str:
            new, counts = self._redact_fn(text, types)
            found.update(counts)
            return new

        out = _map_contents(r, fn)
        if found:
            s = self.step("pii")
            s.changed += 1
            self.pii_found.update(found)
            i = next(i for i, (m, n) in enumerate(zip(r.messages, out.messages)) if m["content"] != n["content"])
            s.note({"source": r.source, "found": dict(found), "after": out.messages[i]["content"][:200]})
        return out

    def _drop(self, step: str, r: Record, reason: str, bad: list[BadRecord]) -> None:
        s = self.step(step)
        s.dropped += 1
        s.note({"source": r.source, "reason": reason})
        file, _, where = r.source.rpartition(":")
        bad.append(BadRecord(file or r.source, where or "", reason, r.to_json()))

    def _keep(self, r: Record, bad: list[BadRecord]) -> bool:
        c = self.c
        for m in r.messages:
            n = len(m["content"])
            if m["role"] != "system" and n < c.min_chars:
                self._drop("filter", r, f"{m['role']} turn too short ({n} < {c.min_chars} characters)", bad)
                return False
            if c.max_chars and n > c.max_chars:
                self._drop("filter", r, f"{m['role']} turn too long ({n} > {c.max_chars} characters)", bad)
                return False
        rep = repetition(r.answer)
        if rep > c.max_repetition:
            self._drop("filter", r, f"repetitive answer ({rep:.0%} of its word 3-grams repeat)", bad)
            return False
        if c.drop_copies and copies_prompt(r):
            self._drop("filter", r, "the answer copies the prompt", bad)
            return False
        return True

    def _dedup(self, records: list[Record], bad: list[BadRecord]) -> list[Record]:
        seen: dict[str, Record] = {}
        out = []
        for r in records:
            key = hashlib.sha256(repr([(m["role"], m["content"]) for m in r.messages]).encode()).hexdigest()
            if key in seen:
                self._drop("dedup", r, f"exact duplicate of {seen[key].source}", bad)
                continue
            seen[key] = r
            out.append(r)
        return out

    def _signatures(self, texts: list[str], flat=None, off=None) -> "np.ndarray":
        """MinHash signatures of texts, [texts, num_perm], remembered per text so the near-dedup, the leakage
        check and the quality score compute each once; `flat, off` (batch_shingle_hashes of texts) are reused
        when every text is new, otherwise only the new texts are shingled."""
        import numpy as np

        from .minhash import NearDupIndex, batch_shingle_hashes

        todo = [i for i, t in enumerate(texts) if t not in self._sigs]
        if todo:
            index = NearDupIndex(self.c.near_dup_threshold, self.c.num_perm)  # the permutations depend on num_perm only
            if flat is None or len(todo) < len(texts):
                flat, off = batch_shingle_hashes([texts[i] for i in todo])
            for i, sig in zip(todo, index.signatures(flat, off)):
                self._sigs[texts[i]] = sig
        return np.stack([self._sigs[t] for t in texts]) if texts else np.zeros((0, self.c.num_perm), dtype=np.uint32)

    def _hashes(self, texts: list[str]) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """Shingle hashes (flat, offsets) and MinHash signatures of texts."""
        from .minhash import batch_shingle_hashes

        flat, off = batch_shingle_hashes(texts)
        return flat, off, self._signatures(texts, flat, off)

    def signatures(self, records: list[Record]) -> "np.ndarray":
        return self._signatures([r.prompt_key for r in records])

    def _near_dedup(self, records: list[Record], bad: list[BadRecord]) -> list[Record]:
        """MinHash LSH over the prompt (user turns): a record whose prompt is within the Jaccard threshold of an
        earlier kept one is dropped; different labels inside a cluster are reported as label conflicts.

        LSH band keys are computed for all records at once; a record that shares no band key with any other
        cannot be anybody's candidate, so only the colliding ones go through the sequential find/add."""
        import numpy as np

        from .minhash import NearDupIndex, colliding

        index = NearDupIndex(self.c.near_dup_threshold, self.c.num_perm)
        flat, offsets, sigs = self._hashes([r.prompt_key for r in records])
        keys = index.band_keys(sigs)
        maybe = colliding(keys)
        indexed: list[Record] = []
        out = []
        for i, r in enumerate(records):
            if not maybe[i]:
                out.append(r)
                continue
            h, k = np.unique(flat[offsets[i] : offsets[i + 1]]), keys[i].tolist()
            hit = index.find(h, keys=k)
            if hit is not None:
                match = indexed[hit[0]]
                conflict = r.label != match.label
                self.label_conflicts += conflict
                self._drop("near_dedup", r, f"near-duplicate of {match.source}" + (f" (label {r.label!r} vs {match.label!r})" if conflict else ""), bad)
                if len(self.clusters) < 50:
                    self.clusters.append({"kept": match.source, "dropped": r.source, "jaccard": round(hit[1], 3), "label_conflict": conflict,
                                          "kept_text": match.prompt_key[:120], "dropped_text": r.prompt_key[:120]})
                continue
            index.add(h, keys=k)
            indexed.append(r)
            out.append(r)
        return out

    def near_leaks(self, splits: dict[str, list[Record]]) -> list[dict]:
        """Training prompts that are near-duplicates (Jaccard >= threshold) of a validation or test prompt.
        Only training prompts sharing an LSH band key with an evaluation prompt are compared (vectorised)."""
        import numpy as np

        from .minhash import NearDupIndex

        evals = [(name, r) for name in ("validation", "test") for r in splits.get(name, [])]
        train = splits.get("train", [])
        if not evals or not train:
            return []
        index = NearDupIndex(self.c.near_dup_threshold, self.c.num_perm)
        flat, off, sigs = self._hashes([r.prompt_key for _, r in evals])
        ekeys = index.band_keys(sigs)
        for i in range(len(evals)):
            index.add(np.unique(flat[off[i] : off[i + 1]]), keys=ekeys[i].tolist())
        flat, off, sigs = self._hashes([r.prompt_key for r in train])
        tkeys = index.band_keys(sigs)
        cand = np.zeros(len(train), dtype=bool)
        for b in range(tkeys.shape[1]):
            cand |= np.isin(tkeys[:, b], ekeys[:, b])
        out = []
        for i in np.flatnonzero(cand):
            r = train[i]
            hit = index.find(np.unique(flat[off[i] : off[i + 1]]), keys=tkeys[i].tolist())
            if hit is not None:
                name, other = evals[hit[0]]
                out.append({"train": r.source, "split": name, "other": other.source, "jaccard": round(hit[1], 3),
                            "prompt": r.prompt_key[:200], "record": r})
        return out

    def report(self) -> dict:
        return {"steps": {k: {"changed": v.changed, "dropped": v.dropped, "examples": v.examples} for k, v in self.steps.items()},
                "pii_found": dict(self.pii_found), "near_duplicate_clusters": self.clusters, "label_conflicts": self.label_conflicts}


__all__ = ["Cleaner", "normalize_text", "repetition", "copies_prompt", "PII_TYPES"]


def quality_scores(records: list[Record], neighbour_threshold: float = 0.6, signatures=None) -> list[dict]:
    """A per-record quality score in [0, 1] from simple signals, each also returned:

    - length: how typical the answer's and prompt's lengths are for this data (a Gaussian on the z-score of
      log word counts: a one-word essay answer or a 2,000-word one scores low);
    - repetition: 1 - the share of repeated word 3-grams in the answer;
    - label: for labelled data, the share of similar prompts (Jaccard of character 5-grams >= neighbour_threshold,
      estimated from MinHash signatures) that carry the same label (1 when there are none): a label its
      look-alikes disagree with is suspect.
    The score is the mean of the signals. `signatures` (Cleaner.signatures of the same records, 128 permutations)
    saves computing them again.
    """
    import math

    import numpy as np

    if not records:
        return []
    la = np.log1p([len(r.answer.split()) for r in records])
    lp = np.log1p([len(r.prompt_key.split()) for r in records])

    def gauss(x):
        sd = float(x.std()) or 1.0
        return np.exp(-0.5 * ((x - float(np.median(x))) / sd) ** 2)

    length = (gauss(la) + gauss(lp)) / 2
    labelled = any(r.label is not None for r in records)
    label = _label_agreement(records, neighbour_threshold, signatures=signatures) if labelled else np.ones(len(records))
    out = []
    for i, r in enumerate(records):
        rep = 1.0 - repetition(r.answer)
        signals = {"length": round(float(length[i]), 4), "repetition": round(rep, 4)}
        if labelled:
            signals["label"] = round(float(label[i]), 4)
        out.append({"score": round(sum(signals.values()) / len(signals), 4), **signals})
    assert all(not math.isnan(o["score"]) for o in out)
    return out


def _label_agreement(records: list[Record], threshold: float, num_perm: int = 128, window: int = 8, signatures=None) -> "np.ndarray":
    """Per record, the share of its look-alikes (estimated Jaccard >= threshold) with the same label; 1 without any.

    Vectorised: in every LSH band the records are sorted by band key and each is paired with the next
    `window` records of the same key (so a huge bucket costs n * window pairs, not n^2); the pairs'
    Jaccard is estimated from the MinHash signatures (128 permutations: standard error ~0.04 at 0.6),
    which is enough for a soft score. 100,000 records take a few seconds (bench/data_prep.py)."""
    import numpy as np

    from .minhash import NearDupIndex, _bands, band_keys, batch_shingle_hashes

    n = len(records)
    if signatures is not None and signatures.shape == (n, num_perm):
        sigs = signatures
    else:
        flat, off = batch_shingle_hashes([r.prompt_key for r in records])
        sigs = NearDupIndex(threshold, num_perm).signatures(flat, off)
    _, labels = np.unique(np.array([str(r.label) for r in records]), return_inverse=True)
    bands, rows = _bands(threshold, num_perm, recall=0.95)
    found = []
    all_keys = band_keys(sigs, bands, rows)
    for b in range(bands):
        key = all_keys[:, b]
        order = np.argsort(key, kind="stable")
        ks = key[order]
        for d in range(1, min(window, n - 1) + 1):
            same = ks[d:] == ks[:-d]
            i, j = order[:-d][same], order[d:][same]
            found.append(np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j))
    agree = np.zeros(n)
    count = np.zeros(n)
    if found:
        pair = np.unique(np.concatenate(found))
        for s in range(0, len(pair), 200_000):  # bounded memory: [chunk, num_perm] comparisons at a time
            p = pair[s : s + 200_000]
            i, j = p // n, p % n
            near = (sigs[i] == sigs[j]).mean(axis=1) >= threshold
            i, j = i[near], j[near]
            same = (labels[i] == labels[j]).astype(float)
            count += np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
            agree += np.bincount(i, weights=same, minlength=n) + np.bincount(j, weights=same, minlength=n)
    return np.where(count > 0, agree / np.maximum(count, 1), 1.0)
