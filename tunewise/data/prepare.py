"""`tunewise data prepare`: read -> validate -> clean -> quarantine -> split -> leakage check -> score -> write.

It streams: records are read, normalised, redacted and filtered `chunk_size` at a time and spooled to disk;
what the steps across records need (hashes, ranks, label ids, LSH band keys; MinHash signatures in a
disk-backed array) is kept as compact arrays, and the splits are written by reading the spool back. So the
memory it needs grows by a few hundred bytes per record, not with the text (bench/data_prep.py). Reading and
cleaning are checkpointed a chunk at a time, so an interrupted run goes on with resume=True (_Checkpoint).
Every input record is accounted for: it lands in a split or in quarantine.jsonl with its reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ProjectConfig, detect_format
from ..errors import TunewiseError
from ..util import atomic_write_json, sha256_file
from .formats import read_records
from .records import BadRecord, Record
from .prepared import SPLITS, Prepared, inputs_of, load_prepared, prepare_lock, prepared_is_current
from .split import leaking_groups, rank64, split_positions

FILES = ("train", "validation", "test")  # file ids in the per-record arrays
READ_BACK = 2048  # records read back from the spool at a time (near-dedup, perplexity, writing the splits)


class Quarantine:
    """quarantine.jsonl written as records are set aside (moved into place at the end); keeps counts by kind
    of reason and the first 100 for the report. tmp: where it is written meanwhile (in the checkpoint's work
    directory); state: a checkpoint's `state()` to go on from."""

    def __init__(self, path: Path, tmp: Path, state: dict | None = None):
        self.path = path
        self._tmp = tmp
        self.count = 0
        self.head: list[BadRecord] = []
        self.reasons: Counter = Counter()  # reasons grouped by their shape (numbers elided)
        if state is None:
            self._f = open(tmp, "w", encoding="utf-8")
        else:
            with open(tmp, "r+b") as f:
                f.truncate(state["size"])
            self._f = open(tmp, "a", encoding="utf-8")
            self.count, self.head, self.reasons = state["count"], state["head"], Counter(state["reasons"])

    def append(self, b: BadRecord) -> None:
        self._f.write(json.dumps(b.to_json(), ensure_ascii=False) + "\n")
        self.count += 1
        if len(self.head) < 100:
            self.head.append(b)
        self.reasons[re.sub(r"\d+", "N", b.reason)] += 1

    def state(self) -> dict:
        self._f.flush()
        return {"size": os.path.getsize(self._tmp), "count": self.count, "head": list(self.head), "reasons": dict(self.reasons)}

    def close(self) -> None:
        """Finished: move it into place."""
        self._f.close()
        os.replace(self._tmp, self.path)

    def suspend(self) -> None:
        """Interrupted: close it where it is, for the checkpoint."""
        self._f.close()


