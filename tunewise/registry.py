"""The model registry: one SQLite file with datasets, models, evaluations and promotions.

Every change is one transaction (SQLite's journal makes it all-or-nothing, also under kill -9); the
database runs in WAL mode with synchronous=FULL so a committed promotion survives a power cut. A model
is a name and a version (1, 2, ...) pointing at a trained output directory (an adapter or a full
model) with its base model, training run and dataset hashes. "Production" for a name is the model of
its latest promote or rollback row; rollback re-promotes the production model before the current one.

    reg = Registry(path)
    m = reg.register("support-intents", "runs/x/train/model", base_model=..., run_dir=..., datasets={...})
    reg.add_evaluation(m.id, "gate", {...})
    reg.promote(m.id, verdict={...}, forced=False)
    reg.production("support-intents"); reg.rollback("support-intents")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TunewiseError

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
  hash TEXT PRIMARY KEY, path TEXT, records INTEGER, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL,
  path TEXT NOT NULL, base_model TEXT NOT NULL, adapter INTEGER NOT NULL, run_dir TEXT,
  datasets TEXT NOT NULL, config TEXT, content TEXT NOT NULL, created REAL NOT NULL, UNIQUE(name, version));
CREATE TABLE IF NOT EXISTS evaluations (
  id INTEGER PRIMARY KEY AUTOINCREMENT, model_id INTEGER NOT NULL REFERENCES models(id),
  suite TEXT NOT NULL, metrics TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS promotions (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, model_id INTEGER REFERENCES models(id),
  action TEXT NOT NULL CHECK (action IN ('promote', 'rollback', 'blocked')),
  forced INTEGER NOT NULL DEFAULT 0, verdict TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS retrains (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, trigger TEXT NOT NULL, data_key TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('started', 'trained', 'done', 'skipped')), decision TEXT, run_dir TEXT,
  details TEXT, created REAL NOT NULL, updated REAL NOT NULL);
"""


class RegistryError(TunewiseError, RuntimeError):
    pass


@dataclass
class ModelEntry:
    id: int
    name: str
    version: int
    path: str
    base_model: str
    adapter: bool
    run_dir: str | None
    datasets: dict
    config: dict | None
    created: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "ref": self.ref, "path": self.path,
                "base_model": self.base_model, "adapter": self.adapter, "run_dir": self.run_dir,
                "datasets": self.datasets, "created": self.created}


def _entry(row) -> ModelEntry:
    return ModelEntry(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], json.loads(row[7]),
                      json.loads(row[8]) if row[8] else None, row[9])


