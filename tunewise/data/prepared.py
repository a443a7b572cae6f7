"""Prepared data on disk (runs/<project>/data: the split files, quarantine.jsonl, summary.json), and
`ensure_prepared`: what training, evaluation, RAFT and the workflow call to get it, preparing only when the
inputs or the data config changed. Preparing itself, and ensure_prepared (prepare when missing or stale), is data/prepare.py."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..config import ProjectConfig
from ..errors import TunewiseError
from ..util import read_jsonl, sha256_file
from .records import Record

SPLITS = ("train", "validation", "test")


class Prepared:
    """Prepared data on disk; `splits` (lists of records) is read from the split files when first used."""

    def __init__(self, dir: Path, summary: dict, splits: dict[str, list[Record]] | None = None, timings: dict | None = None):
        self.dir, self.summary, self._splits, self.timings = Path(dir), summary, splits, timings or {}

    @property
    def splits(self) -> dict[str, list[Record]]:
        if self._splits is None:
            self._splits = {name: [Record.from_json(r) for r in read_jsonl(self.dir / f"{name}.jsonl")] for name in SPLITS}
        return self._splits


class NoLabels(TunewiseError, ValueError):
    """A closed label set was asked for (constrain: labels) and the data has none."""


def label_set(cfg: ProjectConfig, prepared: Prepared, mode: str | None = None) -> list[str] | None:
    """The closed answer set decoding is constrained to (mode: evaluation.constrain unless given), or None for
    free decoding. The training split's labels, or every split's when it has none."""
    mode = mode or cfg.evaluation.constrain
    if mode == "none":
        return None
    labels = sorted({r.label for r in prepared.splits.get("train", []) if r.label}) or \
        sorted({r.label for split in prepared.splits.values() for r in split if r.label})
    if not labels:
        if mode == "labels":
            raise NoLabels("the data has no labels")
        return None
    if mode == "auto" and cfg.use_case.task != "classification":
        return None
    return labels


def inputs_of(cfg: ProjectConfig) -> dict[str, dict]:
    """The files preparation reads, with their hashes: train, validation, test, then data.include (include-N)."""
    inputs: dict[str, dict] = {}
    for name in SPLITS:
        path = cfg.path(getattr(cfg.data, name))
        if path is not None:
            inputs[name] = {"path": str(path), "sha256": sha256_file(path)}
    for i, inc in enumerate(cfg.data.include):
        inputs[f"include-{i}"] = {"path": str(cfg.path(inc.path)), "sha256": sha256_file(cfg.path(inc.path)), "format": inc.format}
    return inputs


def data_key(inputs: dict[str, dict], data_config: dict) -> str:
    """What a model was trained on, as one hash: its input files' contents and the data config (paths aside)."""
    import hashlib

    conf = {k: v for k, v in data_config.items() if k not in ("train", "validation", "test", "include")}
    return hashlib.sha256(json.dumps({"inputs": {n: v["sha256"] for n, v in inputs.items()}, "data": conf}, sort_keys=True).encode()).hexdigest()


def load_prepared(data_dir: Path) -> Prepared | None:
    if not (data_dir / "summary.json").exists():
        return None
    return Prepared(data_dir, json.loads((data_dir / "summary.json").read_text()))


def prepared_is_current(cfg: ProjectConfig, prepared: Prepared) -> bool:
    """Prepared data is reused only if the inputs and the data config are unchanged."""
    s = prepared.summary
    if s.get("config") != cfg.resolved()["data"]:
        return False
    for info in s.get("inputs", {}).values():
        p = Path(info["path"])
        if not p.exists() or sha256_file(p) != info["sha256"]:
            return False
    return True


@contextmanager
def prepare_lock(data_dir: Path):
    """Held while a process prepares data_dir: a file lock beside it, released when the file closes (also if the
    process dies). `ensure_prepared` and `tunewise data prepare` both take it, so two processes never write one
    folder at once."""
    import fcntl

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