class _Columns:
    """The compact per-record state, appended a chunk at a time: file id, conversation digest, seeded prompt
    rank (the group), seeded record rank, label id, answer/prompt word counts, 1 - repetition, LSH band keys;
    MinHash signatures (128 permutations, for the quality score) go to a file."""

    def __init__(self, cfg, seed: int, sig_path: Path, keep: bool = False):
        """keep: the signature file is a checkpoint's (restore() follows), not to be emptied."""
        from .minhash import NearDupIndex

        c = cfg.data.clean
        self.seed = seed
        self.index = NearDupIndex(c.near_dup_threshold, c.num_perm)
        from .clean import QUALITY_PERM

        self.quality_index = self.index if c.num_perm == QUALITY_PERM else NearDupIndex(0.6, QUALITY_PERM)
        self.cols: dict[str, list[np.ndarray]] = {k: [] for k in ("file", "digest", "group", "rank", "label", "aw", "pw", "rep", "keys")}
        self.names: dict[str, int] = {}
        self.sig_path = sig_path
        self._sig_f = open(sig_path, "r+b" if keep else "wb")
        self.n = 0

    def restore(self, chunks: list[dict[str, np.ndarray]], names: dict[str, int], n: int) -> None:
        """Go on from a checkpoint: its chunks' arrays, label names and record count (the signature file is cut back)."""
        from .clean import QUALITY_PERM

        for arrays in chunks:
            for k in self.cols:
                self.cols[k].append(arrays[f"col_{k}"])
        self.names, self.n = dict(names), n
        self._sig_f.truncate(n * QUALITY_PERM * 4)
        self._sig_f.seek(0, os.SEEK_END)

    def last(self) -> dict[str, np.ndarray]:
        self._sig_f.flush()
        return {k: v[-1] for k, v in self.cols.items()}

    def add(self, fid: int, records: list[Record], known: dict[int, float] | None = None) -> None:
        """known: repetition of the answer by id(record), where the filters computed it already."""
        known = {} if known is None else known
        import hashlib

        from .clean import repetition
        from .minhash import prompt_shingles

        if not records:
            return
        col = self.cols
        u64 = lambda xs: np.array(xs, dtype=np.uint64)  # noqa: E731
        col["file"].append(np.full(len(records), fid, dtype=np.int8))
        col["digest"].append(u64([int.from_bytes(hashlib.sha256(repr([(m["role"], m["content"]) for m in r.messages]).encode()).digest()[:8], "big")
                                  for r in records]))
        col["group"].append(u64([rank64(self.seed, r.prompt_key) for r in records]))
        col["rank"].append(u64([rank64(self.seed, r.prompt_key + "\x00" + r.source) for r in records]))
        col["label"].append(np.array([-1 if r.label is None else self.names.setdefault(r.label, len(self.names)) for r in records], dtype=np.int32))
        col["aw"].append(np.array([len(r.answer.split()) for r in records], dtype=np.int32))
        col["pw"].append(np.array([len(r.prompt_key.split()) for r in records], dtype=np.int32))
        col["rep"].append(np.array([1.0 - (known.pop(id(r)) if id(r) in known else repetition(r.answer)) for r in records]))
        flat, off = prompt_shingles(records)
        sigs = self.index.signatures(flat, off)
        col["keys"].append(self.index.band_keys(sigs))
        qsigs = sigs if self.quality_index is self.index else self.quality_index.signatures(flat, off)
        qsigs.astype(np.uint32).tofile(self._sig_f)
        self.n += len(records)

    def finish(self) -> dict[str, np.ndarray]:
        from .clean import QUALITY_PERM

        self._sig_f.close()
        out = {k: (np.concatenate(v) if v else np.zeros((0, self.index.b_count) if k == "keys" else 0)) for k, v in self.cols.items()}
        self.cols.clear()
        out["sigs"] = (np.memmap(self.sig_path, dtype=np.uint32, mode="r", shape=(self.n, QUALITY_PERM)) if self.n
                       else np.zeros((0, QUALITY_PERM), dtype=np.uint32))
        return out


def _chunks(items, size: int, limit: int | None, bad: Quarantine, max_chars: int = 8_000_000, already: int = 0):
    """Valid records in lists of at most `size` records and ~max_chars characters of text (so long conversations
    make smaller chunks), each with how many items (valid or bad) were taken from `items` so far; bad ones go to
    quarantine as they come; stop after `limit` valid ones (`already` of them read before a resume)."""
    chunk, n, chars, taken = [], already, 0, 0
    if limit and n >= limit:
        return
    for item in items:
        taken += 1
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        chunk.append(item)
        n += 1
        chars += sum(len(m["content"]) for m in item.messages)
        if len(chunk) >= size or chars >= max_chars or (limit and n >= limit):
            yield chunk, taken
            chunk, chars = [], 0
            if limit and n >= limit:
                return
    yield chunk, taken


PASS2_ONLY = ("select", "select_by_label", "drop_leaks", "perplexity")  # data.clean fields a resumed pass 1 does not depend on


