"""Embeddings, cached by content hash: re-indexing unchanged chunks costs nothing.

Models: "bundled:all-minilm-l6-v2" (the default, offline), any sentence-transformers name or path, or
"openai:<model>" with `embedding_url` pointing at an OpenAI-compatible /v1 endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import TunewiseError

DEFAULT_EMBEDDING = "bundled:all-minilm-l6-v2"


class EmbeddingError(TunewiseError, RuntimeError):
    pass


class Embedder:
    def __init__(self, model: str = DEFAULT_EMBEDDING, cache: str | Path | None = None, url: str | None = None,
                 batch_size: int = 64, pack: bool = True):
        self.model_name, self.url, self.batch_size, self.pack = model, url, batch_size, pack
        self._st = None
        self.cache_path = Path(cache) if cache else None
        self._db: sqlite3.Connection | None = None
        self.hits = self.misses = 0
        if model.startswith("openai:") and not url:
            raise EmbeddingError(f"embedding model {model!r} needs rag.embedding_url (an OpenAI-compatible /v1 endpoint)")

    @property
    def model_id(self) -> str:
        return f"{self.model_name}@{self.url}" if self.url else self.model_name

    def _model(self):
        if self._st is None:
            from sentence_transformers import SentenceTransformer

            from ..models import bundled_embedding_dir

            path = str(bundled_embedding_dir()) if self.model_name == DEFAULT_EMBEDDING else self.model_name
            self._st = SentenceTransformer(path, device="cpu")
            if self.pack:  # prepacked oneDNN weights: a one-query encode is mostly small matmuls (bulk encodes are faster without)
                from ..engine import pack_linears

                pack_linears(self._st)
        return self._st

    def count_tokens(self, text: str) -> int:
        return len(self._model().tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _cache(self) -> sqlite3.Connection | None:
        if self.cache_path and self._db is None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.cache_path)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        return self._db

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()

    def encode(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-length float32 vectors, one row per text; cached ones are read, the rest computed and stored."""
        db = self._cache()
        keys = [self._key(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        if db is not None:
            for a in range(0, len(keys), 500):
                part = keys[a : a + 500]
                rows = db.execute(f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(part))})", part).fetchall()
                found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if progress:
            progress(len(texts) - len(todo))
        for a in range(0, len(todo), self.batch_size):
            idx = todo[a : a + self.batch_size]
            vecs = self._compute([texts[i] for i in idx])
            for i, v in zip(idx, vecs):
                found[keys[i]] = v
            if db is not None:
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", [(keys[i], v.tobytes()) for i, v in zip(idx, vecs)])
                db.commit()
            if progress:
                progress(len(idx))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32)

    @property
    def dim(self) -> int:
        if self.model_name.startswith("openai:"):
            return len(self._compute(["dimension probe"])[0])
        return self._model().get_sentence_embedding_dimension()

    def _compute(self, texts: list[str]) -> np.ndarray:
        if self.model_name.startswith("openai:"):
            return self._openai(texts)
        v = self._model().encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return v.astype(np.float32)

    def _openai(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model_name.split(":", 1)[1], "input": texts}).encode()
        req = urllib.request.Request(self.url.rstrip("/") + "/embeddings", data=body, headers={"Content-Type": "application/json"})
        if os.environ.get("OPENAI_API_KEY"):
            req.add_header("Authorization", f"Bearer {os.environ['OPENAI_API_KEY']}")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                data = json.loads(r.read())["data"]
        except Exception as e:
            raise EmbeddingError(f"embeddings endpoint {self.url}: {e}") from None
        v = np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
