"""`tunewise eval` / `tunewise compare`: score variants on the same items through the one engine.

A variant is config (evaluation.variants): base (the system prompt, zero-shot), few-shot (k examples
from the training split, nearest by embedding or random), fine-tuned (an adapter or full model).
Each evaluation writes per-item JSONL and a summary with bootstrap CIs, latency, token counts and
cost per 1k queries; compare adds paired tests against the first variant.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..errors import TunewiseError
from ..config import ProjectConfig, VariantConfig
from ..data.prepare import ensure_prepared
from ..data.prepared import NoLabels, Prepared
from ..data.prepared import label_set as labels_of
from ..data.reasoning import strip_reasoning
from ..data.records import Record
from ..data.split import sample_records
from ..engine import Engine, model_ref_of
from ..models import load_tokenizer
from ..results import Comparison, EvalSummary
from ..util import atomic_write_json, rate_and_eta, sha256_file, sha256_text, write_jsonl
from ..metrics import reported_metrics, score
from .stats import bootstrap_ci, paired_test, percentile


class EvalError(TunewiseError, RuntimeError):
    pass


def label_set(cfg: ProjectConfig, prepared: Prepared) -> list[str] | None:
    """The closed answer set evaluation decodes into (evaluation.constrain), or None for free decoding."""
    try:
        return labels_of(cfg, prepared)
    except NoLabels:
        raise EvalError("evaluation.constrain: labels, but the data has no labels (set data.columns.label to the label "
                        "column, or evaluation.constrain: none)") from None


def _user_text(r: Record) -> str:
    return next(m["content"] for m in reversed(r.messages) if m["role"] == "user")


def select_shots(train: list[Record], items: list[Record], k: int, selection: str, seed: int = 0) -> list[list[Record]]:
    if not train:
        raise EvalError("few-shot needs a training split to draw examples from")
    k = min(k, len(train))
    if selection == "random":
        return [random.Random(seed * 1_000_003 + i).sample(train, k) for i in range(len(items))]
    import torch

    from ..models import cache_home
    from ..rag.embed import DEFAULT_EMBEDDING, Embedder

    # Cached by text hash: the training pool is embedded once per machine, not once per evaluation.
    emb = Embedder(DEFAULT_EMBEDDING, cache=cache_home() / "shot-embeddings.sqlite", batch_size=32, pack=False)
    t = torch.from_numpy(emb.encode([_user_text(r) for r in train]))
    q = torch.from_numpy(emb.encode([_user_text(r) for r in items]))
    emb.close()
    top = (q @ t.T).topk(k, dim=1).indices.tolist()
    # Most similar last: closest to the question, where small models attend most.
    return [[train[j] for j in reversed(row)] for row in top]


def build_prompt(record: Record, system: str | None, shots: list[Record] | None) -> list[dict]:
    """The conversation up to (not including) the last assistant turn, with system prompt and shots (the
    base and few-shot variants; RAG variants: rag.answer.rag_conversation)."""
    turns = [m for m in record.messages if m["role"] != "system"][:-1]
    own_system = next((m["content"] for m in record.messages if m["role"] == "system"), None)
    if system and own_system and record.meta.get("tools") and "# Tools\n" in own_system:  # a configured prompt keeps the tools
        system = f"{system}\n\n{own_system[own_system.index('# Tools' + chr(10)):]}"
    msgs = []
    if system or own_system:
        msgs.append({"role": "system", "content": system or own_system})
    for s in shots or []:
        msgs += [{"role": "user", "content": _user_text(s)}, {"role": "assistant", "content": s.answer}]
    return msgs + [{"role": m["role"], "content": m["content"]} for m in turns]


def conversations(cfg: ProjectConfig, variant: VariantConfig, items: list[Record], train: list[Record], engines: Engines, tok):
    """The prompts a variant answers, and for RAG prompts the retrieved contexts (else None). One builder per
    strategy (zero-shot, few-shot, rag), whether a local model or an endpoint answers."""
    if variant.strategy == "rag":
        from ..rag.answer import rag_conversation, rag_prompts

        system = variant.system_prompt or cfg.rag.system_prompt
        contexts = rag_prompts(engines.retriever(), [_user_text(r) for r in items], cfg.rag, tok)
        return [rag_conversation(r.messages[:-1], c.prompt, system) for r, c in zip(items, contexts)], contexts
    system = variant.system_prompt or cfg.data.system_prompt
    shots = select_shots(train, items, variant.k, variant.selection) if variant.strategy == "few-shot" else [None] * len(items)
    return [build_prompt(r, system, s) for r, s in zip(items, shots)], None


class Engines:
    """One loaded base model per reference; adapters attach to it by name."""

    def __init__(self, cfg: ProjectConfig):
        self.cfg = cfg
        self.by_ref: dict[str, Engine] = {}
        self.endpoints: dict = {}  # variant name -> EndpointClient: its spending ledger lasts as long as these engines (one command)
        self._graders = None

    def graders(self) -> list:
        """evaluation.graders, built once (a score_model judge's endpoint checked then)."""
        if self._graders is None:
            from .graders import graders_for

            self._graders = graders_for(self.cfg, self.cfg.evaluation.graders, "evaluation.graders", self)
        return self._graders

    def endpoint(self, variant: VariantConfig):
        """The client of an endpoint variant (kind: endpoint), checked on first use."""
        if variant.name not in self.endpoints:
            from .endpoint import EndpointClient

            self.endpoints[variant.name] = EndpointClient(variant, self.cfg.prices, self.cfg.endpoint_cache)
            self.endpoints[variant.name].check(self.cfg.use_case.on_premises)
        return self.endpoints[variant.name]

    def tokenizer(self):
        """The local model's tokenizer: endpoint variants' RAG context is budgeted with it (the endpoint's own is unknown)."""
        if getattr(self, "_tok", None) is None:
            self._tok = load_tokenizer(self.cfg.model.name, self.cfg.data.template_kwargs)
        return self._tok

    def get(self, variant: VariantConfig) -> tuple[Engine, str | None, str]:
        cfg = self.cfg
        if variant.kind not in ("fine-tuned", "ft+rag"):
            return self._engine(cfg.model.name), None, cfg.model.name
        path = cfg.path(variant.adapter) if variant.adapter else cfg.trained_model
        if not Path(path).exists():
            raise EvalError(f"variant {variant.name}: no trained model at {path} (run `tunewise train` or set adapter)")
        base_ref, adapter_dir = model_ref_of(path)
        if adapter_dir is None:
            return self._engine(base_ref), None, str(path)
        eng = self._engine(base_ref)
        if variant.name not in eng.adapters:
            eng.add_adapter(variant.name, adapter_dir)
        return eng, variant.name, str(path)

    def retriever(self):
        if getattr(self, "_retriever", None) is None:
            from ..rag.retrieve import Retriever

            self._retriever = Retriever(self.cfg)
        return self._retriever

    def _engine(self, ref: str) -> Engine:
        if ref not in self.by_ref:
            self.by_ref[ref] = Engine.load(ref, device=self.cfg.model.device, dtype=self.cfg.model.dtype,
                                           chat_kwargs=self.cfg.data.template_kwargs)  # prompts rendered as training rendered them
        return self.by_ref[ref]


def fingerprint(cfg: ProjectConfig, variant: VariantConfig, prepared: Prepared) -> str:
    """What an evaluation's result depends on: the variant, the evaluation settings, the model (and the
    trained model's record, which changes with every training run), the system prompt and the data."""
    ev = cfg.evaluation.model_dump(mode="json")
    ev.pop("variants")
    ev.pop("processes")  # how many processes generate does not change the results
    ev.pop("perplexity")  # an extra measurement on the same answers: evaluate() checks a saved result has it when asked
    trained = None
    v = variant.model_dump(mode="json")
    v.pop("name")  # what is measured, not what it is called: the gate finds the run's results of the same model
    if v.get("tool_choice") is None:
        v.pop("tool_choice", None)  # unset, as before the key existed: saved results stay reusable
    if variant.kind in ("fine-tuned", "ft+rag"):
        path = Path(cfg.path(variant.adapter) if variant.adapter else cfg.trained_model)
        v["adapter"] = str(path.resolve())
        meta = path / "tunewise.json"
        trained = sha256_text(meta.read_text()) if meta.exists() else None
    kb = None
    if variant.strategy == "rag":
        from ..rag.retrieve import index_dir_of

        chunks = index_dir_of(cfg) / "chunks.jsonl"  # what the index holds (not when it was built)
        kb = {"rag": cfg.rag.model_dump(mode="json"), "index": sha256_file(chunks) if chunks.exists() else None}
    return sha256_text(json.dumps({"variant": v, "evaluation": ev, "model": cfg.model.model_dump(mode="json"),
                                   "trained": trained, "kb": kb, "system_prompt": cfg.data.system_prompt,
                                   "labels": label_set(cfg, prepared),
                                   "data": prepared.summary.get("outputs")}, sort_keys=True))


def _saved(out_dir: Path, fp: str, perplexity: bool) -> EvalSummary | None:
    """A saved result with this fingerprint that has what is asked (the reference perplexity, when asked), else None."""
    if not ((out_dir / "summary.json").exists() and (out_dir / "items.jsonl").exists()):
        return None
    saved = EvalSummary.read(out_dir / "summary.json")
    if saved.fingerprint != fp or (perplexity and saved.reference_perplexity is None):
        return None
    return saved


def _summary(cfg: ProjectConfig, variant: VariantConfig, prepared: Prepared, model_id: str, outs, labels, per_metric: dict, extra: dict,
             nll, wall: float, fp: str, client, graders, grader_errors: dict) -> EvalSummary:
    """summary.json: each metric with its bootstrap CI, latency, throughput, tokens, cost per 1k queries, what was
    measured (fingerprint, config, data) and, for an endpoint, its request statistics."""
    ev = cfg.evaluation
    n = len(outs)
    prompt_tokens = sum(o.prompt_tokens for o in outs) / n
    completion_tokens = sum(o.completion_tokens for o in outs) / n
    if client is not None:  # what the endpoint reported, at its prices
        cost_1k = 1000 * (prompt_tokens * client.in_price + completion_tokens * client.out_price)
    else:
        cost_1k = 1000 * (prompt_tokens * ev.price_per_1k_input_tokens + completion_tokens * ev.price_per_1k_output_tokens) / 1000
    endpoint = None
    if client is not None:
        endpoint = {"base_url": variant.endpoint.base_url, "model": variant.endpoint.model, **client.stats.as_dict(),
                    "cache": str(client.cache.path) if client.cache else None,
                    "price_per_1m_usd": {"input": client.in_price * 1e6, "output": client.out_price * 1e6}}
    return EvalSummary(
        variant=variant.model_dump(mode="json"), model=model_id, split=ev.split, items=n, constrained_to=len(labels) if labels else None,
        metrics={m: bootstrap_ci(per_metric[m]).as_dict() for m in ev.metrics}
        | {m: bootstrap_ci([x for x in v if x is not None]).as_dict() for m, v in extra.items() if any(x is not None for x in v)},
        reference_perplexity=_perplexity(nll),
        latency_s={"p50": percentile([o.latency_s for o in outs], 50), "p95": percentile([o.latency_s for o in outs], 95)},
        items_per_s=n / wall, processes=ev.processes, generated_tokens_per_s=sum(o.completion_tokens for o in outs) / wall,
        prompt_tokens_mean=prompt_tokens, completion_tokens_mean=completion_tokens, cost_per_1k_queries_usd=cost_1k, wall_s=wall,
        data=prepared.summary.get("outputs"), config_sha256=sha256_text(json.dumps(cfg.resolved(), sort_keys=True)), fingerprint=fp,
        config=cfg.resolved(), graders=[g.name for g in graders] if graders else None, grader_errors=grader_errors if graders else None,
        endpoint=endpoint)


def _item_rows(items: list[Record], refs: list[str], outs, per_metric: dict, extra: dict, contexts, nll) -> list[dict]:
    """items.jsonl: each item's input, reference, output, scores, tokens, latency (and retrieval, reference NLL)."""
    rows = []
    for i, (r, o) in enumerate(zip(items, outs)):
        rows.append({"i": i, "source": r.source, "input": _user_text(r), "reference": refs[i], "output": o.text,
                     "scores": {m: v[i] for m, v in per_metric.items()} | {m: v[i] for m, v in extra.items()},
                     "prompt_tokens": o.prompt_tokens,
                     "completion_tokens": o.completion_tokens, "latency_s": round(o.latency_s, 4), "finish_reason": o.finish_reason})
        if contexts:
            rows[-1]["retrieved"] = [h.chunk.citation for h in contexts[i].hits]
            rows[-1]["citations"] = contexts[i].cited(o.text)
        if nll:
            rows[-1]["reference_nll"], rows[-1]["reference_tokens"] = round(nll[i][0], 5), nll[i][1]
    return rows


def _reused(out_dir: Path, fp: str, perplexity: bool, variant: VariantConfig, reuse_from: list[Path]) -> EvalSummary | None:
    """A saved result with this fingerprint: this variant's own, or one in another evaluation folder (copied under
    this variant's name); None when there is none."""
    saved = _saved(out_dir, fp, perplexity)
    if saved is not None:
        saved.reused = True
        return saved
    for root in reuse_from:
        found = next(((d, s) for d in sorted(Path(root).glob("*")) if d.is_dir() and (s := _saved(d, fp, perplexity))), None)
        if found is not None:
            import shutil

            found, saved = found
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found / "items.jsonl", out_dir / "items.jsonl")
            saved.variant, saved.reused_from = variant.model_dump(mode="json"), str(found)
            atomic_write_json(out_dir / "summary.json", saved.to_json())
            saved.reused = True
            return saved
    return None