class _Checkpoint:
    """Pass 1 (read, clean, spool) saved after every chunk in out_dir/.work, so an interrupted prepare goes on
    from the last chunk with --resume: the spool, the signature file and the quarantine are cut back to their
    checkpointed sizes, each chunk's column arrays are in chunk-N.npz, the rest (positions in the inputs,
    counts, the cleaner's tallies) in state.pkl, replaced atomically. The steps after pass 1 take seconds and
    run again; the slow optional one (perplexity) keeps its own cache."""

    def __init__(self, work: Path, fingerprint: str):
        self.work, self.fingerprint = work, fingerprint

    @staticmethod
    def read(work: Path) -> dict | None:
        """The saved state, whatever its fingerprint (None: none, or unreadable)."""
        import pickle

        try:
            return pickle.loads((Path(work) / "state.pkl").read_bytes())
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    def load(self) -> dict | None:
        """The state if it is this run's (same fingerprint) and its files are all there, at least as long as it
        recorded; otherwise None, and prepare starts over."""
        state = self.read(self.work)
        if state is None or state.get("fingerprint") != self.fingerprint:
            return None
        if "spool_end" in state:
            from .clean import QUALITY_PERM

            need = {"records.jsonl": state["spool_end"], "signatures.u32": state["n"] * QUALITY_PERM * 4,
                    "quarantine.jsonl": state["quarantine"]["size"], **{n: 1 for n in state["chunks"]}}
            if any(not (self.work / f).exists() or (self.work / f).stat().st_size < size for f, size in need.items()):
                return None
        return state

    def save(self, state: dict, arrays: dict[str, np.ndarray] | None) -> None:
        import pickle

        if arrays is not None:
            name = f"chunk-{len(state['chunks']):06d}.npz"
            tmp = self.work / f".{name}"
            with open(tmp, "wb") as f:
                np.savez(f, **{f"col_{k}": v for k, v in arrays.items()})  # ("file" would clash with savez's argument)
            os.replace(tmp, self.work / name)
            state["chunks"].append(name)
        tmp = self.work / ".state.pkl"
        tmp.write_bytes(pickle.dumps({**state, "fingerprint": self.fingerprint}))
        os.replace(tmp, self.work / "state.pkl")


def _fingerprint(cfg: ProjectConfig, inputs: dict, chunk_size: int) -> str:
    import hashlib

    data = cfg.resolved()["data"]
    data = {**data, "clean": {k: v for k, v in data["clean"].items() if k not in PASS2_ONLY}}
    return hashlib.sha256(json.dumps({"data": data, "inputs": inputs, "chunk_size": chunk_size, "v": 1}, sort_keys=True, default=str).encode()).hexdigest()


def checkpointed_records(out_dir: Path) -> int | None:
    """Records read by an interrupted prepare whose checkpoint is in out_dir (None: there is none)."""
    state = _Checkpoint.read(Path(out_dir) / ".work")
    return None if state is None else int(state["done"])


class PrepareError(TunewiseError):
    """A prepare that kept nothing, or set nearly every record aside for one reason: the config does not fit the
    data (the wrong data.format or columns). Raised after quarantine.jsonl and the summary are written."""


@dataclass
class _Run:
    """What the stages of one prepare share: the config, where it writes, the checkpoint and its state, the
    quarantine, the spool of cleaned records, the per-record arrays, and what each stage found."""

    cfg: ProjectConfig
    out_dir: Path
    chunk_size: int
    say: Callable[[str, int], None]
    inputs: dict[str, dict]
    work: Path
    ckpt: _Checkpoint
    state: dict
    cleaner: object
    bad: Quarantine
    spool: object
    timings: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    table: _Columns | None = None
    col: dict | None = None  # the arrays, once pass 1 is done
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # positions into the arrays
    found: dict = field(default_factory=dict)  # the summary's parts, by stage

    @property
    def fixed(self) -> list[str]:
        """Evaluation splits given as their own files (never thinned, never re-split)."""
        return [n for n in self.inputs if n in ("validation", "test")]

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.clock
        self.clock = now

    def close(self, finished: bool) -> None:
        self.spool.close()
        self.col = None
        if finished:
            self.bad.close()
            shutil.rmtree(self.work, ignore_errors=True)
        else:  # the checkpoint stays for --resume
            self.bad.suspend()


