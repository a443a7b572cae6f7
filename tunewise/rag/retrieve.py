"""Index a knowledge base and retrieve from it: BM25 (bm25s) and dense (the store), fused by reciprocal rank.

Index layout (<run>/kb/ by default): chunks.jsonl (the chunks in index order), bm25/ (the bm25s index),
embeddings.sqlite (the content-hash cache), vectors.sqlite (the embedded store) and manifest.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from ..results import IndexManifest, SkippedFile
from ..util import atomic_write_json, write_jsonl
from .embed import Embedder
from .kb import BadFile, Chunk, KBError, chunk_documents, load_documents
from .store import open_store

RRF_K = 60


def rrf(rankings: list[list[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion (Cormack et al. 2009): score(d) = sum over rankings of 1 / (k + rank), rank from 1."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


@dataclass
class Hit:
    chunk: Chunk
    score: float
    ranks: dict[str, int] = field(default_factory=dict)  # rank in each retriever that found it (1-based)


def _stemmer():
    try:
        import Stemmer

        return Stemmer.Stemmer("english")
    except ImportError:
        return None


def _tokenize(texts: list[str], stem: bool):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer() if stem else None, show_progress=False)


def index_dir_of(cfg) -> Path:
    return cfg.path(cfg.rag.index_dir) if cfg.rag.index_dir else cfg.run_dir / "kb"


def embedder_of(cfg, index_dir: Path) -> Embedder:
    r = cfg.rag
    return Embedder(r.embedding_model, index_dir / "embeddings.sqlite", r.embedding_url)


def build_index(cfg, progress: Callable[[str, int, int | None], None] | None = None) -> IndexManifest:
    """Read, chunk, embed (cached) and store the knowledge base; rebuild BM25. Returns the manifest."""
    import bm25s

    r = cfg.rag
    if not r.knowledge_base:
        raise KBError("rag.knowledge_base is empty: list the files or folders of the knowledge base")
    t0 = time.time()
    out = index_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    docs, bad = load_documents([cfg.path(p) for p in r.knowledge_base], root=cfg.base_dir)
    emb = embedder_of(cfg, out)
    chunks = chunk_documents(docs, emb.count_tokens, r.chunk_tokens, r.chunk_overlap)
    seen: dict[str, int] = {}
    unique = []
    for c in chunks:  # a FAQ/passage file with a repeated id: keep the first, report the rest
        if c.id in seen:
            bad.append(BadFile(c.source, f"duplicate id: chunk {c.id} appears again"))
            continue
        seen[c.id] = 1
        unique.append(c)
    chunks = unique
    if not chunks:
        raise KBError("the knowledge base yielded no chunks" + (f"; {len(bad)} file(s) could not be read" if bad else ""))
    total = len(chunks)
    done = 0

    def step(n: int):
        nonlocal done
        done += n
        if progress:
            progress("embedding", done, total)

    vectors = emb.encode([embed_text(c) for c in chunks], progress=step)
    store = open_store(r.store, out, vectors.shape[1], r.postgres_url, r.postgres_table)
    try:
        store.upsert(chunks, vectors)
        removed = store.remove_except({c.id for c in chunks})
        stored = store.count()
    finally:
        store.close()
    stem = _stemmer() is not None
    bm = bm25s.BM25()
    bm.index(_tokenize([embed_text(c) for c in chunks], stem), show_progress=False)
    bm.save(str(out / "bm25"))
    write_jsonl(out / "chunks.jsonl", [c.to_json() for c in chunks])
    manifest = IndexManifest(
        documents=len(docs), chunks=len(chunks), stored=stored, removed_from_store=removed,
        bad_files=[SkippedFile(path=b.path, reason=b.reason) for b in bad], embedding_model=emb.model_id, dim=int(vectors.shape[1]),
        embedding_cache={"hits": emb.hits, "misses": emb.misses}, store=r.store, bm25_stemmer="english (PyStemmer)" if stem else None,
        chunk_tokens=r.chunk_tokens, chunk_overlap=r.chunk_overlap, seconds=round(time.time() - t0, 2))
    emb.close()
    atomic_write_json(out / "manifest.json", manifest.to_json())
    return manifest


def embed_text(c: Chunk) -> str:
    """What is embedded and BM25-indexed: the chunk with its title, so a heading's words count."""
    return f"{c.title}\n{c.text}" if c.title else c.text