def evaluate(cfg: ProjectConfig, variant: VariantConfig, engines: Engines | None = None, out_root: Path | None = None,
             prepared: Prepared | None = None, reuse: bool = False, progress=None, reuse_from: list[Path] = ()) -> EvalSummary:
    """Score one variant; with reuse, a saved result with the same fingerprint is returned as it is. reuse_from: other
    evaluation folders (a run's test comparison) whose result of the same model on the same items is taken over
    (copied under this variant's name) instead of being measured again."""
    ev = cfg.evaluation
    engines = engines or Engines(cfg)
    if variant.kind == "endpoint":
        engines.endpoint(variant)  # key, reachability and model checked before any work
    graders = engines.graders()  # every definition checked before any work
    prepared = prepared or ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))
    fp = fingerprint(cfg, variant, prepared)
    out_dir = (out_root or cfg.run_dir / "eval") / variant.name
    if reuse:
        saved = _reused(out_dir, fp, ev.perplexity, variant, reuse_from)
        if saved is not None:
            return saved
    items = sample_records(prepared.splits[ev.split], ev.max_samples)
    if not items:
        raise EvalError(f"the {ev.split} split is empty")
    if graders:
        from .graders import check_items, item_of

        check_items(graders, [item_of(r) for r in items])  # a template's field missing from an item: before generating
    rag = variant.strategy == "rag"
    refs = [r.label or strip_reasoning(r.answer) for r in items]  # answers are scored without their reasoning
    client = engines.endpoint(variant) if variant.kind == "endpoint" else None
    if client is not None:
        eng, adapter, model_id, tok = None, None, f"{variant.endpoint.model} @ {variant.endpoint.base_url}", engines.tokenizer()
    else:
        eng, adapter, model_id = engines.get(variant)
        tok = eng.tok
    if cfg.data.format == "text":  # held-out documents: their perplexity, nothing to generate
        if eng is None:
            raise EvalError(f"variant {variant.name}: an endpoint variant cannot score raw-text perplexity (data.format text)")
        return _evaluate_text(cfg, variant, eng, adapter, model_id, items, out_dir, fp, prepared)
    t0 = time.time()
    convs, contexts = conversations(cfg, variant, items, prepared.splits["train"], engines, tok)
    retrieval_s = time.time() - t0 if rag else 0.0

    t0 = time.time()
    labels = label_set(cfg, prepared)
    on_batch = None
    if progress:
        def on_batch(done: int, total: int) -> None:
            progress(f"{variant.name}: {done:,}/{total:,} items" + rate_and_eta(done, total, time.time() - t0))
    if client is not None:
        outs = _generate_endpoint(client, convs, labels, ev.max_new_tokens, on_batch)
    elif ev.processes > 1:
        outs = generate_sharded(cfg, variant, convs, labels, ev.processes, progress, tools=_item_tools(variant, items))
    else:
        outs = eng.generate(convs, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, adapter=adapter, choices=labels,
                            on_batch=on_batch, **_item_tools(variant, items))
    wall = time.time() - t0 + retrieval_s
    if rag:
        from ..rag.answer import strip_citations

        preds = [strip_reasoning(strip_citations(o.text)) for o in outs]
    else:
        preds = [strip_reasoning(o.text) for o in outs]
    per_metric = {m: _score_alternatives(m, preds, items, refs) for m in ev.metrics}
    extra = _grounding_metrics(items, preds, [o.text for o in outs], contexts, _gold_text_lookup(cfg, engines))

    nll = eng.reference_nll(convs, refs, batch_size=ev.batch_size, adapter=adapter) if ev.perplexity and eng is not None else None
    if eng is not None:
        extra |= _objective_metrics(cfg, eng, adapter, items, convs, preds)
    grader_errors = {}
    if graders:
        from .graders import grade_all

        scored, grader_errors = grade_all(graders, preds, items)
        extra |= scored

    rows = _item_rows(items, refs, outs, per_metric, extra, contexts, nll)
    write_jsonl(out_dir / "items.jsonl", rows)
    summary = _summary(cfg, variant, prepared, model_id, outs, labels, per_metric, extra, nll, wall, fp, client, graders, grader_errors)
    atomic_write_json(out_dir / "summary.json", summary.to_json())
    return summary


