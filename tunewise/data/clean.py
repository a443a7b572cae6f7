"""The cleaning pipeline of `tunewise data prepare`: each step configurable, each counting what it did.

Steps, in order: Unicode/whitespace normalisation -> PII redaction -> filters (empty or too short/long
turns, repetitive answers, answers that copy the prompt) -> exact dedup -> near-duplicate removal
(MinHash LSH over the prompt, datasketch). A record a step drops goes to quarantine with the reason
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
            new, counts = redact(text, types)
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

    def _near_dedup(self, records: list[Record], bad: list[BadRecord]) -> list[Record]:
        """MinHash LSH over the prompt (user turns): a record whose prompt is within the Jaccard threshold of an
        earlier kept one is dropped; different labels inside a cluster are reported as label conflicts."""
        from datasketch import MinHash, MinHashLSH

        c = self.c
        lsh = MinHashLSH(threshold=c.near_dup_threshold, num_perm=c.num_perm)
        kept: dict[str, tuple[Record, set]] = {}
        out = []
        hashes = MinHash.bulk([list(shingles(r.prompt_key)) for r in records], num_perm=c.num_perm, seed=1)
        for i, (r, mh) in enumerate(zip(records, hashes)):
            sh = shingles(r.prompt_key)
            match = None
            for key in lsh.query(mh):  # LSH proposes; the exact Jaccard decides
                other, other_sh = kept[key]
                if len(sh & other_sh) / len(sh | other_sh) >= c.near_dup_threshold:
                    match = other
                    break
            if match is not None:
                conflict = r.label != match.label
                self._drop("near_dedup", r, f"near-duplicate of {match.source}" + (f" (label {r.label!r} vs {match.label!r})" if conflict else ""), bad)
                if len(self.clusters) < 50:
                    self.clusters.append({"kept": match.source, "dropped": r.source, "label_conflict": conflict,
                                          "kept_text": match.prompt_key[:120], "dropped_text": r.prompt_key[:120]})
                continue
            key = str(i)
            lsh.insert(key, mh)
            kept[key] = (r, sh)
            out.append(r)
        return out

    def near_leaks(self, splits: dict[str, list[Record]]) -> list[dict]:
        """Training prompts that are near-duplicates (Jaccard >= threshold) of a validation or test prompt."""
        from datasketch import MinHash, MinHashLSH

        c = self.c
        evals = [(name, r) for name in ("validation", "test") for r in splits.get(name, [])]
        if not evals or not splits.get("train"):
            return []
        lsh = MinHashLSH(threshold=c.near_dup_threshold, num_perm=c.num_perm)
        sh = [shingles(r.prompt_key) for _, r in evals]
        for i, m in enumerate(MinHash.bulk([list(x) for x in sh], num_perm=c.num_perm, seed=1)):
            lsh.insert(str(i), m)
        out = []
        train = splits["train"]
        for r, m in zip(train, MinHash.bulk([list(shingles(r.prompt_key)) for r in train], num_perm=c.num_perm, seed=1)):
            mine = shingles(r.prompt_key)
            for key in lsh.query(m):
                j = int(key)
                sim = len(mine & sh[j]) / len(mine | sh[j])
                if sim >= c.near_dup_threshold:
                    name, other = evals[j]
                    out.append({"train": r.source, "split": name, "other": other.source, "jaccard": round(sim, 3),
                                "prompt": r.prompt_key[:200], "record": r})
                    break
        return out

    def report(self) -> dict:
        return {"steps": {k: {"changed": v.changed, "dropped": v.dropped, "examples": v.examples} for k, v in self.steps.items()},
                "pii_found": dict(self.pii_found), "near_duplicate_clusters": self.clusters}


__all__ = ["Cleaner", "normalize_text", "repetition", "copies_prompt", "PII_TYPES"]
