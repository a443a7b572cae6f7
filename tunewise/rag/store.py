"""Vector stores behind one small interface: an embedded default and PostgreSQL with pgvector.

Embedded (the default): chunks and vectors in one SQLite file, the vectors also held as one numpy matrix
in memory and searched exactly by a matrix-vector product. Why this and not FAISS, LanceDB or sqlite-vec:
for the knowledge bases one process serves (up to a few hundred thousand chunks) an exact search over a
float32 matrix takes about a millisecond per 10k chunks (bench/retrieval.py), needs no extra native
dependency, never trades recall for speed, and SQLite gives atomic updates for free. Past that size, use
PostgreSQL + pgvector with an HNSW index: `rag.store: postgres` and `rag.postgres_url`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import TunewiseError
from .kb import Chunk


class StoreError(TunewiseError, RuntimeError):
    pass


class VectorStore(Protocol):
    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def remove_except(self, keep_ids: set[str]) -> int: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def get(self, ids: list[str]) -> list[Chunk]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class EmbeddedStore:
    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim = Path(path), dim
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, chunk TEXT NOT NULL, vec BLOB NOT NULL)")
        self._ids: list[str] | None = None
        self._matrix: np.ndarray | None = None

    def _load(self) -> None:
        if self._ids is None:
            rows = self.db.execute("SELECT id, vec FROM chunks ORDER BY rowid").fetchall()
            self._ids = [r[0] for r in rows]
            import torch

            m = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.zeros((0, self.dim), np.float32)
            self._matrix = torch.from_numpy(np.ascontiguousarray(m))

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) and vectors.shape[1] != self.dim:
            raise StoreError(f"vectors have {vectors.shape[1]} dimensions; the store holds {self.dim}")
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?)",
                                [(c.id, json.dumps(c.to_json()), v.astype(np.float32).tobytes()) for c, v in zip(chunks, vectors)])
        self._ids = None

    def remove_except(self, keep_ids: set[str]) -> int:
        gone = [r[0] for r in self.db.execute("SELECT id FROM chunks") if r[0] not in keep_ids]
        with self.db:
            self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in gone])
        self._ids = None
        return len(gone)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        self._load()
        if not self._ids:
            return []
        import torch

        # torch, not numpy: right after a torch forward (the query embedding) numpy's BLAS threads contend with
        # torch's spinning OpenMP threads and a 2k x 384 product takes ~7 ms instead of ~0.5 ms.
        scores = self._matrix @ torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        top = torch.topk(scores, min(k, len(self._ids)))
        return [(self._ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def get(self, ids: list[str]) -> list[Chunk]:
        found = {}
        for a in range(0, len(ids), 500):
            part = ids[a : a + 500]
            for cid, chunk in self.db.execute(f"SELECT id, chunk FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                found[cid] = Chunk.from_json(json.loads(chunk))
        return [found[i] for i in ids if i in found]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class PgVectorStore:
    """PostgreSQL + pgvector: cosine distance, HNSW index; vectors are sent as pgvector's text form."""

    def __init__(self, url: str, dim: int, table: str = "tunewise_chunks"):
        import psycopg

        if not table.replace("_", "").isalnum():
            raise StoreError(f"table name {table!r}: letters, digits and _ only")
        self.dim, self.table = dim, table
        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as e:
            raise StoreError(f"cannot connect to PostgreSQL at {url}: {str(e).strip()}") from None
        try:
            self.db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as e:
            raise StoreError(f"{url}: the pgvector extension is not available ({str(e).strip()})") from None
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, chunk JSONB NOT NULL, embedding vector({dim}) NOT NULL)")
        have = self.db.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'embedding'", (table,)).fetchone()
        if have and have[0] != dim:
            raise StoreError(f"{url}: table {table} holds {have[0]}-dimension vectors, the embedding model gives {dim}")
        self.db.execute(f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw (embedding vector_cosine_ops)")

    @staticmethod
    def _vec(v: np.ndarray) -> str:
        return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"

    def upsert(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        with self.db.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.table} (id, chunk, embedding) VALUES (%s, %s, %s::vector) "
                "ON CONFLICT (id) DO UPDATE SET chunk = EXCLUDED.chunk, embedding = EXCLUDED.embedding",
                [(c.id, json.dumps(c.to_json()), self._vec(v)) for c, v in zip(chunks, vectors)])

    def remove_except(self, keep_ids: set[str]) -> int:
        gone = [r[0] for r in self.db.execute(f"SELECT id FROM {self.table}") if r[0] not in keep_ids]
        if gone:
            self.db.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s)", (gone,))
        return len(gone)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        rows = self.db.execute(f"SELECT id, 1 - (embedding <=> %s::vector) FROM {self.table} ORDER BY embedding <=> %s::vector LIMIT %s",
                               (self._vec(vector), self._vec(vector), k)).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def get(self, ids: list[str]) -> list[Chunk]:
        rows = self.db.execute(f"SELECT id, chunk FROM {self.table} WHERE id = ANY(%s)", (ids,)).fetchall()
        found = {r[0]: Chunk.from_json(r[1]) for r in rows}
        return [found[i] for i in ids if i in found]

    def count(self) -> int:
        return self.db.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def open_store(kind: str, index_dir: Path, dim: int, url: str | None = None, table: str = "tunewise_chunks") -> VectorStore:
    if kind == "embedded":
        return EmbeddedStore(index_dir / "vectors.sqlite", dim)
    if kind == "postgres":
        if not url:
            raise StoreError("rag.store is postgres but rag.postgres_url is not set (e.g. postgresql://user@host:5432/db)")
        return PgVectorStore(url, dim, table)
    raise StoreError(f"unknown store {kind!r}: embedded or postgres")