def prepare_data(cfg: ProjectConfig, out_dir: Path | None = None, tokenizer=None, chunk_size: int = 20_000,
                 progress: Callable[[str, int], None] | None = None, resume: bool = False) -> Prepared:
    """Prepare the project's data into out_dir (default runs/<project>/data). progress(stage, records done) is
    called as work goes on. Reading and cleaning is checkpointed after every chunk in out_dir/.work; if it is
    interrupted, resume=True goes on from there (with the same inputs, data config and chunk_size; otherwise
    it starts over), giving the same outputs as an uninterrupted run. Raises PrepareError (after writing
    everything) when the data does not fit the config: nothing kept, or nearly all set aside for one reason."""
    if tokenizer is not None and cfg.data.format != "text":  # before any work: a model that would not learn to stop
        from ..models import stop_token_ids
        from .tokenize import check_end_of_turn

        check_end_of_turn(tokenizer, stop_token_ids(cfg.model.name, tokenizer))
    run = _start(cfg, Path(out_dir or cfg.run_dir / "data"), chunk_size, progress or (lambda stage, n: None), resume)
    finished = False
    try:
        _read_and_clean(run)
        train = _deduplicate(run)
        _split(run, train)
        _check_leaks(run)
        _score_and_select(run)
        _write_splits(run, tokenizer)
        finished = True
    finally:
        run.close(finished)
    summary = _summary(run)
    _check_kept(run, summary)
    return Prepared(run.out_dir, summary, timings=run.timings)


def _start(cfg: ProjectConfig, out_dir: Path, chunk_size: int, say, resume: bool) -> _Run:
    """The inputs (paths, hashes) and the checkpoint to go on from (resume) or a fresh work directory."""
    from .clean import Cleaner
    from .dedup import Spool

    out_dir.mkdir(parents=True, exist_ok=True)
    cleaner = Cleaner(cfg.data.clean)
    inputs = inputs_of(cfg)  # train, validation, test and data.include (read right after data.train)
    work = out_dir / ".work"
    ckpt = _Checkpoint(work, _fingerprint(cfg, inputs, chunk_size))
    state = ckpt.load() if resume else None
    timings: dict[str, float] = {}
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        state = {"chunks": [], "position": {}, "files_done": [], "read_counts": {}, "done": 0, "timings": {}}
    else:
        for stale in work.glob("*"):  # what a step after pass 1 or an unfinished chunk left behind
            if stale.name not in {*state["chunks"], "state.pkl", "records.jsonl", "signatures.u32", "quarantine.jsonl"}:
                stale.unlink()
        cleaner.restore(state["cleaner"])
        timings.update(state["timings"])
        say("resuming", state["done"])
    resumed = "spool_end" in state
    chunks = [np.load(work / n) for n in state["chunks"]]
    bad = Quarantine(out_dir / "quarantine.jsonl", work / "quarantine.jsonl", state.get("quarantine") if resumed else None)
    spool = Spool(work / "records.jsonl",
                  (np.concatenate([a["col_offsets"] for a in chunks]) if chunks else np.zeros(0, np.int64), state["spool_end"]) if resumed else None)
    run = _Run(cfg, out_dir, chunk_size, say, inputs, work, ckpt, state, cleaner, bad, spool, timings=timings)
    try:
        run.table = _Columns(cfg, cfg.data.split.seed, work / "signatures.u32", keep=resumed)
        if resumed:
            run.table.restore(chunks, state["names"], state["n"])
    except BaseException:
        run.close(False)
        raise
    return run


def _read_and_clean(run: _Run) -> None:
    """Pass 1: read, validate, normalise, redact, filter (the training file only: evaluation files are never
    thinned), spool; checkpointed after every chunk."""
    cfg, state, table, spool, bad, cleaner = run.cfg, run.state, run.table, run.spool, run.bad, run.cleaner
    read_counts = state["read_counts"]

    def checkpoint(arrays) -> None:
        state.update(spool_end=spool.end, names=table.names, n=table.n, quarantine=bad.state(),
                     cleaner=cleaner.state(), timings=dict(run.timings))
        run.ckpt.save(state, arrays)

    sources = [(0, "train", cfg.data.format, cfg.data.columns)]
    sources += [(0, f"include-{i}", inc.format, inc.columns) for i, inc in enumerate(cfg.data.include)]  # training records too
    sources += [(FILES.index(n), n, cfg.data.format, cfg.data.columns) for n in FILES[1:]]
    for fid, name, fmt, columns in sources:
        if name not in run.inputs or name in state["files_done"]:
            continue
        read_counts.setdefault(name, 0)
        skip = state["position"].get(name, 0)
        items = itertools.islice(read_records(Path(run.inputs[name]["path"]), fmt, columns, cfg.data.system_prompt, cfg.data.reasoning), skip, None)
        for chunk, taken in _chunks(items, run.chunk_size, cfg.data.limit if name == "train" else None, bad, already=read_counts[name]):
            read_counts[name] += len(chunk)
            state["done"] += len(chunk)
            run.lap("read and validate")
            chunk = cleaner.transform(chunk)
            run.lap("normalise and redact")
            if fid == 0:  # training records (data.train and data.include)
                chunk = [r for r in chunk if cleaner.keep(r, bad)]
                run.lap("filters")
            table.add(fid, chunk, cleaner.repetition_of)
            cleaner.repetition_of.clear()
            offsets_from = len(spool)
            spool.add(chunk)
            run.lap("hashes and spool")
            state["position"][name] = skip + taken
            checkpoint({**table.last(), "offsets": np.frombuffer(spool.offsets[offsets_from:], dtype=np.int64)} if chunk else None)
            run.lap("checkpoint")
            run.say("reading and cleaning", state["done"])
        state["files_done"].append(name)
        checkpoint(None)
    run.col = table.finish()


