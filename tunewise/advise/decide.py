"""`tunewise advise`: which route to try, from the use case (rules) and the cost model, before any run.

The rules are the design's (docs/design.md, "The problem"), each a small function that adds points
and a reason to the routes it favours or rules out; the route with most points is recommended, cost
breaks ties. Nothing here is measured except the machine's matmul rate: `tunewise run` then measures
the routes in this order and stops at the first that meets the goal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import CHANGES_PER_YEAR, ProjectConfig
from ..results import Advice
from . import costs

ROUTES = ("prompt", "hosted", "rag", "fine-tune", "hybrid", "pre-train")
ROUTE_TEXT = {
    "prompt": "prompt engineering (zero/few-shot) on the local base model",
    "hosted": "prompting a hosted model behind an API (OpenAI, Anthropic, Google, or your own vLLM/Ollama server)",
    "rag": "retrieval-augmented generation over the knowledge base",
    "fine-tune": "fine-tuning (LoRA) on the labelled examples",
    "hybrid": "fine-tuning plus retrieval (ft+rag)",
    "pre-train": "continued pre-training on the domain corpus",
}
PRETRAIN_TOKENS = 1e11  # below ~100B tokens of domain text, continued pre-training rarely beats RAG + fine-tuning


@dataclass
class Facts:
    """What the rules read: the use case plus what the data and knowledge base say."""
    examples: int
    mean_tokens: float  # one training example after the chat template
    query_tokens: float  # the user's turn
    context_tokens: int  # instructions every prompt needs
    kb_files: int
    shot_tokens: float
    answer_tokens: float = 0.0  # the assistant's turn: where the loss (and the logits) are


@dataclass
class Verdict:
    points: dict = field(default_factory=lambda: {r: 0 for r in ROUTES})
    reasons: dict = field(default_factory=lambda: {r: [] for r in ROUTES})

    def add(self, route: str, pts: int, why: str) -> None:
        self.points[route] += pts
        self.reasons[route].append(f"{'+' if pts >= 0 else ''}{pts}: {why}")


def gather_facts(cfg: ProjectConfig, tokenizer=None, sample: int = 200) -> Facts:
    from ..data.formats import read_records
    from ..data.records import BadRecord

    recs = [r for r in read_records(cfg.path(cfg.data.train), cfg.data.format, cfg.data.columns, cfg.data.system_prompt, cfg.data.reasoning)
            if not isinstance(r, BadRecord)]
    rng = random.Random(0)
    some = rng.sample(recs, min(sample, len(recs))) if recs else []
    if tokenizer is not None and some:
        from ..models import render_chat

        count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        full = [count(render_chat(tokenizer, r.messages, tokenize=False)) for r in some]
    else:
        count = lambda t: max(1, len(t) // 4)  # noqa: E731
        full = [sum(count(m["content"]) + 4 for m in r.messages) for r in some]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    query = mean([count(r.prompt_key) for r in some])
    answer = mean([count(r.answer) for r in some])
    system = cfg.data.system_prompt or ""
    ctx = cfg.use_case.context_tokens if cfg.use_case.context_tokens is not None else (count(system) if system else 0)
    kb_files = 0
    for p in cfg.rag.knowledge_base:
        path = cfg.path(p)
        kb_files += sum(1 for f in path.rglob("*") if f.is_file()) if path.is_dir() else int(path.exists())
    return Facts(examples=len(recs), mean_tokens=mean(full), query_tokens=query, context_tokens=ctx, kb_files=kb_files,
                 shot_tokens=query + answer + 10, answer_tokens=answer)


# ---------------------------------------------------------------- the rules


def rule_citations(uc, f: Facts, v: Verdict) -> None:
    if uc.citations:
        v.add("rag", 3, "answers must cite sources, and only retrieval can point to one")
        v.add("hybrid", 3, "answers must cite sources, and only retrieval can point to one")
        v.add("prompt", -2, "a prompt alone cannot cite documents it does not contain")
        v.add("hosted", -2, "a prompt alone cannot cite documents it does not contain")
        v.add("fine-tune", -3, "a fine-tuned model cannot cite where a fact came from")


def rule_changing_knowledge(uc, f: Facts, v: Verdict) -> None:
    n = CHANGES_PER_YEAR[uc.knowledge_changes]
    if n >= 12:
        v.add("rag", 3, f"knowledge changes {uc.knowledge_changes}: re-indexing takes seconds, re-training {n} times a year does not")
        v.add("hybrid", 1, "retrieval keeps the facts fresh; the fine-tune only has to learn the behaviour")
        v.add("fine-tune", -3, f"facts baked into weights go stale {n} times a year")
    elif n == 0 and not uc.citations:
        v.add("fine-tune", 1, "knowledge is stable, so what the model learns stays true")


def rule_knowledge_task(uc, f: Facts, v: Verdict) -> None:
    if not f.kb_files and uc.task != "qa":
        v.add("rag", -3, "no knowledge base is configured (rag.knowledge_base), and the task does not need one")
        v.add("hybrid", -3, "no knowledge base is configured")
    if uc.task == "qa":
        if f.kb_files:
            v.add("rag", 2, f"answers come from a knowledge base ({f.kb_files} files)")
            v.add("hybrid", 1, "a knowledge base exists for retrieval")
        else:
            v.add("rag", -2, "a question-answering task but no knowledge base is configured (rag.knowledge_base)")
            v.add("hybrid", -2, "no knowledge base is configured")


def rule_behaviour(uc, f: Facts, v: Verdict) -> None:
    if uc.task in ("classification", "extraction", "formatting"):
        if f.examples >= 1000:
            v.add("fine-tune", 2, f"a stable {uc.task} behaviour with {f.examples:,} labelled examples to learn it from")
            if f.kb_files:
                v.add("hybrid", 1, "labelled behaviour and a knowledge base: both kinds of data")
        elif f.examples >= 100:
            v.add("fine-tune", 1, f"{f.examples} labelled examples: enough for a LoRA adapter, not for much more")
    if f.examples < 100:
        v.add("fine-tune", -3, f"only {f.examples} labelled examples: too few to fine-tune on; use them as few-shot examples")
        v.add("hybrid", -3, "too few labelled examples to fine-tune on")
        v.add("prompt", 1, "the few examples there are fit in a few-shot prompt")
        v.add("hosted", 1, "the few examples there are fit in a few-shot prompt")


def rule_small_context(uc, f: Facts, v: Verdict) -> None:
    stable = CHANGES_PER_YEAR[uc.knowledge_changes] < 12
    if f.context_tokens <= 1000 and stable and not uc.citations and uc.task != "qa":
        v.add("prompt", 3, f"everything the model needs fits in a short prompt (~{f.context_tokens} tokens) and does not change often")
        v.add("hosted", 3, f"everything the model needs fits in a short prompt (~{f.context_tokens} tokens) and does not change often")
    elif f.context_tokens > 4000:
        v.add("prompt", -1, f"every prompt would carry ~{f.context_tokens:,} context tokens")
        v.add("hosted", -1, f"every prompt would carry ~{f.context_tokens:,} context tokens, paid per token")
        v.add("fine-tune", 1, "fine-tuning moves long instructions out of every prompt")


def rule_volume_latency(uc, f: Facts, v: Verdict) -> None:
    if uc.queries_per_day >= 10_000:
        v.add("fine-tune", 1, f"{uc.queries_per_day:,} queries a day: short prompts of a fine-tuned model cost less at volume")
        v.add("prompt", -1, "long few-shot prompts are paid for on every one of many queries")
        v.add("hosted", -1, f"a hosted model bills every token of {uc.queries_per_day:,} queries a day")
    if uc.latency_ms is not None and uc.latency_ms <= 500:
        v.add("fine-tune", 1, f"a {uc.latency_ms:.0f} ms latency target favours short prompts and no retrieval step")
        v.add("rag", -1, "retrieval and long contexts add latency")


def rule_pretrain(uc, f: Facts, v: Verdict) -> None:
    if uc.domain_corpus_tokens >= PRETRAIN_TOKENS:
        v.add("pre-train", 2, f"{uc.domain_corpus_tokens:.1e} tokens of domain text: continued pre-training could pay off (tunewise does not do it)")
    else:
        v.add("pre-train", -5, "pre-training needs ~1e11+ tokens of domain text and a GPU cluster; RAG and fine-tuning cover this case")


def rule_hosted(uc, f: Facts, v: Verdict) -> None:
    if uc.on_premises:
        v.add("hosted", -6, "data must stay on our machines (use_case.on_premises): a hosted model is ruled out")
    elif uc.latency_ms is not None and uc.latency_ms <= 300:
        v.add("hosted", -1, f"a {uc.latency_ms:.0f} ms target leaves little room for a network round trip to a hosted API")


RULES = [rule_hosted, rule_citations, rule_changing_knowledge, rule_knowledge_task, rule_behaviour, rule_small_context, rule_volume_latency, rule_pretrain]


# ---------------------------------------------------------------- costs per route


def route_costs(cfg: ProjectConfig, f: Facts, shape: costs.ModelShape, hw: costs.Hardware, measured: dict | None = None) -> dict:
    """One-off, per-query and per-year cost of each route. `measured` (route -> {prompt_tokens,
    completion_tokens, items_per_s, training_s}) from real runs replaces the estimates where given."""
    uc, t, prices = cfg.use_case, cfg.training, cfg.prices
    completion = 16
    rag_ctx = min(cfg.rag.max_context_tokens, cfg.rag.top_k * cfg.rag.chunk_tokens)
    prompt_tokens = {
        "prompt": 20 + f.context_tokens + f.query_tokens + (5 * f.shot_tokens if f.examples else 0),
        "hosted": 20 + f.context_tokens + f.query_tokens + (5 * f.shot_tokens if f.examples else 0),
        "rag": 40 + f.context_tokens + f.query_tokens + rag_ctx,
        "fine-tune": 20 + f.query_tokens + min(f.context_tokens, 40),
        "hybrid": 40 + f.query_tokens + rag_ctx,
        "pre-train": 20 + f.query_tokens + min(f.context_tokens, 40),
    }
    train = costs.train_estimate(shape, hw, t.method if t.method != "freeze" else "freeze", f.examples, f.mean_tokens,
                                 t.epochs, t.batch_size, int(max(f.mean_tokens, 8) * 1.3), t.lora.r, t.trainable_layers, t.max_steps,
                                 loss_share=(f.answer_tokens + 2) / f.mean_tokens if f.mean_tokens else 1.0)
    retrains = max(CHANGES_PER_YEAR[uc.data_changes], 0)
    out = {}
    for route in ROUTES:
        m = (measured or {}).get(route, {})
        p_tok = m.get("prompt_tokens", prompt_tokens[route])
        c_tok = m.get("completion_tokens", completion)
        secs = 1 / m["items_per_s"] if m.get("items_per_s") else costs.query_seconds(shape, hw, p_tok, c_tok)
        if route == "hosted":  # billed per token at the endpoint's prices: measured usage where there is one
            in_1m, out_1m = hosted_prices(cfg)
            per_query = m["per_query_usd"] if "per_query_usd" in m else p_tok * in_1m / 1e6 + c_tok * out_1m / 1e6
        else:  # every other route runs on our own hardware
            per_query = costs.query_cost_usd(hw, secs)
        if route in ("fine-tune", "hybrid"):
            tr_usd = m["training_s"] / 3600 * hw.hour_usd if "training_s" in m else train["usd"]
            tr_h = m["training_s"] / 3600 if "training_s" in m else train["hours"]
            tr_usd += prices.engineer_hour_usd
            n_re = max(retrains, CHANGES_PER_YEAR[uc.knowledge_changes] if route == "fine-tune" else 0)
        elif route == "pre-train":
            ptoks = max(uc.domain_corpus_tokens, PRETRAIN_TOKENS)  # what it would take
            tr_h = ptoks * 6 * shape.params / (hw.tflops * 1e12 * costs.TRAIN_EFFICIENCY.get(hw.device, 0.5)) / 3600
            tr_usd, n_re = tr_h * hw.hour_usd, 0
        else:
            tr_usd = tr_h = 0.0
            n_re = 0
        serving_year = per_query * uc.queries_per_day * 365
        out[route] = {"prompt_tokens": round(p_tok, 1), "completion_tokens": round(c_tok, 1), "seconds_per_query": secs,
                      "per_query_usd": per_query, "hosted": route == "hosted", "training_usd": tr_usd,
                      "training_hours": tr_h, "retrains_per_year": n_re, "retraining_usd_per_year": n_re * tr_usd,
                      "serving_usd_per_year": serving_year, "first_year_usd": tr_usd + n_re * tr_usd + serving_year,
                      "measured": bool(m)}
    out["_training_estimate"] = train
    for route in ("fine-tune", "hybrid"):
        for base in ("prompt" if route == "fine-tune" else "rag", "hosted"):
            out[route]["break_even_vs_" + base + "_queries_per_day"] = break_even(out[base], out[route])
    return out


def break_even(cheap_to_start: dict, other: dict) -> float | None:
    """Queries a day above which `other` (a fixed training cost, a lower cost per query) costs less in a year than
    `cheap_to_start`; None when it never does."""
    return costs.break_even_queries_per_day(
        cheap_to_start["training_usd"] + cheap_to_start["retraining_usd_per_year"], cheap_to_start["per_query_usd"],
        other["training_usd"] + other["retraining_usd_per_year"], other["per_query_usd"])


def hosted_prices(cfg: ProjectConfig) -> tuple[float, float]:
    """USD per 1M input and output tokens of the hosted route: the first endpoint variant's prices, else prices.hosted_*."""
    ep = next((v.endpoint for v in cfg.evaluation.variants if v.kind == "endpoint"), None)
    i = ep.price_per_1m_input_tokens if ep and ep.price_per_1m_input_tokens is not None else cfg.prices.hosted_input_per_1m_usd
    o = ep.price_per_1m_output_tokens if ep and ep.price_per_1m_output_tokens is not None else cfg.prices.hosted_output_per_1m_usd
    return i, o


