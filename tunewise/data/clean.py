"""The cleaning pipeline of `tunewise data prepare`: each step configurable, each counting what it did.

Steps, in order: Unicode/whitespace normalisation -> PII redaction -> filters (empty or too short/long
turns, repetitive answers, answers that copy the prompt) -> exact dedup -> near-duplicate removal
(MinHash LSH over the prompt: tunewise/data/dedup.py). The per-record steps live here; the steps that look across
records (dedup, near-dedup, leakage) run on compact per-record arrays in tunewise/data/dedup.py, so that
`data prepare` streams. A record a step drops goes to quarantine with the reason (and, for duplicates, the record
it duplicates); a record a step changes is counted, with examples.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .pii import PII_TYPES, redact
from .records import BadRecord, Record

if TYPE_CHECKING:  # numpy is imported where it is used: cleaning starts without it
    import numpy as np

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
# runs of 2+ spaces, or any other horizontal space: a lone " " (most of them) is not touched, which is 10x faster on prose
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\u00a0\u2000-\u200a\u202f\u205f\u3000]")


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
    """The record with fn applied to every message's text (and a preference pair's rejected answer)."""
    msgs = [{**m, "content": fn(m["content"])} for m in r.messages]
    meta = {**r.meta, "rejected": fn(r.meta["rejected"])} if isinstance(r.meta.get("rejected"), str) else r.meta
    return Record(messages=msgs, source=r.source, label=r.label, meta=meta)


def _first_change(before: Record, after: Record) -> tuple[str, str] | None:
    """The first text _map_contents changed (a message, or a pair's rejected answer), before and after."""
    for m, n in zip(before.messages, after.messages):
        if m["content"] != n["content"]:
            return m["content"], n["content"]
    a, b = before.meta.get("rejected"), after.meta.get("rejected")
    return (a, b) if a != b else None


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
        self.repetition_of: dict[int, float] = {}  # id(record) -> repetition(answer), computed by keep()
        self._redact_fn = redact
        if cfg.pii and cfg.pii_backend == "presidio":
            from .pii import PresidioDetector

            self._redact_fn = PresidioDetector(cfg.presidio_model).redact

    def step(self, name: str) -> StepReport:
        return self.steps.setdefault(name, StepReport())

    def transform(self, records: list[Record]) -> list[Record]:
        """The steps that change records one at a time: normalisation and PII redaction (as configured)."""
        if self.c.normalize:
            records = [self._normalize(r) for r in records]
        if self.c.pii:
            records = [self._redact(r) for r in records]
        return records

    def _normalize(self, r: Record) -> Record:
        out = _map_contents(r, normalize_text)
        changed = _first_change(r, out)
        if changed is not None:
            s = self.step("normalize")
            s.changed += 1
            s.note({"source": r.source, "before": changed[0][:200], "after": changed[1][:200]})
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
            s.note({"source": r.source, "found": dict(found), "after": _first_change(r, out)[1][:200]})
        return out

    def drop(self, step: str, r: Record, reason: str, bad) -> None:
        s = self.step(step)
        s.dropped += 1
        s.note({"source": r.source, "reason": reason})
        bad.append(BadRecord.of(r, reason))

    def keep(self, r: Record, bad) -> bool:
        """The filters; a record that fails one goes to `bad` (anything with append) with the reason."""
        c = self.c
        for m in r.messages:
            n = len(m["content"])
            if m["role"] != "system" and n < c.min_chars:
                self.drop("filter", r, f"{m['role']} turn too short ({n} < {c.min_chars} characters)", bad)
                return False
            if c.max_chars and n > c.max_chars:
                self.drop("filter", r, f"{m['role']} turn too long ({n} > {c.max_chars} characters)", bad)
                return False
        rep = self.repetition_of[id(r)] = repetition(r.answer)  # kept for the quality score (prepare pops it)
        if rep > c.max_repetition:
            self.drop("filter", r, f"repetitive answer ({rep:.0%} of its word 3-grams repeat)", bad)
            return False
        if c.drop_copies and copies_prompt(r):
            self.drop("filter", r, "the answer copies the prompt", bad)
            return False
        return True

    def state(self) -> dict:
        """What it has counted so far (for a checkpoint of `data prepare`)."""
        return {"steps": self.steps, "pii_found": self.pii_found, "clusters": self.clusters, "label_conflicts": self.label_conflicts}

    def restore(self, state: dict) -> None:
        self.steps, self.pii_found = state["steps"], state["pii_found"]
        self.clusters, self.label_conflicts = state["clusters"], state["label_conflicts"]

    def report(self) -> dict:
        return {"steps": {k: {"changed": v.changed, "dropped": v.dropped, "examples": v.examples} for k, v in self.steps.items()},
                "pii_found": dict(self.pii_found), "near_duplicate_clusters": self.clusters, "label_conflicts": self.label_conflicts}


__all__ = ["Cleaner", "normalize_text", "repetition", "copies_prompt", "PII_TYPES"]


def quality_scores(records: list[Record], neighbour_threshold: float = 0.6, nll=None) -> list[dict]:
    """A per-record quality score in [0, 1] from simple signals, each also returned:

    - length: how typical the answer's and prompt's lengths are for this data (a Gaussian on the z-score of
      log word counts: a one-word essay answer or a 2,000-word one scores low);
    - repetition: 1 - the share of repeated word 3-grams in the answer;
    - label: for labelled data, the share of similar prompts (Jaccard of character 5-grams >= neighbour_threshold,
      estimated from MinHash signatures) that carry the same label (1 when there are none): a label its
      look-alikes disagree with is suspect.
    - perplexity (when nll, the answers' mean negative log-likelihood under the base model from
      data/perplexity.py answer_nll, is given): see perplexity_signal.
    The score is the mean of the signals. `data prepare` computes the same from its per-record arrays
    (quality_from_signals) without holding the records.
    """
    import numpy as np

    from .minhash import NearDupIndex, prompt_shingles
    from .split import label_ids

    if not records:
        return []
    flat, off = prompt_shingles(records)
    sigs = NearDupIndex(neighbour_threshold, QUALITY_PERM).signatures(flat, off)
    labels = label_ids([r.label for r in records])[0] if any(r.label is not None for r in records) else None
    return quality_from_signals(np.array([len(r.answer.split()) for r in records]), np.array([len(r.prompt_key.split()) for r in records]),
                                np.array([1.0 - repetition(r.answer) for r in records]), labels, sigs, np.arange(len(records)), neighbour_threshold,
                                nll=nll)


QUALITY_PERM = 128  # MinHash permutations behind the label signal: standard error ~0.04 at Jaccard 0.6


def quality_from_signals(answer_words, prompt_words, rep, labels, sigs, rows, neighbour_threshold: float = 0.6, nll=None) -> list[dict]:
    """quality_scores from per-record arrays: word counts of answer and prompt, 1 - repetition, label ids (None:
    unlabelled data), and MinHash signatures (128 permutations) sigs[rows[i]] of record i's prompt."""
    q = quality_arrays(answer_words, prompt_words, rep, labels, sigs, rows, neighbour_threshold, nll=nll)
    return [score_dict(q, i) for i in range(len(rows))]


def select_best(scores, n: int, labels=None) -> "np.ndarray":
    """Boolean mask of the n records to keep: the best scores (ties: earlier first). With labels (ids, -1 for
    none), each label keeps its best records, as many as its share of n: one each first when n allows, the
    rest in proportion to what each has beyond that, by largest remainder (ties: smaller id)."""
    import numpy as np

    scores = np.asarray(scores)
    keep = np.zeros(len(scores), dtype=bool)
    if labels is None:
        keep[np.lexsort((np.arange(len(scores)), -scores))[:n]] = True
        return keep
    labels = np.asarray(labels)
    ids, counts = np.unique(labels, return_counts=True)
    n = min(n, len(scores))
    base = np.ones(len(ids), dtype=int) if n >= len(ids) else np.zeros(len(ids), dtype=int)
    rest = counts - base
    share = rest * (n - int(base.sum())) / max(int(rest.sum()), 1)
    quota = np.floor(share).astype(int)
    extra = n - int(base.sum()) - int(quota.sum())
    quota[np.lexsort((ids, -(share - quota)))[:extra]] += 1
    quota += base
    for lab, q in zip(ids.tolist(), quota.tolist()):
        rows = np.flatnonzero(labels == lab)
        keep[rows[np.lexsort((rows, -scores[rows]))[:q]]] = True
    return keep


def describe_selection(selected: dict) -> str:
    """The summary's quality.selected in words (the CLI and report.html)."""
    how = (f"each label's share, its best; lowest kept score {selected['cut']:.3f}" if selected.get("by_label")
           else f"score >= {selected['cut']:.3f}")
    return f"kept {selected['kept']} ({how})"


def score_dict(q: dict, i: int) -> dict:
    """Record i's score and signals from quality_arrays, as quality_scores gives them."""
    return {k: float(v[i]) for k, v in q.items()}


def quality_arrays(answer_words, prompt_words, rep, labels, sigs, rows, neighbour_threshold: float = 0.6, work_dir=None, nll=None) -> dict:
    """quality_from_signals as arrays {"score", "length", "repetition"[, "label"][, "perplexity"]} (8 bytes a record each, where a
    list of dicts takes ~400). sigs may be a disk-backed np.memmap; with work_dir the label signal's candidate
    pairs are spilled there (see _label_agreement), so memory stays bounded. nll: the answers' mean negative
    log-likelihood under the base model (data/perplexity.py), which adds the "perplexity" signal."""
    import math

    import numpy as np

    n = len(rows)
    names = ["score", "length", "repetition"] + (["label"] if labels is not None else []) + (["perplexity"] if nll is not None else [])
    out = {k: np.zeros(n) for k in names}
    if not n:
        return out
    la, lp = np.log1p(np.asarray(answer_words)), np.log1p(np.asarray(prompt_words))

    def gauss(x):
        sd = float(x.std()) or 1.0
        return np.exp(-0.5 * ((x - float(np.median(x))) / sd) ** 2)

    length = (gauss(la) + gauss(lp)) / 2
    label = _label_agreement(labels, sigs, rows, neighbour_threshold, work_dir=work_dir) if labels is not None else None
    if nll is not None:
        from .perplexity import perplexity_signal

        ppl = perplexity_signal(nll)
    for i in range(n):  # Python's round, as the scores were always computed: identical values whatever the path
        signals = [round(float(length[i]), 4), round(float(rep[i]), 4)] + ([round(float(label[i]), 4)] if label is not None else [])
        if nll is not None:
            signals.append(round(float(ppl[i]), 4))
        out["score"][i] = round(sum(signals) / len(signals), 4)
        for k, v in zip(names[1:], signals):
            out[k][i] = v
    assert not math.isnan(float(out["score"].sum()))
    return out


def _label_agreement(labels, sigs, rows, threshold: float, window: int = 8, pair_chunk: int = 100_000, work_dir=None,
                     pairs_per_part: int = 1_000_000) -> "np.ndarray":
    """Per record, the share of its look-alikes (estimated Jaccard >= threshold) with the same label; 1 without any.

    Vectorised: in every LSH band the records are sorted by band key and each is paired with the next
    `window` records of the same key (so a huge bucket costs n * window pairs, not n^2); the pairs'
    Jaccard is estimated from the MinHash signatures, which is enough for a soft score. One band's columns
    are read at a time. A pair found in several bands counts once: the pairs are made unique in memory, or,
    with work_dir, in partitions spilled to files there (pair id mod P, ~pairs_per_part pairs each), so memory does not
    grow with the number of pairs (bench/data_prep.py)."""
    import numpy as np

    from .minhash import _bands, band_keys

    rows = np.asarray(rows)
    n = len(rows)
    labels = np.asarray(labels)
    bands, r = _bands(threshold, QUALITY_PERM, recall=0.95)
    parts = 1 if work_dir is None else max(1, n * window * bands // 8 // pairs_per_part)
    files = [open(f"{work_dir}/pairs-{k}.i64", "wb") for k in range(parts)] if work_dir is not None else None
    found = []
    for b in range(bands):
        key = band_keys(np.asarray(sigs[:, b * r : (b + 1) * r])[rows], 1, r)[:, 0]
        order = np.argsort(key, kind="stable")
        ks = key[order]
        for d in range(1, min(window, n - 1) + 1):
            same = ks[d:] == ks[:-d]
            i, j = order[:-d][same], order[d:][same]
            pair = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)
            if files is None:
                found.append(pair)
            else:
                part = pair % parts
                for k in range(parts):
                    pair[part == k].tofile(files[k])
    agree = np.zeros(n)
    count = np.zeros(n)

    def tally(pair):
        nonlocal agree, count
        for s in range(0, len(pair), pair_chunk):  # bounded memory: [chunk, 128] comparisons at a time
            p = pair[s : s + pair_chunk]
            i, j = p // n, p % n
            near = (np.asarray(sigs[rows[i]]) == np.asarray(sigs[rows[j]])).mean(axis=1) >= threshold
            i, j = i[near], j[near]
            same = (labels[i] == labels[j]).astype(float)
            count += np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
            agree += np.bincount(i, weights=same, minlength=n) + np.bincount(j, weights=same, minlength=n)

    if files is None:
        if found:
            tally(np.unique(np.concatenate(found)))
    else:
        for f in files:
            f.close()
            tally(np.unique(np.fromfile(f.name, dtype=np.int64)))
            Path(f.name).unlink()
    return np.where(count > 0, agree / np.maximum(count, 1), 1.0)
