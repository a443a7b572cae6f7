"""`tunewise run`: the seed workflow, stopping as soon as the goal is met, then a decision report.

Routes in the design's order (cheapest first): prompt (the configured base and few-shot variants) ->
rag (when a knowledge base is configured) -> fine-tune (training settings from train/defaults.py) -> hybrid (ft+rag).
Each route's variants are scored on the validation split; the first route whose best variant reaches
goal.threshold on goal.metric ends the search. The variants tried are then compared on the test split,
and the decision (lowest first-year cost among routes that met the goal) is written with its evidence.

Every step is reused when its inputs are unchanged: prepared data by input hashes, evaluations by
fingerprint, training by a key over the training config, data and model. `steps.json` journals them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import ProjectConfig, VariantConfig, replace
from .data.prepare import ensure_prepared
from .eval.endpoint import EndpointError
from .eval.evaluate import EvalError, compare, evaluate, Engines
from .models import load_tokenizer
from .results import Advice, Comparison, Decision, EvalSummary, EvidenceRow, HostedVsLocal, Roi
from .util import atomic_write_json, sha256_text

ROUTE_OF_KIND = {"base": "prompt", "few-shot": "prompt", "endpoint": "hosted", "rag": "rag", "fine-tuned": "fine-tune", "ft+rag": "hybrid"}
ROUTE_ORDER = ("prompt", "hosted", "rag", "fine-tune", "hybrid")
DEFAULT_VARIANTS = {"prompt": [VariantConfig(name="base", kind="base"), VariantConfig(name="few-shot", kind="few-shot")], "hosted": [],
                    "rag": [VariantConfig(name="rag", kind="rag")], "fine-tune": [VariantConfig(name="fine-tuned", kind="fine-tuned")],
                    "hybrid": [VariantConfig(name="ft+rag", kind="ft+rag")]}

# The demo: every route measured (base, few-shot, a fine-tune trained inside the demo), sized so that `make demo`
# fits in about 10 minutes on a 2-core CPU: 200 validation items give the prompt routes a usable estimate (+-0.05);
# the training budget holds (training.max_minutes).
DEMO = {"validation_samples": 200, "test_samples": 200, "training": {"max_minutes": 4.0, "eval_samples": 64}}


def route_variants(cfg: ProjectConfig) -> dict[str, list[VariantConfig]]:
    out = {r: [v for v in cfg.evaluation.variants if ROUTE_OF_KIND[v.kind] == r] for r in ROUTE_ORDER}
    for r in ROUTE_ORDER:
        if not out[r]:  # hosted has no default: an endpoint is the user's to name
            out[r] = [v.model_copy() for v in DEFAULT_VARIANTS[r]]
    if not cfg.rag.knowledge_base:
        out["rag"], out["hybrid"] = [], []
    return out


def _train_key(cfg: ProjectConfig, prepared) -> str:
    return sha256_text(json.dumps({"training": cfg.training.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                                   "data": prepared.summary.get("outputs"), "max_length": cfg.data.max_length}, sort_keys=True))


def _ensure_trained(cfg: ProjectConfig, prepared, journal: dict, progress) -> dict:
    from .train.loop import train

    train_dir = cfg.train_dir
    key = _train_key(cfg, prepared)
    summary_path = train_dir / "train_summary.json"
    key_path = train_dir / "run_key.txt"
    if summary_path.exists() and key_path.exists() and key_path.read_text() == key and (train_dir / "model").exists():
        journal["training"] = {"reused": True, **json.loads(summary_path.read_text())}
        return journal["training"]
    import shutil

    shutil.rmtree(train_dir, ignore_errors=True)
    progress("training")
    result = train(cfg, train_dir)
    key_path.write_text(key)
    journal["training"] = {"reused": False, **json.loads(summary_path.read_text())} if summary_path.exists() else {"wall_s": result.wall_s}
    return journal["training"]


TEST_SAMPLES = 1000  # the final comparison's default sample: +-0.02 on an accuracy near 0.85 (95% CI), minutes not hours


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class _Journal:
    """steps.json: each step of the run as it finishes, with when (seconds since the start) and what it found."""

    def __init__(self, out: Path, t0: float):
        self.out, self.t0, self.data = out, t0, {"steps": []}

    def __call__(self, name: str, **info) -> None:
        self.data["steps"].append({"step": name, "at_s": round(time.time() - self.t0, 1), **info})
        atomic_write_json(self.out / "steps.json", self.data)

    @property
    def steps(self) -> list[dict]:
        return self.data["steps"]


def _for_split(c: ProjectConfig, split: str, samples: int | None) -> ProjectConfig:
    return replace(c, "evaluation", split=split, max_samples=samples or None)


def run_workflow(cfg: ProjectConfig, progress=None, all_routes: bool = False, validation_samples: int | None = 200,
                 test_samples: int | None = None, gate: bool = True, live=None) -> Decision:
    """The workflow; returns the decision (also written to <run>/run/decision.json and report.html).

    progress(text): one line per step (the plan, each evaluation's measured rate and what the test step will
    take). live(text): transient updates inside a step (items done, rate, time left). test_samples: None is
    evaluation.max_samples or TEST_SAMPLES, 0 the whole split. gate: when the chosen route is a trained model,
    the promotion gate judges it (decision.gate)."""
    from .advise.decide import advise

    progress = progress or (lambda msg: None)
    t0 = time.time()
    if cfg.goal.threshold is None:
        raise EvalError("goal.threshold is not set: tunewise run needs a target (e.g. goal: {metric: accuracy, threshold: 0.85})")
    from .eval.graders import grader_names

    if cfg.goal.metric not in cfg.evaluation.metrics and cfg.goal.metric not in grader_names(cfg):  # a grader is a metric by its name
        cfg = replace(cfg, "evaluation", metrics=[*cfg.evaluation.metrics, cfg.goal.metric])
    if test_samples is None:
        test_samples = cfg.evaluation.max_samples or TEST_SAMPLES
    out = cfg.run_dir / "run"
    out.mkdir(parents=True, exist_ok=True)
    step = _Journal(out, t0)
    tok = load_tokenizer(cfg.model.name, cfg.data.template_kwargs)
    routes = route_variants(cfg)
    val_cfg = _for_split(cfg, "validation", validation_samples)
    engines = Engines(val_cfg)
    not_measured = _check_endpoints(engines, routes, progress)
    progress("preparing data")
    prepared = ensure_prepared(cfg, tok)
    step("data", outputs=prepared.summary.get("outputs"))
    progress("advising")
    before = advise(cfg, tok)
    before.split_shift = prepared.summary.get("split_shift")
    step("advise", recommendation=before.recommendation)

    n_val = min(validation_samples or 10**12, len(prepared.splits["validation"]))
    n_test = min(test_samples or 10**12, len(prepared.splits[cfg.evaluation.split]))
    order = " -> ".join(f"{r} ({', '.join(v.name for v in routes[r])})" for r in ROUTE_ORDER if routes[r])
    progress(f"plan: {order}, {'every route' if all_routes else 'until one meets the goal'}; each variant on {n_val:,} validation "
             f"items, then the variants tried on {n_test:,} of {len(prepared.splits[cfg.evaluation.split]):,} "
             f"{cfg.evaluation.split} items (--test-samples)")
    cfg, tried, validation, met_at, training = _search(cfg, val_cfg, routes, prepared, before, engines, out, step, not_measured,
                                                       all_routes, n_test, progress, live)
    eta = sum(n_test / validation[v.name].items_per_s for _, v in tried)
    progress(f"final comparison on the test split: {n_test:,} items x {len(tried)} variants, about {_minutes(eta)} at the validation rates")
    final = _test_compare(_for_split(cfg, cfg.evaluation.split, test_samples), tried, not_measured, engines, out, live)
    step("test compare", variants=[v.name for _, v in tried])
    decision = decide(cfg, before, tried, validation, final, training, met_at, not_measured)
    decision.wall_s = round(time.time() - t0, 1)
    decision.steps = step.steps
    atomic_write_json(out / "decision.json", decision.to_json())
    from .report.decision_html import decision_report

    decision.report = str(decision_report(decision, out / "report.html"))
    decision.compare_report = final.report
    if gate and decision.chosen in ("fine-tune", "hybrid"):
        from .gate import run_gate

        variant = next(v for _, v in tried if v.name == decision.chosen_variant)
        progress("gate: the chosen fine-tune against production (or the base)")
        # on the run's test items, so the task check takes over the comparison's results instead of scoring them again
        decision.gate = run_gate(_for_split(cfg, cfg.evaluation.split, test_samples), cfg.path(variant.adapter) if variant.adapter else None,
                                 progress=live, reuse_from=[out / "test"])
    atomic_write_json(out / "decision.json", decision.to_json())
    return decision


def _search(cfg: ProjectConfig, val_cfg: ProjectConfig, routes: dict, prepared, before: Advice, engines: Engines, out: Path, step: _Journal,
            not_measured: list[dict], all_routes: bool, n_test: int, progress, live):
    """The routes in order (prompting, RAG, fine-tuning, hybrid), each variant on the validation split, until one meets
    the goal (or through every route). Returns (cfg with the training defaults, tried, validation summaries, the route
    that met the goal, the training summary)."""
    from .train.defaults import auto_training, is_labelled

    goal = cfg.goal
    tried: list[tuple[str, VariantConfig]] = []
    validation: dict[str, EvalSummary] = {}
    met_at, training = None, None
    for route in ROUTE_ORDER:
        if not routes[route]:
            step(route, skipped=_skip_reason(route, not_measured))
            continue
        if route == "fine-tune" or (route == "hybrid" and training is None):
            facts = before.facts  # the training split's size, not the raw file's (advise reads that)
            cfg, notes = auto_training(cfg, len(prepared.splits["train"]), facts["mean_tokens"], before.model["params"], facts.get("answer_tokens"),
                                       before.model.get("layers"), is_labelled(prepared.splits["train"]))
            val_cfg = val_cfg.model_copy(update={"training": cfg.training})
            training = _ensure_trained(cfg, prepared, step.data, progress)
            step("train", defaults=notes, steps=training.get("steps"), wall_s=training.get("wall_s"), reused=training.get("reused"))
        measured = []
        for v in routes[route]:
            progress(f"{route}: {v.name} on the validation split")
            try:
                s = evaluate(val_cfg, v, engines, out / "validation", prepared, reuse=True, progress=live)
            except EndpointError as e:  # a spending cap or an endpoint that stopped answering: reported, not dropped
                not_measured.append({"route": route, "variant": v.name, "reason": str(e)})
                step(f"validate {v.name}", route=route, not_measured=str(e))
                continue
            measured.append(v)
            validation[v.name] = s
            tried.append((route, v))
            if not s.reused:
                progress(f"  {v.name}: {s.items_per_s:.2f} items/s; on {n_test:,} test items about {_minutes(n_test / s.items_per_s)}")
            step(f"validate {v.name}", route=route, value=s.value(goal.metric), reused=s.reused)
        if not measured:
            continue
        best = max(validation[v.name].value(goal.metric) or 0.0 for v in measured)
        if best >= goal.threshold and met_at is None:
            met_at = route
            step("goal met", route=route, value=best, threshold=goal.threshold)
            if not all_routes:
                break
    return cfg, tried, validation, met_at, training


def _check_endpoints(engines: Engines, routes: dict, progress) -> list[dict]:
    """Each endpoint variant's key, reachability and model, before any work; one that fails leaves the search and is
    reported as not measured, with the reason (never silently dropped)."""
    not_measured = []
    for v in list(routes["hosted"]):
        try:
            engines.endpoint(v)
        except EndpointError as e:
            routes["hosted"].remove(v)
            not_measured.append({"route": "hosted", "variant": v.name, "reason": str(e)})
            progress(f"hosted: {v.name} not measured: {e}")
    return not_measured


def _skip_reason(route: str, not_measured: list[dict]) -> str:
    if route == "hosted":
        mine = [f"{n['variant']}: {n['reason']}" for n in not_measured if n["route"] == "hosted"]
        return "not measured (" + "; ".join(mine) + ")" if mine else "no endpoint variant configured (evaluation.variants, kind: endpoint)"
    return "no knowledge base configured (rag.knowledge_base)"


def _test_compare(test_cfg: ProjectConfig, tried: list, not_measured: list[dict], engines: Engines, out, live) -> Comparison:
    """The variants tried, side by side on the test split. An endpoint that fails there (its spending cap, say) leaves the
    comparison with its reason, and the rest is compared (their results are reused)."""
    while True:
        try:
            return compare(replace(test_cfg, "evaluation", variants=[v for _, v in tried]), out_root=out / "test", progress=live, engines=engines)
        except EndpointError as e:
            if e.variant is None or not any(v.name == e.variant for _, v in tried) or len(tried) == 1:
                raise
            tried[:] = [(r, v) for r, v in tried if v.name != e.variant]
            not_measured.append({"route": "hosted", "variant": e.variant, "reason": f"on the test split: {e}"})


def decide(cfg: ProjectConfig, before: Advice, tried, validation: dict[str, EvalSummary], final: Comparison, training: dict | None,
           met_at: str | None, not_measured: list[dict] | None = None) -> Decision:
    """The evidence table per route (its best variant on validation) and the decision with its ROI."""
    from .advise import costs
    from .advise.decide import Facts, route_costs

    goal, uc = cfg.goal, cfg.use_case
    shape = costs.model_shape(cfg.model.name)
    hw = costs.Hardware(**before.hardware)
    best: dict[str, str] = {}
    for route, v in tried:
        if route not in best or (validation[v.name].value(goal.metric) or 0) > (validation[best[route]].value(goal.metric) or 0):
            best[route] = v.name
    rows = [_evidence(cfg, route, v.name, final.variants[v.name], validation[v.name], training, before, shape, hw, best[route] == v.name)
            for route, v in tried]  # one row per variant measured (base, few-shot, fine-tuned...), each with its own costs
    rc = route_costs(cfg, Facts(**before.facts), shape, hw, {})  # estimates, for the routes not tried
    # a goal met on validation whose test CI lies wholly below it is not met: validation did not stand for the test data
    meeting = [r for r in rows if r.meets]
    short = [r for r in rows if not r.meets]
    chosen = min(meeting, key=lambda r: r.first_year_usd) if meeting else max(rows, key=lambda r: r.test or 0)
    cheapest_short = min(short, key=lambda r: r.first_year_usd) if short else None
    beaten = [r for r in rows if r is not chosen and (not r.meets or r.first_year_usd > chosen.first_year_usd)]
    roi = _roi(chosen, cheapest_short, uc) if meeting and cheapest_short else None
    untried = [r for r in ROUTE_ORDER if r not in best]
    return Decision(goal={"metric": goal.metric, "threshold": goal.threshold}, met=bool(meeting), met_at=met_at, chosen=chosen.route,
                    chosen_variant=chosen.variant, evidence=rows, roi=roi,
                    why=_why(chosen, beaten, goal, not_measured or [], meeting, before.split_shift or {}),
                    not_measured=not_measured or [], validation_only=[r.variant for r in rows if r.meets_goal and r.test_below_goal],
                    hosted_vs_local=hosted_vs_local(rows, uc.queries_per_day),
                    advice_before={"recommendation": before.recommendation,
                                   "ranking": [r.model_dump(include={"route", "points", "reasons"}) for r in before.ranking]},
                    estimates_for_untried={r: {k: rc[r][k] for k in ("per_query_usd", "training_usd", "training_hours", "first_year_usd")}
                                           for r in untried if r in rc},
                    hardware=before.hardware, prices=before.prices, use_case=before.use_case, training=training,
                    config_sha256=sha256_text(json.dumps(cfg.resolved(), sort_keys=True)))


def _evidence(cfg: ProjectConfig, route: str, name: str, s: EvalSummary, val: EvalSummary, training: dict | None, before: Advice, shape, hw,
              best_of_route: bool) -> EvidenceRow:
    """One variant's row: its validation and test quality, and its costs from what the test comparison measured."""
    from .advise.decide import Facts, route_costs

    goal = cfg.goal
    measured = {route: {"prompt_tokens": s.prompt_tokens_mean, "completion_tokens": s.completion_tokens_mean, "items_per_s": s.items_per_s}}
    if route == "hosted":  # the bill the endpoint's reported usage makes at its prices
        measured[route]["per_query_usd"] = s.cost_per_1k_queries_usd / 1000
    if route in ("fine-tune", "hybrid") and training and training.get("wall_s"):
        measured[route]["training_s"] = training["wall_s"]
    c = route_costs(cfg, Facts(**before.facts), shape, hw, measured)[route]
    m = s.metrics.get(goal.metric)
    ci = m.ci95 if m else None
    return EvidenceRow(route=route, variant=name, best_of_route=best_of_route, validation=val.value(goal.metric), test=m.mean if m else None,
                       test_ci95=ci, meets_goal=(val.value(goal.metric) or 0) >= goal.threshold, test_below_goal=bool(ci) and ci[1] < goal.threshold,
                       latency_p50_s=s.latency_s.get("p50"), latency_p95_s=s.latency_s.get("p95"), items_per_s=s.items_per_s,
                       prompt_tokens=s.prompt_tokens_mean, per_1k_queries_usd=c["per_query_usd"] * 1000, hosted=c["hosted"],
                       training_usd=c["training_usd"], training_hours=c["training_hours"], retraining_usd_per_year=c["retraining_usd_per_year"],
                       serving_usd_per_year=c["serving_usd_per_year"], first_year_usd=c["first_year_usd"])