WHAT_TO_MEASURE = {
    "prompt": "zero-shot and few-shot quality on the validation split (tunewise run does this first)",
    "hosted": "the hosted model's quality, tokens and latency on the validation split (an evaluation.variants entry of kind: endpoint)",
    "rag": "retrieval recall@5 and answer quality with context; hallucination rate against the gold passage",
    "fine-tune": "validation quality after a short LoRA run; the loss curve tells whether more steps would pay",
    "hybrid": "ft+rag against rag alone: does the adapter add to retrieval (RAFT-style training data helps)",
    "pre-train": "nothing here: tunewise does not pre-train; measure RAG and fine-tuning first",
}


def advise(cfg: ProjectConfig, tokenizer=None, hw: costs.Hardware | None = None, measured: dict | None = None) -> Advice:
    """The use case's rules, then the routes ranked by points and, on a tie, first-year cost."""
    shape = costs.model_shape(cfg.model.name)
    hw = hw or costs.detect_hardware(cfg, shape)
    f = gather_facts(cfg, tokenizer)
    v = Verdict()
    for rule in RULES:
        rule(cfg.use_case, f, v)
    route_cost = route_costs(cfg, f, shape, hw, measured)
    ranked = sorted(ROUTES, key=lambda r: (-v.points[r], route_cost[r]["first_year_usd"]))
    top = ranked[0]
    return Advice(
        recommendation=top, recommendation_text=ROUTE_TEXT[top],
        ranking=[{"route": r, "points": v.points[r], "reasons": v.reasons[r], "what_to_measure": WHAT_TO_MEASURE[r], "cost": route_cost[r]}
                 for r in ranked],
        facts=f.__dict__, hardware=hw.to_json(),
        model={"name": cfg.model.name, "params": shape.params, "matmul_params": shape.matmul_params, "layers": shape.layers},
        training_estimate=route_cost["_training_estimate"], use_case=cfg.use_case.model_dump(mode="json"),
        prices=cfg.prices.model_dump(mode="json"))