_MODEL_COLS = "id, name, version, path, base_model, adapter, run_dir, datasets, config, created"


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)  # transactions are explicit; the server serialises access
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.tx():
            for statement in SCHEMA.split(";"):  # not executescript: it commits on its own
                if statement.strip():
                    self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    def tx(self):
        return _Tx(self.db)

    # -- writes (each one transaction) ---------------------------------------------------------------
    def register(self, name: str, source: str | Path, base_model: str, adapter: bool, run_dir: str | None = None,
                 datasets: dict | None = None, config: dict | None = None) -> ModelEntry:
        """Copy a trained output directory into the registry as the next version of `name` (a later
        training run overwrites its own output, never a registered version). The same content registered
        again returns the existing version. datasets: split -> content hash, or split -> {"sha256", "path",
        "records"} (the prepared split files); the model records split -> hash, the datasets table each file."""
        source = Path(source)
        content = dir_sha256(source)
        row = self.db.execute(f"SELECT {_MODEL_COLS} FROM models WHERE name=? AND content=?", (name, content)).fetchone()
        if row:
            return _entry(row)
        store = self.path.parent / "registry-models" / name
        store.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=store, prefix=".incoming-"))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            with self.tx():
                last = self.db.execute("SELECT MAX(version) FROM models WHERE name=?", (name,)).fetchone()[0]
                version = (last or 0) + 1
                final = store / f"v{version}"
                if final.exists():  # left by a process killed after the rename, before its commit: not in the database
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for d in (datasets or {}).values():
                    d = d if isinstance(d, dict) else {"sha256": d}
                    self.db.execute("INSERT OR IGNORE INTO datasets VALUES (?, ?, ?, ?)",
                                    (d["sha256"], d.get("path"), d.get("records"), time.time()))
                cur = self.db.execute(
                    "INSERT INTO models (name, version, path, base_model, adapter, run_dir, datasets, config, content, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, str(final), base_model, int(adapter), run_dir,
                     json.dumps({k: v["sha256"] if isinstance(v, dict) else v for k, v in (datasets or {}).items()}, sort_keys=True),
                     json.dumps(config, sort_keys=True, default=str) if config is not None else None, content, time.time()))
                return self._model_by_id(cur.lastrowid)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def add_evaluation(self, model_id: int, suite: str, metrics: dict) -> int:
        with self.tx():
            cur = self.db.execute("INSERT INTO evaluations (model_id, suite, metrics, created) VALUES (?, ?, ?, ?)",
                                  (model_id, suite, json.dumps(metrics, default=str), time.time()))
            return cur.lastrowid

    def promote(self, model_id: int, verdict: dict | None = None, forced: bool = False) -> ModelEntry:
        m = self.get_by_id(model_id)
        with self.tx():
            self.db.execute("INSERT INTO promotions (name, model_id, action, forced, verdict, created) VALUES (?, ?, 'promote', ?, ?, ?)",
                            (m.name, m.id, int(forced), json.dumps(verdict, default=str) if verdict else None, time.time()))
        return m

    def block(self, model_id: int, verdict: dict) -> None:
        m = self.get_by_id(model_id)
        with self.tx():
            self.db.execute("INSERT INTO promotions (name, model_id, action, forced, verdict, created) VALUES (?, ?, 'blocked', 0, ?, ?)",
                            (m.name, m.id, json.dumps(verdict, default=str), time.time()))

    def rollback(self, name: str) -> ModelEntry:
        """Production goes back to the model that was production before the current one."""
        with self.tx():
            history = self._production_history(name)
            if len(history) < 2:
                raise RegistryError(f"{name}: nothing to roll back to (production history: {[f'{name}:{v}' for _, v in history]})")
            current, previous = history[-1], history[-2]
            self.db.execute("INSERT INTO promotions (name, model_id, action, forced, verdict, created) VALUES (?, ?, 'rollback', 0, ?, ?)",
                            (name, previous[0], json.dumps({"from": f"{name}:{current[1]}"}), time.time()))
        return self.get_by_id(previous[0])

    # -- reads ---------------------------------------------------------------------------------------
    def _production_history(self, name: str) -> list[tuple[int, int]]:
        """(model id, version) of each production model in order, rollbacks popping the stack."""
        rows = self.db.execute("SELECT p.action, p.model_id, m.version FROM promotions p JOIN models m ON m.id = p.model_id"
                               " WHERE p.name=? AND p.action IN ('promote', 'rollback') ORDER BY p.id", (name,)).fetchall()
        stack: list[tuple[int, int]] = []
        for action, mid, version in rows:
            if action == "rollback":
                while stack and stack[-1][0] != mid:
                    stack.pop()
                if not stack:
                    stack.append((mid, version))
            elif not stack or stack[-1][0] != mid:
                stack.append((mid, version))
        return stack

    def production(self, name: str) -> ModelEntry | None:
        history = self._production_history(name)
        return self.get_by_id(history[-1][0]) if history else None

    def _model_by_id(self, model_id: int) -> ModelEntry:
        row = self.db.execute(f"SELECT {_MODEL_COLS} FROM models WHERE id=?", (model_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no model with id {model_id}")
        return _entry(row)

    get_by_id = _model_by_id

    def get(self, ref: str) -> ModelEntry:
        """`name:version`, `name` (its latest version) or `name:production`."""
        name, _, version = ref.partition(":")
        if version == "production":
            m = self.production(name)
            if m is None:
                raise RegistryError(f"{name}: no production model (promote one with `tunewise gate` or `tunewise models promote`)")
            return m
        if version:
            if not version.isdigit():
                raise RegistryError(f"bad model reference {ref!r}: expected NAME, NAME:VERSION or NAME:production")
            row = self.db.execute(f"SELECT {_MODEL_COLS} FROM models WHERE name=? AND version=?", (name, int(version))).fetchone()
        else:
            row = self.db.execute(f"SELECT {_MODEL_COLS} FROM models WHERE name=? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        if row is None:
            raise RegistryError(f"no model {ref!r} in {self.path}")
        return _entry(row)

    def models(self, name: str | None = None) -> list[ModelEntry]:
        q = f"SELECT {_MODEL_COLS} FROM models" + (" WHERE name=?" if name else "") + " ORDER BY name, version"
        return [_entry(r) for r in self.db.execute(q, (name,) if name else ())]

    def evaluations(self, model_id: int) -> list[dict]:
        return [{"id": i, "suite": s, "metrics": json.loads(m), "created": c}
                for i, s, m, c in self.db.execute("SELECT id, suite, metrics, created FROM evaluations WHERE model_id=? ORDER BY id", (model_id,))]

    def last_gate(self, model_id: int) -> list[dict] | None:
        """The checks of the model's latest gate verdict, or None if it was never gated."""
        gates = [e for e in self.evaluations(model_id) if e["suite"] == "gate"]
        return gates[-1]["metrics"]["checks"] if gates else None

    def promotions(self, name: str) -> list[dict]:
        rows = self.db.execute("SELECT p.id, p.action, p.forced, p.verdict, p.created, m.version FROM promotions p"
                               " LEFT JOIN models m ON m.id = p.model_id WHERE p.name=? ORDER BY p.id", (name,))
        return [{"id": i, "action": a, "forced": bool(f), "verdict": json.loads(v) if v else None, "created": c, "ref": f"{name}:{ver}"}
                for i, a, f, v, c, ver in rows]

    def journal(self, name: str, trigger: str, data_key: str, state: str, decision: str | None = None, run_dir: str | None = None,
                details: dict | None = None) -> int:
        """A new entry in the re-training journal (what `tunewise retrain` decided and did)."""
        now = time.time()
        with self.tx():
            cur = self.db.execute("INSERT INTO retrains (name, trigger, data_key, state, decision, run_dir, details, created, updated)"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  (name, trigger, data_key, state, decision, run_dir, json.dumps(details or {}), now, now))
        return int(cur.lastrowid)

    def journal_update(self, entry_id: int, state: str, decision: str | None = None, details: dict | None = None) -> None:
        with self.tx():
            old = self.db.execute("SELECT details FROM retrains WHERE id=?", (entry_id,)).fetchone()
            merged = {**json.loads(old[0] or "{}"), **(details or {})}
            self.db.execute("UPDATE retrains SET state=?, decision=COALESCE(?, decision), details=?, updated=? WHERE id=?",
                            (state, decision, json.dumps(merged), time.time(), entry_id))

    def retrains(self, name: str) -> list[dict]:
        rows = self.db.execute("SELECT id, trigger, data_key, state, decision, run_dir, details, created, updated FROM retrains"
                               " WHERE name=? ORDER BY id", (name,))
        return [{"id": i, "trigger": t, "data_key": k, "state": st, "decision": d, "run_dir": r, "details": json.loads(x or "{}"),
                 "created": c, "updated": u} for i, t, k, st, d, r, x, c, u in rows]

    def check(self) -> list[str]:
        """Integrity problems (empty list: consistent)."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"foreign key: {r}" for r in self.db.execute("PRAGMA foreign_key_check")]
        return problems


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (including KeyboardInterrupt)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def dir_sha256(path: Path) -> str:
    """Content hash of a directory: relative paths and file bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(path).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def registry_path(cfg) -> Path:
    """One registry per output directory (all projects written there share it)."""
    return cfg.path(cfg.output_dir) / "registry.sqlite"
