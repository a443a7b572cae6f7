"""RAG answers: numbered context in the prompt, citations back to sources, groundedness by token overlap."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..metrics import normalize_answer
from .retrieve import Hit, Retriever, fit_budget

_CITE = re.compile(r"\[(\d{1,3})\]")
_ABSTAIN = re.compile(r"\b(i don'?t know|i do not know|not (mentioned|stated|given|provided) in the (context|passages?)|cannot be (found|determined)|no information)\b", re.I)
SUPPORT_THRESHOLD = 0.5  # share of the answer's content tokens that must appear in the evidence
_STOP = set("a an the of in on at to for and or is are was were be by with as from that this it its which who what when where how".split())


@dataclass
class RagContext:
    hits: list[Hit]  # the chunks in the prompt, numbered from 1
    ranked: list[Hit]  # the full ranked list retrieved (for recall@k, MRR)
    prompt: str  # the numbered context block

    @property
    def text(self) -> str:
        return "\n".join(h.chunk.text for h in self.hits)

    def cited(self, answer: str) -> list[dict]:
        """The citations [n] in an answer, mapped to their chunks' sources (out-of-range numbers are marked)."""
        out = []
        for n in dict.fromkeys(int(x) for x in _CITE.findall(answer)):
            if 1 <= n <= len(self.hits):
                c = self.hits[n - 1].chunk
                out.append({"n": n, "source": c.citation, "chunk": c.id})
            else:
                out.append({"n": n, "source": None, "chunk": None})
        return out


def format_context(hits: list[Hit]) -> str:
    lines = ["Context:"]
    for i, h in enumerate(hits, 1):
        title = f" {h.chunk.title}:" if h.chunk.title else ""
        lines.append(f"[{i}]{title} {h.chunk.text}")
    return "\n".join(lines)


def rag_conversation(turns: list[dict], context: str, system: str | None) -> list[dict]:
    """THE conversation a RAG model sees, in training (RAFT data), evaluation (rag, ft+rag) and serving (+kb):
    the RAG system prompt (it replaces any system turn of the conversation), the turns in order, and the last
    user turn as `context` (the numbered passages, format_context) then "Question: " and its text. turns:
    the conversation up to the answer, without it."""
    conv = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": t["role"], "content": t["content"]} for t in turns if t["role"] != "system"]
    last = next((t for t in reversed(conv) if t["role"] == "user"), None)
    if last is None:
        raise ValueError("a RAG conversation needs a user turn to put the context before")
    last["content"] = f"{context}\n\nQuestion: {last['content']}"
    return conv


def rag_prompts(retriever: Retriever, questions: list[str], rag_cfg, tokenizer, rank_depth: int = 20) -> list[RagContext]:
    """Retrieve for every question (one batched query), keep top_k within the token budget, number them."""
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    ranked = retriever.search_many(questions, k=max(rank_depth, rag_cfg.top_k))
    out = []
    for hits in ranked:
        shown = fit_budget(hits[: rag_cfg.top_k], rag_cfg.max_context_tokens, count)
        out.append(RagContext(shown, hits, format_context(shown)))
    return out


def strip_citations(text: str) -> str:
    """The answer without its [n] markers (what EM/F1 score)."""
    return re.sub(r"\s+([.,;:!?])", r"\1", _CITE.sub("", text)).strip()


def is_abstention(answer: str) -> bool:
    return not answer.strip() or bool(_ABSTAIN.search(answer))


def _content_tokens(text: str) -> list[str]:
    return [t for t in normalize_answer(text).split() if t not in _STOP]


def supported(answer: str, evidence: str) -> bool:
    """Whether most of the answer's content tokens occur in the evidence (token overlap, SQuAD-normalised)."""
    toks = _content_tokens(answer)
    if not toks:
        return True
    ev = set(normalize_answer(evidence).split())
    return sum(t in ev for t in toks) / len(toks) >= SUPPORT_THRESHOLD


def gold_rank(ranked: list[Hit], gold_sources: list[str]) -> int | None:
    """1-based rank of the first retrieved chunk from a gold source (a full source or its #id), else None."""
    gold = set(gold_sources)
    for i, h in enumerate(ranked, 1):
        src = h.chunk.source
        if src in gold or src.split("#", 1)[-1] in gold:
            return i
    return None


def citation_precision(ctx: RagContext, raw_answer: str, answers: list[str]) -> float | None:
    """Share of the answer's citations whose chunk contains a gold answer; None when nothing is cited."""
    cited = [c for c in ctx.cited(raw_answer)]
    if not cited:
        return None
    gold = [normalize_answer(a) for a in answers if normalize_answer(a)]
    good = 0
    for c in cited:
        if c["chunk"] is None:
            continue
        text = normalize_answer(ctx.hits[c["n"] - 1].chunk.text)
        good += any(g in text for g in gold)
    return good / len(cited)