def _deduplicate(run: _Run) -> np.ndarray:
    """Exact and near duplicates in the training file go to quarantine (the first one is kept); returns the
    positions of the training records left."""
    from .dedup import near_dedup

    c, col, spool, bad, cleaner = run.cfg.data.clean, run.col, run.spool, run.bad, run.cleaner
    run.say("deduplicating", run.state["done"])
    train = np.flatnonzero(col["file"] == 0)
    if c.dedup and len(train):
        _, first, inv = np.unique(col["digest"][train], return_index=True, return_inverse=True)
        dup = np.ones(len(train), dtype=bool)
        dup[first] = False
        for t in np.flatnonzero(dup):
            cleaner.drop("dedup", spool.get(train[t]), f"exact duplicate of {spool.get(train[first[inv[t]]]).source}", bad)
        train = train[~dup]
    run.lap("exact dedup")
    if c.near_dedup:
        def on_drop(r: Record, match: Record, sim: float) -> None:
            conflict = r.label != match.label
            cleaner.label_conflicts += conflict
            cleaner.drop("near_dedup", r, f"near-duplicate of {match.source}" + (f" (label {r.label!r} vs {match.label!r})" if conflict else ""), bad)
            if len(cleaner.clusters) < 50:
                cleaner.clusters.append({"kept": match.source, "dropped": r.source, "jaccard": round(sim, 3), "label_conflict": conflict,
                                         "kept_text": match.prompt_key[:120], "dropped_text": r.prompt_key[:120]})

        dropped = near_dedup(train, col["keys"], spool, c.near_dup_threshold, on_drop, min(run.chunk_size, READ_BACK), col["sigs"])
        train = train[~np.isin(train, dropped)]
    run.lap("near dedup")
    run.found["kept"] = len(train) + sum(int((col["file"] == FILES.index(n)).sum()) for n in run.fixed)
    return train


def _split(run: _Run, train: np.ndarray) -> None:
    """Split the training records by prompt group (validation/test only where no file gives them)."""
    col, s, fixed = run.col, run.cfg.data.split, run.fixed
    run.say("splitting and checking leakage", run.state["done"])
    sp = split_positions(col["group"][train], col["label"][train], list(run.table.names), col["rank"][train],
                         validation=0.0 if "validation" in fixed else s.validation, test=0.0 if "test" in fixed else s.test,
                         stratify=s.stratify)
    run.splits = {name: train[sp[name]] for name in SPLITS}
    for name in fixed:
        run.splits[name] = np.flatnonzero(col["file"] == FILES.index(name))


def _exact_leaks(run: _Run) -> tuple[list[int], list[dict]]:
    """Prompt groups in more than one split, with up to 20 examples (prompt, sources by split)."""
    col, splits = run.col, run.splits
    groups = leaking_groups({n: col["group"][splits[n]] for n in SPLITS})
    examples = []
    for g in groups[:20]:
        where: dict[str, list[str]] = {}
        prompt = None
        for n in SPLITS:
            for i in splits[n][col["group"][splits[n]] == np.uint64(g)]:
                r = run.spool.get(i)
                prompt = prompt if prompt is not None else r.prompt_key[:200]
                where.setdefault(n, []).append(r.source)
        examples.append({"prompt": prompt, "splits": dict(sorted(where.items()))})
    return groups, examples