class Retriever:
    def __init__(self, cfg):
        import bm25s

        self.cfg, self.r = cfg, cfg.rag
        self.dir = index_dir_of(cfg)
        if not (self.dir / "manifest.json").exists():
            raise KBError(f"no knowledge-base index at {self.dir}: run `tunewise kb index` first")
        self.manifest = IndexManifest.read(self.dir / "manifest.json")
        self.chunks = [Chunk.from_json(json.loads(line)) for line in (self.dir / "chunks.jsonl").read_text().splitlines()]
        self.by_id = {c.id: c for c in self.chunks}
        self.bm25 = bm25s.BM25.load(str(self.dir / "bm25"))
        self.stem = bool(self.manifest.bm25_stemmer)
        self.embedder = embedder_of(cfg, self.dir)
        if self.embedder.model_id != self.manifest.embedding_model:
            raise KBError(f"the index was built with {self.manifest.embedding_model}, the config says {self.embedder.model_id}: re-run `tunewise kb index`")
        self.store = open_store(self.r.store, self.dir, self.manifest.dim, self.r.postgres_url, self.r.postgres_table)

    def bm25_ranking(self, queries: list[str], n: int) -> list[list[str]]:
        n = min(n, len(self.chunks))
        docs, scores = self.bm25.retrieve(_tokenize(queries, self.stem), k=n, show_progress=False, n_threads=1)
        return [[self.chunks[int(d)].id for d, s in zip(drow, srow) if s > 0] for drow, srow in zip(docs, scores)]

    def dense_ranking(self, queries: list[str], n: int) -> list[list[str]]:
        vecs = self.embedder._compute(queries) if queries else []
        return [[cid for cid, _ in self.store.search(v, n)] for v in vecs]

    def search_many(self, queries: list[str], k: int | None = None, mode: str | None = None) -> list[list[Hit]]:
        k, mode = k or self.r.top_k, mode or self.r.retrieval
        n = max(k, self.r.candidates)
        lists: dict[str, list[list[str]]] = {}
        if mode in ("bm25", "hybrid"):
            lists["bm25"] = self.bm25_ranking(queries, n)
        if mode in ("dense", "hybrid"):
            lists["dense"] = self.dense_ranking(queries, n)
        out = []
        for qi in range(len(queries)):
            rankings = {name: lst[qi] for name, lst in lists.items()}
            if mode == "hybrid":
                fused = rrf(list(rankings.values()), self.r.rrf_k)
            else:
                only = next(iter(rankings.values()))
                fused = [(cid, 1.0 / (rank + 1)) for rank, cid in enumerate(only)]
            hits = []
            for cid, score in fused[:k]:
                ranks = {name: r.index(cid) + 1 for name, r in rankings.items() if cid in r}
                hits.append(Hit(self.by_id[cid], score, ranks))
            out.append(hits)
        return out

    def search(self, query: str, k: int | None = None, mode: str | None = None) -> list[Hit]:
        return self.search_many([query], k, mode)[0]

    def close(self) -> None:
        self.store.close()
        self.embedder.close()


def fit_budget(hits: list[Hit], max_tokens: int, count: Callable[[str], int]) -> list[Hit]:
    """The best hits, in rank order, whose texts fit in max_tokens together (at least the first one)."""
    kept, used = [], 0
    for h in hits:
        n = count(h.chunk.text)
        if kept and used + n > max_tokens:
            break
        kept.append(h)
        used += n
    return kept