def _item_tools(variant: VariantConfig, items: list) -> dict:
    """With the variant's tool_choice: each item's tools for the engine's call grammar (generate's tools=...)."""
    if variant.tool_choice is None or not any((r.meta or {}).get("tools") for r in items):
        return {}
    return {"tools": [(r.meta or {}).get("tools") or None for r in items], "tool_choice": variant.tool_choice}


def _generate_endpoint(client, convs: list[list[dict]], labels: list[str] | None, max_new_tokens: int, on_done) -> list:
    """An endpoint's answers. With a label set, the endpoint is told the labels (its system turn) and its reply mapped to
    the label it names: a hosted model has no token trie to decode through (guided_choice gives vLLM-style servers one)."""
    from .endpoint import label_instruction, match_label

    if labels and client.ep.labels != "none":
        note = label_instruction(labels)
        convs = [[{**m, "content": f"{m['content']}\n\n{note}"} if m["role"] == "system" else m for m in c]
                 if c and c[0]["role"] == "system" else [{"role": "system", "content": note}, *c] for c in convs]
    outs = client.generate(convs, max_new_tokens, choices=labels, on_done=on_done)
    if labels and client.ep.labels != "none":
        import dataclasses

        outs = [dataclasses.replace(o, text=match_label(o.text, labels)) for o in outs]
    return outs


