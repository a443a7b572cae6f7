"""Metrics registry: name -> function(predictions, references) -> per-item scores.

Per-item scores (not just a mean) so confidence intervals and paired tests can be computed on them.
"""

from __future__ import annotations

import re
import string
from typing import Callable

METRICS: dict[str, Callable[[list[str], list[str]], list[float]]] = {}
# measured beside evaluation.metrics where a variant has them: the objective's own (grpo's reward, the preference
# accuracy of held-out pairs) and RAG/grounding
EXTRA_METRICS = ("reward", "pref_accuracy", "hallucination", "recall@5", "mrr", "citation_precision")


def reported_metrics(cfg, summaries) -> list[str]:  # summaries: results.EvalSummary
    """The metric columns of a comparison: held-out text has its per-token NLL only; otherwise evaluation.metrics
    and the extra ones some variant has."""
    if cfg.data.format == "text":
        return ["nll_per_token"]
    summaries = list(summaries)
    graders = list(dict.fromkeys(g for s in summaries for g in s.graders or []))
    return list(cfg.evaluation.metrics) + graders + [m for m in EXTRA_METRICS if any(m in s.metrics for s in summaries)]


def metric(name: str):
    def register(fn):
        METRICS[name] = fn
        return fn

    return register


def normalize_label(text: str) -> str:
    """Lowercase, first line only, strip surrounding punctuation/quotes and whitespace; spaces -> underscores."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.strip().strip(string.punctuation + " \"'`").lower()
    return re.sub(r"[\s-]+", "_", first)


@metric("exact_match")
def exact_match(preds: list[str], refs: list[str]) -> list[float]:
    return [float(p.strip() == r.strip()) for p, r in zip(preds, refs)]


@metric("accuracy")
def accuracy(preds: list[str], refs: list[str]) -> list[float]:
    """Exact match after label normalisation (the classification metric)."""
    return [float(normalize_label(p) == normalize_label(r)) for p, r in zip(preds, refs)]


def score(name: str, preds: list[str], refs: list[str]) -> list[float]:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")
    return METRICS[name](preds, refs)


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


@metric("answer_em")
def answer_em(preds: list[str], refs: list[str]) -> list[float]:
    """SQuAD exact match: equal after answer normalisation (case, punctuation, articles, spaces)."""
    return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(preds, refs)]


@metric("token_f1")
def token_f1(preds: list[str], refs: list[str]) -> list[float]:
    """SQuAD token-overlap F1 after answer normalisation."""
    from collections import Counter

    out = []
    for p, r in zip(preds, refs):
        pt, rt = normalize_answer(p).split(), normalize_answer(r).split()
        if not pt or not rt:
            out.append(float(pt == rt))
            continue
        common = sum((Counter(pt) & Counter(rt)).values())
        if common == 0:
            out.append(0.0)
            continue
        precision, recall = common / len(pt), common / len(rt)
        out.append(2 * precision * recall / (precision + recall))
    return out


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@metric("rouge_l")
def rouge_l(preds: list[str], refs: list[str]) -> list[float]:
    """ROUGE-L F1 (longest common subsequence of lowercase tokens)."""
    out = []
    for p, r in zip(preds, refs):
        pt, rt = p.lower().split(), r.lower().split()
        lcs = _lcs(pt, rt) if pt and rt else 0
        out.append(0.0 if lcs == 0 else 2 * lcs / (len(pt) + len(rt)))
    return out


@metric("chrf")
def chrf(preds: list[str], refs: list[str]) -> list[float]:
    """Sentence chrF (sacrebleu), scaled to 0..1."""
    from sacrebleu.metrics import CHRF

    m = CHRF()
    return [m.sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)]


@metric("bleu")
def bleu(preds: list[str], refs: list[str]) -> list[float]:
    """Sentence BLEU (sacrebleu, exponential smoothing), scaled to 0..1."""
    from sacrebleu.metrics import BLEU

    m = BLEU(effective_order=True)
    return [m.sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)]


# ---------------------------------------------------------------- tool calls (in the text form data/tools.py renders)

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_calls(text: str) -> list[dict]:
    """The calls in a reply in tunewise's tool-call text form ({"name", "arguments"} each; a block that is not JSON with a
    name counts as a call named None, so a malformed call is wrong rather than absent)."""
    import json

    calls = []
    for raw in TOOL_CALL.findall(text):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        ok = isinstance(obj, dict) and isinstance(obj.get("name"), str)
        calls.append({"name": obj["name"] if ok else None,
                      "arguments": obj.get("arguments") if ok and isinstance(obj.get("arguments"), dict) else {}})
    return calls


def _call_key(call: dict) -> tuple:
    import json

    return call["name"], json.dumps(call["arguments"], sort_keys=True)


@metric("tool_calls_exact")
def tool_calls_exact(preds: list[str], refs: list[str]) -> list[float]:
    """1 when the reply makes exactly the reference's calls (names and arguments; parallel calls in any order), including
    none when the reference makes none (irrelevance: no call when no tool fits)."""
    from collections import Counter

    return [float(Counter(map(_call_key, parse_calls(p))) == Counter(map(_call_key, parse_calls(r)))) for p, r in zip(preds, refs)]


@metric("tool_call_names")
def tool_call_names(preds: list[str], refs: list[str]) -> list[float]:
    """1 when the reply calls the reference's functions (as a multiset of names; arguments not compared)."""
    from collections import Counter

    return [float(Counter(c["name"] for c in parse_calls(p)) == Counter(c["name"] for c in parse_calls(r))) for p, r in zip(preds, refs)]


@metric("tool_args_f1")
def tool_args_f1(preds: list[str], refs: list[str]) -> list[float]:
    """F1 over (function, argument, value) triples of the reply's calls against the reference's; 1 when neither calls."""
    import json
    from collections import Counter

    def triples(text):
        return Counter((c["name"], k, json.dumps(v, sort_keys=True)) for c in parse_calls(text) for k, v in c["arguments"].items())

    out = []
    for p, r in zip(preds, refs):
        pc, rc = parse_calls(p), parse_calls(r)
        if not pc and not rc:
            out.append(1.0)
            continue
        pt, rt = triples(p), triples(r)
        if not pt and not rt:  # calls without arguments: the names decide
            out.append(float(Counter(c["name"] for c in pc) == Counter(c["name"] for c in rc)))
            continue
        common = sum((pt & rt).values())
        out.append(0.0 if common == 0 else 2 * common / (sum(pt.values()) + sum(rt.values())))
    return out