def _check_leaks(run: _Run) -> None:
    """Training prompts equal to (same group) or nearly equal to (MinHash) a validation/test prompt: reported,
    and with data.clean.drop_leaks set aside."""
    from .dedup import near_leaks

    c, col, splits, spool = run.cfg.data.clean, run.col, run.splits, run.spool
    groups, leak_examples = _exact_leaks(run)
    exact_train = splits["train"][np.isin(col["group"][splits["train"]], np.array(groups, dtype=np.uint64))]
    evals = np.concatenate([splits["validation"], splits["test"]])
    near = near_leaks(splits["train"], evals, col["keys"], spool, c.near_dup_threshold, col["sigs"]) if c.near_dedup else []
    exact_set = set(exact_train.tolist())
    near = [(int(splits["train"][t]), e, sim) for t, e, sim in near if int(splits["train"][t]) not in exact_set]

    def near_info(i: int, e: int, sim: float) -> dict:
        r = spool.get(i)
        return {"train": r.source, "split": "validation" if e < len(splits["validation"]) else "test",
                "other": spool.get(evals[e]).source, "jaccard": round(sim, 3), "prompt": r.prompt_key[:200]}

    near_examples = [near_info(*x) for x in near[:20]]
    dropped = 0
    if c.drop_leaks:
        why = {i: near_info(i, e, sim) for i, e, sim in near}
        leaking = exact_set | set(why)
        keep = np.ones(len(splits["train"]), dtype=bool)
        for t, i in enumerate(splits["train"].tolist()):
            if i in leaking:
                w = why.get(i)
                reason = f"leaks into {w['split']}: near-duplicate (Jaccard {w['jaccard']}) of {w['other']}" if w else "leaks into an evaluation split: same prompt"
                run.bad.append(BadRecord.of(spool.get(i), reason))
                keep[t] = False
                dropped += 1
        splits["train"] = splits["train"][keep]
        groups, leak_examples = _exact_leaks(run)
        near, near_examples = [], []
    run.found["leaks"] = {"count": len(groups), "examples": leak_examples, "near_duplicates": len(near),
                          "near_examples": near_examples, "dropped": dropped}
    run.lap("split and leakage")


def _score_and_select(run: _Run) -> None:
    """The quality score of the training records (and perplexity under the base model, if asked), and
    data.clean.select: the best N kept, the rest set aside with their score and the cut."""
    from .clean import describe_selection, quality_arrays, score_dict, select_best

    cfg, c, col, spool, say = run.cfg, run.cfg.data.clean, run.col, run.spool, run.say
    say("scoring", run.state["done"])
    tr = run.splits["train"]
    labelled = bool(len(tr)) and bool((col["label"][tr] >= 0).any())
    nll = None
    if c.perplexity and len(tr):
        from .perplexity import answer_nll, cache_path

        run.lap("quality score")
        nll = answer_nll(cfg.model.name, (spool.records(tr[a : a + READ_BACK]) for a in range(0, len(tr), READ_BACK)), cfg.data.max_length,
                         dtype=cfg.model.dtype, progress=lambda n: say("perplexity under the base model", n),
                         cache=cache_path(run.out_dir / ".perplexity-cache", cfg.model.name, cfg.data.max_length, cfg.model.dtype))
        run.lap("perplexity")
    q = quality_arrays(col["aw"][tr], col["pw"][tr], col["rep"][tr], col["label"][tr] if labelled else None, col["sigs"], tr,
                       work_dir=str(run.work), nll=nll)
    selected = None
    if c.select and c.select < len(tr):
        by_label = c.select_by_label and labelled
        lab = col["label"][tr]
        chosen = select_best(q["score"], c.select, lab if by_label else None)  # ties in split order
        cut = float(q["score"][chosen].min())
        cuts = {int(x): float(q["score"][chosen & (lab == x)].min()) for x in np.unique(lab[chosen])} if by_label else {}
        for t in np.flatnonzero(~chosen):
            where = f"its label's cut {cuts[int(lab[t])]:.3f}" if int(lab[t]) in cuts else ("its label got no place" if by_label else f"the cut {cut:.3f}")
            run.bad.append(BadRecord.of(spool.get(tr[t]), f"not selected: quality score {q['score'][t]:.3f} below {where} ({score_dict(q, t)})"))
        run.splits["train"] = tr[chosen]
        q = {k: v[chosen] for k, v in q.items()}
        selected = {"kept": int(chosen.sum()), "cut": cut, "by_label": by_label}
        selected["text"] = describe_selection(selected)
    scores = q["score"]
    lowest = np.argsort(scores, kind="stable")[:10]
    run.found["quality"] = {"selected": selected, "histogram": np.histogram(scores, bins=10, range=(0, 1))[0].tolist() if len(scores) else [],
                            "mean": float(scores.mean()) if len(scores) else None,
                            "lowest": [{"source": spool.get(run.splits["train"][i]).source, **score_dict(q, i)} for i in lowest]}
    run.lap("quality score")


