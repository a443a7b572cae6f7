"""Training data for ft+rag in the style of RAFT (Zhang et al. 2024, "RAFT: Adapting Language Model to
Domain Specific RAG"): each training question comes with retrieved context, the gold passage plus
distractors in random order, and the answer cites the gold passage's number. In a share of examples
(1 - p_oracle) the gold passage is left out, so the model also learns to answer from what it has learnt
rather than copy whatever is in front of it. The prompt is answer.rag_conversation, the one builder evaluation
and the server use too, so training, evaluation and serving see the same format.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..data.records import Record
from ..results import RaftCounts
from ..util import write_jsonl
from .answer import format_context, gold_rank, rag_conversation
from .retrieve import Retriever


def raft_records(cfg, records: list[Record], distractors: int = 2, p_oracle: float = 0.8, seed: int = 0,
                 retriever: Retriever | None = None) -> tuple[list[dict], dict]:
    """Chat JSONL rows for ft+rag training, and counts. Records need meta.gold_sources."""
    r = retriever or Retriever(cfg)
    rng = random.Random(seed)
    questions = [next(m["content"] for m in reversed(x.messages) if m["role"] == "user") for x in records]
    ranked = r.search_many(questions, k=max(cfg.rag.candidates, distractors + 1))
    rows, counts = [], {"records": len(records), "with_gold": 0, "without_gold": 0, "skipped_no_gold_source": 0}
    for rec, q, hits in zip(records, questions, ranked):
        gold = rec.meta.get("gold_sources") if isinstance(rec.meta, dict) else None
        if not gold:
            counts["skipped_no_gold_source"] += 1
            continue
        g = gold_rank(hits, gold)
        gold_hit = hits[g - 1] if g else None
        if gold_hit is None:  # the gold passage was not retrieved: take it from the index directly
            chunk = next((c for c in r.chunks if c.source in gold or c.source.split("#", 1)[-1] in gold), None)
            if chunk is not None:
                from .retrieve import Hit

                gold_hit = Hit(chunk, 0.0)
        others = [h for h in hits if gold_hit is None or h.chunk.source != gold_hit.chunk.source][:distractors]
        use_gold = gold_hit is not None and rng.random() < p_oracle
        shown = others + ([gold_hit] if use_gold else [])
        rng.shuffle(shown)
        answer = rec.answer
        if use_gold:
            answer = f"{answer} [{shown.index(gold_hit) + 1}]"
            counts["with_gold"] += 1
        else:
            counts["without_gold"] += 1
        prompt = rag_conversation(rec.messages[:-1], format_context(shown), cfg.rag.system_prompt)
        rows.append({"messages": prompt + [{"role": "assistant", "content": answer}],
                     **{k: v for k, v in (rec.meta or {}).items() if k in ("answers", "gold_sources")}})
    return rows, counts


def write_raft(cfg, out: Path, distractors: int = 2, p_oracle: float = 0.8, seed: int = 0) -> RaftCounts:
    from ..data.prepare import ensure_prepared
    from ..models import load_tokenizer

    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))
    rows, counts = raft_records(cfg, prepared.splits["train"], distractors, p_oracle, seed)
    write_jsonl(out, rows)
    return RaftCounts(**counts)