def generate_sharded(cfg: ProjectConfig, variant: VariantConfig, convs: list, labels, processes: int, progress=None,
                     tools: dict | None = None) -> list:
    """The answers from `processes` worker processes (python -m tunewise.eval.shard), each loading the variant's model
    and generating every N-th item, with its share of the CPU threads; gathered back in the items' order."""
    import os
    import subprocess
    import sys
    import tempfile

    from ..engine import Completion

    work = Path(tempfile.mkdtemp(prefix="tunewise-shards-"))
    ev = cfg.evaluation
    jobs = []
    threads = max(1, (os.cpu_count() or 2) // processes)
    for k in range(processes):
        spec = {"config": cfg.resolved(), "base_dir": str(cfg.base_dir), "variant": variant.model_dump(mode="json"),
                "conversations": convs[k::processes], "labels": labels,
                "generate": {"max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size,
                             **({"tools": tools["tools"][k::processes], "tool_choice": tools["tool_choice"]} if tools else {})}}
        (work / f"in-{k}.json").write_text(json.dumps(spec))
        jobs.append(subprocess.Popen([sys.executable, "-m", "tunewise.eval.shard", str(work / f"in-{k}.json"), str(work / f"out-{k}.json")],
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
                                     stderr=subprocess.PIPE, text=True))
    if progress:
        progress(f"{variant.name}: {len(convs):,} items in {processes} processes")
    outs: list = [None] * len(convs)
    for k, p in enumerate(jobs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise EvalError(f"evaluation process {k} of {processes} failed (exit {p.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
        for j, o in enumerate(json.loads((work / f"out-{k}.json").read_text())):
            outs[k + j * processes] = Completion(**o)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return outs


def _objective_metrics(cfg: ProjectConfig, eng: Engine, adapter, items: list[Record], convs, preds: list[str]) -> dict[str, list]:
    """What the training objective optimises, measured on the evaluation items: `reward` (grpo: the configured
    rewards of each answer) and `pref_accuracy` (items that are preference pairs: 1 where the variant gives the
    chosen answer a higher log-likelihood than the rejected one)."""
    from ..data.preference import is_pair

    from ..train.objectives import objective_of

    out: dict[str, list] = objective_of(cfg).eval_metrics(preds, items)
    if items and all(is_pair(r) for r in items):
        chosen = eng.reference_nll(convs, [r.answer for r in items], batch_size=cfg.evaluation.batch_size, adapter=adapter)
        rejected = eng.reference_nll(convs, [r.meta["rejected"] for r in items], batch_size=cfg.evaluation.batch_size, adapter=adapter)
        out["pref_accuracy"] = [float(c[0] < r[0]) for c, r in zip(chosen, rejected)]
    return out


def _evaluate_text(cfg: ProjectConfig, variant: VariantConfig, eng: Engine, adapter, model_id: str, items: list[Record], out_dir: Path,
                   fp: str, prepared: Prepared) -> EvalSummary:
    """Perplexity of held-out documents (data.format text) in data.max_length blocks, with a bootstrap CI over blocks."""
    from ..data.text import text_blocks

    t0 = time.time()
    blocks, _ = text_blocks(eng.tok, items, cfg.data.max_length)
    nll = eng.text_nll([b.input_ids for b in blocks], batch_size=cfg.evaluation.batch_size, adapter=adapter)
    wall = time.time() - t0
    per_token = [x / max(n, 1) for x, n in nll]
    write_jsonl(out_dir / "items.jsonl", [{"i": i, "source": b.source, "scores": {"nll_per_token": round(pt, 6)}, "nll": round(x, 5), "tokens": n}
                                          for i, (b, (x, n), pt) in enumerate(zip(blocks, nll, per_token))])
    summary = EvalSummary(variant=variant.model_dump(mode="json"), model=model_id, split=cfg.evaluation.split, items=len(blocks),
                          documents=len(items), metrics={"nll_per_token": bootstrap_ci(per_token).as_dict()}, reference_perplexity=_perplexity(nll),
                          latency_s={"p50": 0.0, "p95": 0.0}, items_per_s=len(blocks) / max(wall, 1e-9), wall_s=wall,
                          data=prepared.summary.get("outputs"), config_sha256=sha256_text(json.dumps(cfg.resolved(), sort_keys=True)),
                          fingerprint=fp, config=cfg.resolved())
    atomic_write_json(out_dir / "summary.json", summary.to_json())
    return summary


def _score_alternatives(metric: str, preds: list[str], items: list[Record], refs: list[str]) -> list[float]:
    """Per-item score; where a record lists several acceptable answers (meta.answers, as SQuAD does), the best."""
    scores = score(metric, preds, refs)
    for i, r in enumerate(items):
        alts = r.meta.get("answers") if isinstance(r.meta, dict) else None
        if isinstance(alts, list) and alts:
            scores[i] = max([scores[i]] + score(metric, [preds[i]] * len(alts), [str(a) for a in alts]))
    return scores


def _gold_text_lookup(cfg: ProjectConfig, engines: Engines):
    """source -> text of the knowledge-base chunks of that source, when the project has an index (else None)."""
    from ..rag.retrieve import index_dir_of

    if not cfg.rag.knowledge_base or not (index_dir_of(cfg) / "manifest.json").exists():
        return None
    by_source: dict[str, list[str]] = {}
    for c in engines.retriever().chunks:
        by_source.setdefault(c.source, []).append(c.text)
        by_source.setdefault(c.source.split("#", 1)[-1], []).append(c.text)
    return lambda sources: "\n".join(t for s in sources for t in by_source.get(s, [])) or None


def _grounding_metrics(items: list[Record], preds: list[str], raw: list[str], contexts, gold_text=None) -> dict[str, list]:
    """Hallucination (answer not supported by its evidence), and for RAG variants retrieval recall@k, MRR and
    citation precision, where the records name their gold passages (meta.gold_sources) or evidence.

    Evidence: the retrieved context for RAG variants; otherwise the record's meta.evidence, or the text of
    its gold passages in the knowledge base (so closed-book answers are held to the same passages)."""
    from ..rag.answer import citation_precision, gold_rank, is_abstention, supported

    out: dict[str, list] = {}
    golds = [r.meta.get("gold_sources") if isinstance(r.meta, dict) else None for r in items]
    evidence_text = [r.meta.get("evidence") if isinstance(r.meta, dict) else None for r in items]
    answers = [[str(a) for a in (r.meta.get("answers") or [r.answer])] if isinstance(r.meta, dict) else [r.answer] for r in items]
    if contexts is not None:
        evidence = [c.text for c in contexts]
    elif any(evidence_text):
        evidence = evidence_text
    elif gold_text is not None and any(golds):
        evidence = [gold_text(g) if g else None for g in golds]
    else:
        return out
    out["hallucination"] = [None if ev is None else float(not is_abstention(p) and not supported(p, ev)) for p, ev in zip(preds, evidence)]
    out["abstained"] = [float(is_abstention(p)) for p in preds]
    if contexts is not None and any(golds):
        ranks = [gold_rank(c.ranked, g) if g else None for c, g in zip(contexts, golds)]
        out["recall@1"] = [None if r is None and not g else float(r is not None and r <= 1) for r, g in zip(ranks, golds)]
        out["recall@5"] = [None if r is None and not g else float(r is not None and r <= 5) for r, g in zip(ranks, golds)]
        out["mrr"] = [None if r is None and not g else (1.0 / r if r else 0.0) for r, g in zip(ranks, golds)]
    if contexts is not None:
        out["citation_precision"] = [citation_precision(c, text, ans) for c, text, ans in zip(contexts, raw, answers)]
    return out


def _perplexity(nll: list[tuple[float, int]] | None) -> dict | None:
    """Corpus perplexity exp(sum NLL / sum tokens), with a bootstrap CI over items on the per-token NLL."""
    if not nll:
        return None
    import math

    import numpy as np

    total, tokens = np.array([x for x, _ in nll]), np.array([n for _, n in nll])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(nll), size=(2000, len(nll)))
    boot = np.exp(total[draws].sum(axis=1) / np.maximum(tokens[draws].sum(axis=1), 1))
    return {"mean": math.exp(total.sum() / max(tokens.sum(), 1)), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))], "n": len(nll)}