def _write_splits(run: _Run, tokenizer) -> None:
    """Pass 2: write the splits from the spool (atomically), counting tokens after the chat template."""
    from .text import text_blocks
    from .tokenize import TokenStats, tokenize_records

    outputs, token_stats, written = {}, {}, 0
    for name in SPLITS:
        rows = run.splits[name]
        stats = TokenStats() if tokenizer is not None and len(rows) else None
        path = run.out_dir / f"{name}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=run.out_dir, prefix=f".{name}.jsonl.")
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(rows), READ_BACK):
                lines = [run.spool.line(i) for i in rows[start : start + READ_BACK]]
                f.writelines(lines)
                if stats is not None:
                    recs = [Record.from_json(json.loads(x)) for x in lines]
                    if run.cfg.data.format == "text":  # blocks of max_length (counted per chunk of documents)
                        text_blocks(tokenizer, recs, run.cfg.data.max_length, stats)
                    else:
                        tokenize_records(tokenizer, recs, run.cfg.data.max_length, stats)
                written += len(lines)
                run.say("writing", written)
        os.replace(tmp, path)
        outputs[name] = {"records": int(len(rows)), "sha256": sha256_file(path)}
        if stats is not None:
            token_stats[name] = stats.summary()
    names = list(run.table.names)
    run.found.update(outputs=outputs, tokens=token_stats,
                     label_counts={n: Counter(names[x] for x in run.col["label"][run.splits[n]].tolist() if x >= 0) for n in SPLITS})
    run.lap("write")


def _summary(run: _Run) -> dict:
    """summary.json and the HTML data report."""
    f, bad = run.found, run.bad
    summary = {
        "inputs": run.inputs,
        "outputs": f["outputs"],
        "read": {"valid": sum(run.state["read_counts"].values()), "kept": f["kept"], "quarantined": bad.count},
        "cleaning": run.cleaner.report(),
        "quality": f["quality"],
        "quarantine_reasons": dict(bad.reasons.most_common()),
        "quarantine_examples": [str(b) for b in bad.head[:20]],
        "labels": {name: len(f["label_counts"][name]) for name in SPLITS},
        "split_shift": split_shift(f["label_counts"].get("validation", {}), f["label_counts"].get("test", {})),
        "leaks": f["leaks"],
        "config": run.cfg.resolved()["data"],
    }
    if f["tokens"]:
        summary["tokens"] = f["tokens"]
    from ..report.data_html import data_report

    summary["report"] = str(data_report(run.out_dir, summary, f["label_counts"], bad.head))
    atomic_write_json(run.out_dir / "summary.json", summary)
    return summary


SHIFT_P = 0.01  # a chi-square p-value below this, with a total variation of SHIFT_TV or more, is worth a warning
SHIFT_TV = 0.05


def split_shift(validation: dict, test: dict, top: int = 5) -> dict | None:
    """How the label distribution of the validation split differs from the test split's (a test file the user gave is
    often drawn differently from the training file validation is carved from): the total variation distance, a
    chi-square test of homogeneity, the labels that differ most, and test labels validation never shows. None when
    either split has no labels."""
    if not validation or not test:
        return None
    from scipy.stats import chi2_contingency

    labels = sorted(set(validation) | set(test))
    nv, nt = sum(validation.values()), sum(test.values())
    share = {lab: (validation.get(lab, 0) / nv, test.get(lab, 0) / nt) for lab in labels}
    tv = 0.5 * sum(abs(v - t) for v, t in share.values())
    p = float(chi2_contingency([[validation.get(lab, 0) for lab in labels], [test.get(lab, 0) for lab in labels]])[1]) if len(labels) > 1 else 1.0
    most = sorted(labels, key=lambda lab: -abs(share[lab][0] - share[lab][1]))[:top]
    missing = [lab for lab in labels if not validation.get(lab) and test.get(lab)]
    return {"between": ["validation", "test"], "total_variation": round(tv, 4), "p_value": p,
            "labels": [{"label": lab, "validation": round(share[lab][0], 4), "test": round(share[lab][1], 4),
                        "diff": round(share[lab][1] - share[lab][0], 4)} for lab in most],
            "missing_in_validation": missing, "warning": bool(missing and sum(share[m][1] for m in missing) >= 0.01) or (p < SHIFT_P and tv >= SHIFT_TV)}