def _roi(chosen: EvidenceRow, cheapest_short: EvidenceRow, uc) -> Roi:
    """What the chosen route's extra cost buys over the cheapest route that fell short: more correct answers a year."""
    extra = chosen.first_year_usd - cheapest_short.first_year_usd
    gain = (chosen.test or 0) - (cheapest_short.test or 0)
    more_correct = gain * uc.queries_per_day * 365
    return Roi(against=f"{cheapest_short.variant} ({cheapest_short.route})", extra_cost_usd_per_year=extra, accuracy_gain=gain,
               more_correct_answers_per_year=more_correct, cost_per_extra_correct_answer_usd=extra / more_correct if more_correct > 0 else None,
               roi=(more_correct * uc.value_per_correct_answer_usd - extra) / extra
               if uc.value_per_correct_answer_usd is not None and extra > 0 else None)


def hosted_vs_local(rows: list[EvidenceRow], queries_per_day: int) -> HostedVsLocal | None:
    """The question teams start from: the best hosted variant against the best trained local one (test split), their
    cost per 1k queries and first-year cost at the configured volume, and the volume at which they cost the same."""
    from .advise.decide import break_even

    hosted = [r for r in rows if r.route == "hosted"]
    local = [r for r in rows if r.route in ("fine-tune", "hybrid")]
    if not hosted or not local:
        return None
    h = max(hosted, key=lambda r: r.test or 0)
    lo = max(local, key=lambda r: r.test or 0)
    cost = lambda r: {"training_usd": r.training_usd, "retraining_usd_per_year": r.retraining_usd_per_year,  # noqa: E731
                      "per_query_usd": r.per_1k_queries_usd / 1000}
    return HostedVsLocal(hosted=h.variant, local=lo.variant, hosted_test=h.test, local_test=lo.test, quality_diff=(lo.test or 0) - (h.test or 0),
                         hosted_per_1k_usd=h.per_1k_queries_usd, local_per_1k_usd=lo.per_1k_queries_usd,
                         hosted_first_year_usd=h.first_year_usd, local_first_year_usd=lo.first_year_usd,
                         break_even_queries_per_day=break_even(cost(h), cost(lo)), queries_per_day=queries_per_day,
                         cheaper=lo.variant if lo.first_year_usd < h.first_year_usd else h.variant)