def load_scores(cfg: ProjectConfig, name: str, metric: str, out_root: Path | None = None) -> list[float]:
    path = (out_root or cfg.run_dir / "eval") / name / "items.jsonl"
    return [json.loads(line)["scores"][metric] for line in path.read_text().splitlines()]


def compare(cfg: ProjectConfig, names: list[str] | None = None, out_root: Path | None = None, progress=None,
            reuse: bool = True, engines: Engines | None = None) -> Comparison:
    """Evaluate the variants on the same items (reusing results whose fingerprint still matches), then
    paired tests against the first, compare.json and the HTML report."""
    from ..tracking import require

    require(cfg.tracking)
    variants = [v for v in cfg.evaluation.variants if not names or v.name in names]
    missing = set(names or []) - {v.name for v in variants}
    if missing:
        raise EvalError(f"unknown variant(s) {sorted(missing)}; configured: {[v.name for v in cfg.evaluation.variants]}")
    engines = engines or Engines(cfg)
    for v in variants:  # every endpoint checked (key, reachable, model served) before any work
        if v.kind == "endpoint":
            engines.endpoint(v)
    engines.graders()
    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))  # once for all variants
    summaries = {}
    for v in variants:
        if progress:
            progress(v.name)
        summaries[v.name] = evaluate(cfg, v, engines, out_root, prepared, reuse=reuse, progress=progress)
    first = variants[0].name
    paired = {}
    metrics = ["nll_per_token"] if cfg.data.format == "text" else [*cfg.evaluation.metrics, *(g.name for g in engines.graders())]  # the paired tests
    for v in variants[1:]:
        paired[v.name] = {m: paired_test(load_scores(cfg, first, m, out_root), load_scores(cfg, v.name, m, out_root)).as_dict()
                          for m in metrics}
    result = Comparison(reference_variant=first, variants=summaries, paired_vs_reference=paired)
    eval_dir = out_root or cfg.run_dir / "eval"
    atomic_write_json(eval_dir / "compare.json", result.to_json())
    from ..report.html import compare_report

    result.report = str(compare_report(result, eval_dir, reported_metrics(cfg, summaries.values())))
    track_evaluation(cfg, "compare", result, [eval_dir / "compare.json", Path(result.report)])
    return result


