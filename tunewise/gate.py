"""The promotion gate: a candidate model becomes production only with evidence.

Candidate (default: the project's trained output) against the reference (the registry's production
model for this project, or the base model when there is none), on the same items:

1. task metric on the evaluation split: the candidate must beat the reference by more than
   gate.min_improvement with a paired test p-value below gate.alpha; a negative min_improvement is a
   non-inferiority margin instead (for a pass meant to fix something else, such as restoring refusals): the
   95% CI of the paired difference must lie above it;
2. safety: AdvBench refusal rate may not fall by more than gate.max_refusal_drop;
3. over-refusal: XSTest safe prompts refused may not rise by more than gate.max_over_refusal_rise;
4. forgetting: MMLU accuracy may not fall by more than gate.max_forgetting.

The candidate is registered (copied into the registry) either way; the verdict with every check's
numbers and reasons is written to the registry, to gate.json and to gate.html. A pass promotes it;
--force promotes a failing candidate and records that it was forced. Suite results are cached per
model content and suite settings, so a re-run (or the reference's numbers next time) costs nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import TunewiseError
from .config import ProjectConfig, VariantConfig, replace
from .engine import model_ref_of
from .eval import suites
from .eval.evaluate import Engines, evaluate, load_scores
from .eval.stats import paired_test
from .registry import Registry, dir_sha256, registry_path
from .results import EvalSummary, GateCheck, GateVerdict, SuiteResult
from .util import atomic_write_json, sha256_text, write_jsonl


class GateError(TunewiseError, RuntimeError):
    pass


def _suite_results(cfg: ProjectConfig, engines: Engines, variant: VariantConfig, model_key: str, out: Path,
                   progress=None) -> dict[str, SuiteResult]:
    """AdvBench refusal, XSTest over-refusal (and refusal of its unsafe contrasts), MMLU accuracy."""
    g = cfg.gate
    settings = {k: getattr(g, k) for k in ("advbench_samples", "xstest_samples", "mmlu_samples", "mmlu_subjects", "max_new_tokens",
                                          "safety_system_prompt")}
    key = sha256_text(json.dumps({"model": model_key, "settings": settings, "patterns": suites.REFUSAL_PATTERNS}, sort_keys=True))
    cached = out / "suites.json"
    if cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("key") == key:
            return {s: SuiteResult.model_validate(v) for s, v in saved.items() if s != "key"}
    eng, adapter, _ = engines.get(variant)
    system = cfg.data.system_prompt if g.safety_system_prompt else None
    kw = dict(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, system=system, progress=progress)
    adv = suites.refusal_suite(eng, adapter, suites.advbench_prompts(g.advbench_samples), "advbench", **kw)
    safe = suites.refusal_suite(eng, adapter, suites.xstest_prompts("safe", g.xstest_samples), "xstest-safe", **kw)
    unsafe = suites.refusal_suite(eng, adapter, suites.xstest_prompts("unsafe", g.xstest_samples), "xstest-unsafe", **kw)
    mmlu = suites.forgetting_suite(eng, adapter, suites.mmlu_questions(g.mmlu_samples, g.mmlu_subjects or None),
                                   batch_size=min(g.batch_size, 16), progress=progress)
    result = {}
    for r in (adv, safe, unsafe, mmlu):
        write_jsonl(out / f"{r.suite}.jsonl", r.rows)
        result[r.suite] = r
    atomic_write_json(cached, {"key": key, **{s: r.to_json() for s, r in result.items()}})
    return result


def task_rule_passes(g, diff: float, diff_low: float, p_value: float) -> tuple[bool, str]:
    """The task check: a gain above gate.min_improvement with paired p < gate.alpha; or, with a negative
    min_improvement, non-inferiority: the 95% CI of the paired difference lies above the margin."""
    if g.min_improvement < 0:
        return diff_low > g.min_improvement, f"not worse by {-g.min_improvement:g}: 95% CI of candidate - reference above {g.min_improvement:g}"
    return diff > g.min_improvement and p_value < g.alpha, f"candidate - reference > {g.min_improvement:g} and paired p < {g.alpha:g}"


def _checks(g, metric: str, task: dict[str, EvalSummary], suite: dict[str, dict[str, SuiteResult]], pt,
            task_ref_label: str) -> list[GateCheck]:
    """The task check (paired test against the task reference) and the safety, over-refusal and forgetting checks."""
    def mean(role, s, field):
        return suite[role][s].value(field).mean

    def ci(s, f):
        return {role: suite[role][s].value(f).ci95 for role in ("reference", "candidate")}

    r_task, c_task = task["reference"].value(metric), task["candidate"].value(metric)
    task_ok, task_rule = task_rule_passes(g, c_task - r_task, pt.diff.low, pt.p_value)
    checks = [GateCheck(check=f"task: {metric}" + (f" (vs {task_ref_label})" if g.reference else ""), reference=r_task, candidate=c_task,
                        diff=c_task - r_task, passed=task_ok, rule=task_rule, p_value=pt.p_value, diff_ci95=[pt.diff.low, pt.diff.high],
                        ci95={r: task[r].metrics[metric].ci95 for r in ("reference", "candidate")})]
    # (name, suite, field, passes(reference, candidate), rule)
    for name, s, f, ok, rule in (
        ("safety: AdvBench refusal rate", "advbench", "refusal_rate", lambda r, c: c >= r - g.max_refusal_drop,
         f"falls by at most {g.max_refusal_drop:g}"),
        ("over-refusal: XSTest safe prompts refused", "xstest-safe", "refusal_rate", lambda r, c: c <= r + g.max_over_refusal_rise,
         f"rises by at most {g.max_over_refusal_rise:g}"),
        ("forgetting: MMLU accuracy", "mmlu", "accuracy", lambda r, c: c >= r - g.max_forgetting, f"falls by at most {g.max_forgetting:g}"),
    ):
        r, c = mean("reference", s, f), mean("candidate", s, f)
        checks.append(GateCheck(check=name, reference=r, candidate=c, diff=c - r, passed=ok(r, c), rule=rule, ci95=ci(s, f)))
    return checks


def _references(cfg: ProjectConfig, g, prod) -> tuple:
    """(reference variant, its label, its key) for the suites, and (variant, label) for the task check: the production
    model (or the base), and gate.reference when it names another variant for the task."""
    if prod is not None:
        ref_v = VariantConfig(name="production", kind="fine-tuned", adapter=Path(prod.path))
        ref_label, ref_key = f"production ({prod.ref})", dir_sha256(Path(prod.path))
    else:
        ref_v = VariantConfig(name="base", kind="base")
        ref_label, ref_key = f"base ({cfg.model.name})", f"base:{cfg.model.name}"
    task_ref_v, task_ref_label = ref_v, ref_label
    if g.reference is not None:  # the model being replaced (a hosted one, say) is the task check's reference
        task_ref_v = next(v for v in cfg.evaluation.variants if v.name == g.reference)
        task_ref_label = (f"{task_ref_v.name} ({task_ref_v.endpoint.model} at {task_ref_v.endpoint.base_url})" if task_ref_v.endpoint
                          else task_ref_v.name)
    return ref_v, ref_label, ref_key, task_ref_v, task_ref_label


SUITES = ("advbench", "xstest-safe", "xstest-unsafe", "mmlu")


def run_gate(cfg: ProjectConfig, candidate: Path | None = None, force: bool = False, progress=None, reuse_from: list[Path] = ()) -> GateVerdict:
    """reuse_from: evaluation folders (`tunewise run`'s test comparison) whose results of the same models on the same items
    the task check takes over instead of scoring them again."""
    g = cfg.gate
    name = g.name or cfg.project
    metric = g.metric or cfg.goal.metric
    from .eval.graders import grader_names

    if metric not in cfg.evaluation.metrics and metric not in grader_names(cfg):
        raise GateError(f"gate metric {metric!r} is not among evaluation.metrics {cfg.evaluation.metrics} or evaluation.graders")
    cand_path = Path(cfg.path(candidate) if candidate else cfg.trained_model)
    if not (cand_path / "tunewise.json").exists() and not (cand_path / "config.json").exists() and not (cand_path / "adapter_config.json").exists():
        raise GateError(f"no trained model at {cand_path} (run `tunewise train` first or pass --candidate)")
    reg = Registry(registry_path(cfg))
    prod = reg.production(name)
    out = cfg.run_dir / "gate"
    engines = Engines(cfg)
    cand_v = VariantConfig(name="candidate", kind="fine-tuned", adapter=cand_path)
    ref_v, ref_label, ref_key, task_ref_v, task_ref_label = _references(cfg, g, prod)
    cand_key = dir_sha256(cand_path)
    if prod is not None and cand_key == ref_key:
        raise GateError(f"the candidate at {cand_path} is the production model {prod.ref} already")

    t0 = time.time()
    timings, task, suite = {}, {}, {}
    task_cfg = replace(cfg, "evaluation", perplexity=False)  # the task check compares answers; no reference perplexity pass
    for role, v in (("reference", task_ref_v), ("candidate", cand_v)):
        t = time.time()
        task[role] = evaluate(task_cfg, v, engines, out / "task", reuse=True, progress=progress, reuse_from=reuse_from)
        timings[f"task ({role})"] = time.time() - t
    pt = paired_test(load_scores(cfg, task_ref_v.name, metric, out / "task"), load_scores(cfg, cand_v.name, metric, out / "task"))
    for role, v, key in (("reference", ref_v, ref_key), ("candidate", cand_v, cand_key)):
        t = time.time()
        suite[role] = _suite_results(cfg, engines, v, key, out / role, progress)
        timings[f"suites ({role})"] = time.time() - t
        for s in SUITES:
            timings[f"{s} ({role})"] = suite[role][s].wall_s
    checks = _checks(g, metric, task, suite, pt, task_ref_label)
    passed = all(c.passed for c in checks)
    summaries = {r: {s: suite[r][s].to_json() for s in SUITES} for r in suite}

    base_ref, adapter_dir = model_ref_of(cand_path)
    meta = json.loads((cand_path / "tunewise.json").read_text()) if (cand_path / "tunewise.json").exists() else {}
    datasets = {k: {**v, "path": str(cfg.run_dir / "data" / f"{k}.jsonl")} for k, v in (task["candidate"].data or {}).items()}
    entry = reg.register(name, cand_path, base_model=meta.get("base_model", base_ref), adapter=adapter_dir is not None,
                         run_dir=str(cand_path.parent), datasets=datasets, config=meta.get("config"))
    verdict = {"passed": passed, "forced": force and not passed, "candidate": entry.ref,
               "reference": ref_label if g.reference is None else f"{task_ref_label} (task); {ref_label} (safety, forgetting)",
               "reasons": [c.reason() for c in checks if not c.passed], "checks": [c.to_json() for c in checks], "metric": metric}
    task_json = {r: task[r].to_json() for r in task}
    reg.add_evaluation(entry.id, "gate", {"checks": verdict["checks"], "task": {r: t["metrics"] for r, t in task_json.items()}, "suites": summaries})
    if passed or force:
        reg.promote(entry.id, verdict, forced=force and not passed)
        action = "promoted (forced)" if force and not passed else "promoted"
    else:
        reg.block(entry.id, verdict)
        action = "blocked"
    production = reg.production(name)
    reg.close()
    result = GateVerdict(name=name, action=action, **verdict, production=production.ref if production else None,
                         task={r: {k: t[k] for k in ("metrics", "items", "latency_s", "cost_per_1k_queries_usd")} for r, t in task_json.items()},
                         suites=summaries, examples=_examples(out), timings_s=timings, wall_s=time.time() - t0, registry=str(reg.path))
    atomic_write_json(out / "gate.json", result.to_json())
    from .report.gate_html import gate_report

    result.report = str(gate_report(result.to_json(), out / "gate.html"))
    return result


def _examples(out: Path, k: int = 3) -> dict:
    """A few responses per suite and model for the report: what a refusal and a compliance look like."""
    ex = {}
    for role in ("reference", "candidate"):
        for s in ("advbench", "xstest-safe"):
            p = out / role / f"{s}.jsonl"
            if p.exists():
                rows = [json.loads(x) for x in p.read_text().splitlines()]
                ex[f"{s} ({role})"] = rows[:k]
    return ex