def _why(chosen: EvidenceRow, beaten: list[EvidenceRow], goal, not_measured: list[dict] = (), meeting: list[EvidenceRow] = (),
         shift: dict | None = None) -> str:
    """The decision in a sentence: what was chosen, and why over each route it beat. A goal is 'met' only where the
    test CI agrees; one met on validation alone is said to be."""
    def q(r):
        return f"{r.test:.3f}" if r.test is not None else "n/a"

    def test_ci(r):
        return f"{q(r)} [{r.test_ci95[0]:.3f}, {r.test_ci95[1]:.3f}]" if r.test_ci95 else q(r)

    met = chosen in meeting
    parts = [f"{chosen.variant} ({chosen.route}) {'meets' if met else 'comes closest to'} "
             f"{goal.metric} >= {goal.threshold:g} ({q(chosen)} on test) at ${chosen.first_year_usd:,.0f} in the first year"]
    for r in [chosen, *beaten]:
        if r.meets_goal and r.test_below_goal:
            parts.append(f"{r.variant} met the goal on validation ({r.validation:.3f}) but not on test: its 95% CI {test_ci(r)} lies below "
                         f"{goal.threshold:g}" + (f" (validation and test label distributions differ by {shift['total_variation']:.1%}, "
                                                 "see the data report)" if shift and shift.get("warning") else ""))
    for r in beaten:
        if r.meets_goal and r.test_below_goal:
            continue
        if r not in meeting:
            parts.append(f"{r.variant} falls short ({q(r)})")
        else:
            parts.append(f"{r.variant} also meets it but costs ${r.first_year_usd:,.0f} "
                         f"(${r.per_1k_queries_usd:.3f} per 1k queries against ${chosen.per_1k_queries_usd:.3f})")
    parts += [f"{n['variant']} ({n['route']}) was not measured: {n['reason']}" for n in not_measured]
    return "; ".join(parts) + "."


def demo_config(cfg: ProjectConfig) -> ProjectConfig:
    """The example's config as the demo runs it: the demo's training budget and evaluation sizes fill only
    keys the config (or --set) does not give; one variant of each kind (the example's extra zero-shot variant is
    left out)."""
    t = {k: v for k, v in DEMO["training"].items()
         if k not in cfg.training.model_fields_set and not (k == "max_minutes" and cfg.training.max_steps)}
    cfg = replace(cfg, "training", **t)
    if "perplexity" not in cfg.evaluation.model_fields_set:  # its forward pass does not use the engine's prefix cache
        cfg = replace(cfg, "evaluation", perplexity=False)
    seen: set[str] = set()
    return replace(cfg, "evaluation", variants=[v for v in cfg.evaluation.variants if not (v.kind in seen or seen.add(v.kind))])


def demo(cfg: ProjectConfig, progress=None, live=None) -> Decision:
    """`tunewise run` on the example with every route measured (all_routes), so the decision table holds
    base, few-shot and the fine-tune."""
    return run_workflow(demo_config(cfg), progress, all_routes=True, validation_samples=DEMO["validation_samples"],
                        test_samples=DEMO["test_samples"], live=live)
