"""Synthetic Q&A from a knowledge base (`tunewise data synth`).

For each sampled chunk a generator model (the configured local model through the engine, or an
OpenAI-compatible chat endpoint) writes a question and a short answer. A pair is kept only if
1. it parses (a "Question:" and an "Answer:" line),
2. the answer is supported by the chunk (most of its content words occur in it), and
3. the question retrieves its own chunk in the top k (the round-trip filter: a question only its
   chunk can answer, not a generic one).
Kept pairs are ordinary chat JSONL with `gold_sources` and the chunk id, ready for `data prepare`,
or RAFT-style records with distractor chunks (`--raft`).
"""

from __future__ import annotations

import json
import random
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import Record
from ..util import write_jsonl

SYNTH_SYSTEM = ("You write exam questions. Read the passage and write one question that the passage answers, "
                "then its answer as a short phrase copied from the passage. Reply exactly in this form:\n"
                "Question: <the question>\nAnswer: <the short answer>")

_Q = re.compile(r"^\s*(?:\*\*)?question(?:\*\*)?\s*[:：]\s*(.+)$", re.I | re.M)
_A = re.compile(r"^\s*(?:\*\*)?answer(?:\*\*)?\s*[:：]\s*(.+)$", re.I | re.M)


ANSWER_SYSTEM = "Answer the question with a short phrase copied from the passage."


def parse_question(text: str) -> str | None:
    """A question without its answer line (small models often stop after it): the 'Question:' line, or else
    the first sentence ending in '?'."""
    q = _Q.search(text)
    cand = q.group(1) if q else next(iter(re.findall(r"[^.!?\n\"]*\?", text)), "")
    cand = cand.strip().strip('"').strip()
    return cand if len(cand) >= 8 and cand.endswith("?") else None


def parse_pair(text: str) -> tuple[str, str] | None:
    q, a = _Q.search(text), _A.search(text)
    if not q or not a:
        return None
    question, answer = q.group(1).strip(), a.group(1).strip().strip('"')
    if len(question) < 8 or not answer or "?" not in question:
        return None
    return question, answer


@dataclass
class SynthReport:
    chunks: int = 0
    generated: int = 0
    parsed: int = 0
    supported: int = 0
    round_trip: int = 0
    answered_separately: int = 0  # questions whose answer came from the second, answering pass
    rejected: dict = field(default_factory=lambda: {"unparseable": 0, "unsupported": 0, "round_trip": 0})
    examples: list = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return self.round_trip / self.generated if self.generated else 0.0

    def as_dict(self) -> dict:
        return {"chunks": self.chunks, "generated": self.generated, "parsed": self.parsed, "supported": self.supported,
                "kept": self.round_trip, "answered_separately": self.answered_separately, "pass_rate": round(self.pass_rate, 4), "rejected": self.rejected, "examples": self.examples}


def _endpoint_generate(url: str, model: str, convs: list[list[dict]], max_tokens: int, temperature: float) -> list[str]:
    import os

    out = []
    for c in convs:
        body = json.dumps({"model": model, "messages": c, "max_tokens": max_tokens, "temperature": temperature}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
        if os.environ.get("OPENAI_API_KEY"):
            req.add_header("Authorization", f"Bearer {os.environ['OPENAI_API_KEY']}")
        with urllib.request.urlopen(req, timeout=300) as r:
            out.append(json.loads(r.read())["choices"][0]["message"]["content"])
    return out


def synthesize(cfg, out: Path, chunks: int = 100, per_chunk: int = 1, k: int = 5, seed: int = 0, temperature: float = 0.7,
               endpoint: str | None = None, endpoint_model: str | None = None, raft: bool = False, progress=None) -> SynthReport:
    from .answer import supported
    from .retrieve import Retriever

    retriever = Retriever(cfg)
    rng = random.Random(seed)
    pool = retriever.chunks
    picked = rng.sample(pool, min(chunks, len(pool)))
    convs = [[{"role": "system", "content": SYNTH_SYSTEM}, {"role": "user", "content": f"Passage:\n{c.text}"}] for c in picked for _ in range(per_chunk)]
    owners = [c for c in picked for _ in range(per_chunk)]
    eng = None

    def generate(batch: list[list[dict]], temperature: float, max_tokens: int) -> list[str]:
        nonlocal eng
        if endpoint:
            return _endpoint_generate(endpoint, endpoint_model or "gpt-4o-mini", batch, max_tokens, temperature)
        if eng is None:
            from ..engine import Engine

            eng = Engine.load(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
        outs = eng.generate(batch, max_new_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed,
                            batch_size=cfg.evaluation.batch_size, on_batch=progress)
        return [o.text for o in outs]

    texts = generate(convs, temperature, 96)
    # Second pass: a question that came without its answer is answered from its passage (greedy), as a
    # reader would; the support and round-trip filters below judge it like any other pair.
    parsed = [parse_pair(t) for t in texts]
    lone = [(i, q) for i, (t, p) in enumerate(zip(texts, parsed)) if p is None and (q := parse_question(t))]
    answers = generate([[{"role": "system", "content": ANSWER_SYSTEM},
                         {"role": "user", "content": f"Passage:\n{owners[i].text}\n\nQuestion: {q}"}] for i, q in lone], 0.0, 32) if lone else []
    for (i, q), a in zip(lone, answers):
        a = a.strip().split("\n")[0].strip().strip('"')
        if a:
            parsed[i] = (q, a)
    rep = SynthReport(chunks=len(picked), generated=len(texts), answered_separately=sum(parsed[i] is not None for i, _ in lone))
    pairs = []
    for chunk, pair in zip(owners, parsed):
        if pair is None:
            rep.rejected["unparseable"] += 1
            continue
        rep.parsed += 1
        if not supported(pair[1], chunk.text):
            rep.rejected["unsupported"] += 1
            continue
        rep.supported += 1
        pairs.append((chunk, *pair))
    hits = retriever.search_many([q for _, q, _ in pairs], k=k)
    records = []
    for (chunk, q, a), found in zip(pairs, hits):
        if chunk.id not in {h.chunk.id for h in found}:
            rep.rejected["round_trip"] += 1
            continue
        rep.round_trip += 1
        meta = {"gold_sources": [chunk.source], "synth": {"chunk": chunk.id, "generator": endpoint_model if endpoint else cfg.model.name}}
        records.append(Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"synth:{chunk.id}", None, meta))
        if len(rep.examples) < 5:
            rep.examples.append({"chunk": chunk.citation, "question": q, "answer": a})
    if raft:
        from .raft import raft_records

        rows, _ = raft_records(cfg, records, retriever=retriever, seed=seed)
    else:
        rows = [{"messages": r.messages, **r.meta} for r in records]
    write_jsonl(out, rows)
    retriever.close()
    return rep