def track_evaluation(cfg: ProjectConfig, stage: str, result: Comparison, files=()) -> None:
    """The evaluation summaries (each metric's mean and CI per variant, latency, cost, paired p-values) and the
    report to the project's trackers, as one run of the stage."""
    from ..tracking import Tracker

    tracker = Tracker(cfg, stage)
    if not tracker:
        return
    tracker.params({"evaluation": {k: v for k, v in cfg.evaluation.model_dump(mode="json").items() if k != "variants"},
                    "variants": {name: s.model for name, s in result.variants.items()}})
    values = {}
    for name, s in result.variants.items():
        for metric, m in s.metrics.items():
            values[f"{name}.{metric}"] = m.mean
            if m.ci95:
                values[f"{name}.{metric}.ci_low"], values[f"{name}.{metric}.ci_high"] = m.ci95
        for key, v in (("latency_p50_s", s.latency_s.get("p50")), ("items_per_s", s.items_per_s),
                       ("cost_per_1k_queries_usd", s.cost_per_1k_queries_usd), ("items", s.items)):
            if v is not None:
                values[f"{name}.{key}"] = v
    for name, tests in result.paired_vs_reference.items():
        for metric, test in tests.items():
            values[f"{name}.{metric}.p_vs_reference"] = test.p_value
    tracker.metrics(values, 0)
    for f in files:
        tracker.artifact(Path(f))
    tracker.close()