NEARLY_ALL = 0.9  # one reason setting aside this share of the records read means the config does not fit the data


def _check_kept(run: _Run, summary: dict) -> None:
    """PrepareError with a hint when nothing was kept, or nearly everything was set aside for one reason (reader
    errors of one kind count as one reason: "malformed JSON" has several messages)."""
    kept, reasons = summary["read"]["kept"], summary["quarantine_reasons"]
    seen = summary["read"]["valid"] + sum(n for r, n in reasons.items() if _is_read_error(r))
    if not reasons:
        if kept == 0:
            raise PrepareError(f"{run.inputs['train']['path']}: no records in the file")
        return
    families: Counter = Counter()
    for r, n in reasons.items():
        families[next((e for e in READ_ERRORS if r.startswith(e)), r)] += n
    reason, n = families.most_common(1)[0]
    if kept and n < NEARLY_ALL * max(seen, 1):
        return
    path = Path(run.inputs["train"]["path"])
    example = next((e for e in summary["quarantine_examples"] if reason in e), "")
    what = "no record was kept" if not kept else f"{n:,} of {seen:,} records were set aside"
    raise PrepareError(f"{path}: {what}; {n:,} for one reason: {reason.rstrip(chr(39) + ' ')}" + (f" (e.g. {example[:200]})" if example else "")
                       + f". {_hint(run.cfg, path, reason)} The records set aside are in {run.out_dir / 'quarantine.jsonl'}.")


READ_ERRORS = ("malformed JSON", "expected a JSON object", "not valid UTF-8", "missing field", "column '", "instruction/input",
               "conversations", "fewer cells", "N cells")


def _is_read_error(reason: str) -> bool:
    """A reason the reader gave (the record never became a valid one, so `read.valid` does not count it)."""
    return reason.startswith(READ_ERRORS)


def _hint(cfg: ProjectConfig, path: Path, reason: str) -> str:
    """What to change in the config, told from the file itself."""
    looks, columns, _ = detect_format(path)
    if looks is None:
        first = _first_line(path)
        looks = "openai" if first.startswith("{") else "csv" if "," in first or "\t" in first else None
    fmt = cfg.data.format
    if reason.startswith(("malformed JSON", "expected a JSON object", "missing field", "instruction/input", "conversations")) or \
            (reason.startswith(("fewer cells", "N cells", "column '")) and looks not in (None, "csv")):
        if looks and looks != fmt:
            return f"Is data.format right? It is {fmt}, but the file looks like {looks.upper() if looks == 'csv' else looks} (data.format: {looks})."
        return f"Is data.format ({fmt}) right for this file? `tunewise init --data {path.name}` tells the format from the file."
    if reason.startswith("column '") and columns:
        c = cfg.data.columns
        return (f"Is data.columns right? It reads user: {c.user}, assistant: {c.assistant}; the file's columns are "
                f"{', '.join(columns)}.")
    return "See the data report for the reasons."


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return next((line.strip() for line in f if line.strip()), "")
    except OSError:
        return ""


def ensure_prepared(cfg: ProjectConfig, tokenizer=None) -> Prepared:
    """The project's prepared data, preparing it first when missing or stale. Several processes may ask at once
    (`tunewise tune --workers N` on a fresh project): one prepares, under a lock beside the data folder, and the others
    wait and then read what it wrote."""
    data_dir = cfg.run_dir / "data"
    existing = load_prepared(data_dir)
    if existing is not None and prepared_is_current(cfg, existing):
        return existing
    with prepare_lock(data_dir):
        existing = load_prepared(data_dir)
        if existing is not None and prepared_is_current(cfg, existing):
            return existing
        return prepare_data(cfg, data_dir, tokenizer, resume=True)  # a checkpoint of other inputs or config is not used
