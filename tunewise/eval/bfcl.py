"""`tunewise eval CONFIG --suite bfcl`: the Berkeley Function Calling Leaderboard's non-live AST categories, scored by
BFCL's own checker.

The questions and possible answers are the ones the `bfcl-eval` package ships (Apache-2.0; installed by `make` without
its dependencies: only its data and its AST checker are used). Each question's functions become the record's tools and
are put in the system turn in the text form training uses (data/tools.py), the model answers, its `<tool_call>` blocks
are parsed, and `bfcl_eval.eval_checker.ast_eval.ast_checker` judges them: function name, required parameters, each
value among the possible answers under BFCL's type and string rules, parallel calls in any order. Irrelevance is
correct when no call is made. Each category is reported with a bootstrap 95% CI, and the mean over simple_python,
multiple, parallel and parallel_multiple (BFCL's non-live AST average) beside irrelevance.

BFCL's checker imports its table of hosted models only to rename dotted function names for APIs that forbid dots; the
text form keeps them, so that table is replaced by one that renames nothing (no other part of it is used).
"""

from __future__ import annotations

import json
import random
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

from ..errors import TunewiseError
from ..results import BfclCategory, BfclReport
from ..util import atomic_write_json, rate_and_eta, write_jsonl
from .stats import bootstrap_ci

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
AST_CATEGORIES = CATEGORIES[:4]
TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer", "string": "string", "boolean": "boolean",
         "array": "array", "object": "object", "number": "number"}


class BfclError(TunewiseError, RuntimeError):
    pass


def data_dir() -> Path:
    try:
        import bfcl_eval
    except ImportError:
        raise BfclError("the BFCL suite needs the bfcl-eval package (make install adds it: pip install --no-deps bfcl-eval)") from None
    return Path(bfcl_eval.__file__).parent / "data"


def checker():
    """BFCL's ast_checker and its Language enum, its hosted-model table replaced by one that renames nothing."""
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.MODEL_CONFIG_MAPPING = defaultdict(lambda: types.SimpleNamespace(underscore_to_dot=False))
        sys.modules[name] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return ast_checker, Language.PYTHON


def schema_of(bfcl: dict) -> dict:
    """A BFCL parameter description as JSON schema (dict -> object, float -> number, tuple -> array, any -> no type)."""
    out = {k: v for k, v in bfcl.items() if k not in ("type", "properties", "items")}
    t = bfcl.get("type")
    if t in TYPES:
        out["type"] = TYPES[t]
    if isinstance(bfcl.get("properties"), dict):
        out["properties"] = {k: schema_of(v) for k, v in bfcl["properties"].items()}
    if isinstance(bfcl.get("items"), dict):
        out["items"] = schema_of(bfcl["items"])
    return out


def tools_of(functions: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": schema_of(f.get("parameters") or {"type": "dict", "properties": {}})}}
            for f in functions]


def load(category: str, samples: int | None = None, seed: int = 0) -> list[dict]:
    """A category's questions with their possible answers (a seeded sample of `samples`)."""
    if category not in CATEGORIES:
        raise BfclError(f"--categories: {category!r} is not one of {', '.join(CATEGORIES)}")
    d = data_dir()
    questions = [json.loads(x) for x in (d / f"BFCL_v4_{category}.json").read_text().splitlines() if x.strip()]
    answers = {}
    if category != "irrelevance":
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, (d / "possible_answer" / f"BFCL_v4_{category}.json").read_text().splitlines())}
    items = [{**q, "ground_truth": answers.get(q["id"])} for q in questions]
    if samples and samples < len(items):
        items = sorted(random.Random(seed).sample(items, samples), key=lambda x: x["id"])
    return items


def prompt_of(item: dict, system: str | None, shots: list[dict] | None = None) -> list[dict]:
    """The question's turns with its functions in the system turn; shots (a few-shot variant's examples, text-form
    user/assistant turns from the training split) go before the question."""
    from ..data.tools import render_text

    turns = [{"role": m["role"], "content": m["content"]} for m in item["question"][0]]
    if system and not (turns and turns[0]["role"] == "system"):
        turns = [{"role": "system", "content": system}, *turns]
    if shots:
        at = 1 if turns and turns[0]["role"] == "system" else 0
        turns = [*turns[:at], *shots, *turns[at:]]
    return render_text(turns, tools_of(item["function"]))


def shot_pool(cfg, variant) -> list:
    """A few-shot variant's candidates: the training split's conversations with tools whose first question was answered."""
    from ..data.prepare import ensure_prepared
    from ..models import load_tokenizer

    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))
    pool = [r for r in prepared.splits["train"] if (r.meta or {}).get("tools") and _exchange(r)]
    if not pool:
        raise BfclError(f"variant {variant.name}: few-shot draws its examples from the training split, and none of it calls tools")
    return pool


def shots_for(pool: list, variant, items: list[dict]) -> list[list[dict]]:
    """A few-shot variant's examples for each question: k conversations of the pool (shot_pool), nearest by their
    question (or a seeded draw, `selection`), each as its question and the answer that followed it (the calls, in the
    text form training uses). Their functions are not added to the question's: the shots show the form, and the
    question's own functions are the only ones it may call."""
    from ..data.records import Record
    from .evaluate import select_shots

    asked = [Record(messages=[{"role": "user", "content": it["question"][0][-1]["content"]}], source=it["id"]) for it in items]
    return [[turn for r in chosen for turn in _exchange(r)] for chosen in select_shots(pool, asked, variant.k, variant.selection)]


def _exchange(r) -> list[dict]:
    """A conversation's first question and the assistant turn that answered it (its calls, or text), or [] if none."""
    msgs = r.messages
    i = next((k for k, m in enumerate(msgs) if m["role"] == "user"), None)
    if i is None or i + 1 >= len(msgs) or msgs[i + 1]["role"] != "assistant":
        return []
    return [{"role": "user", "content": msgs[i]["content"]}, {"role": "assistant", "content": msgs[i + 1]["content"]}]


def judge(item: dict, category: str, text: str) -> tuple[bool, list, str | None]:
    """(correct, the calls as BFCL reads them, the checker's error)."""
    from ..metrics import parse_calls

    parsed = parse_calls(text)
    calls = [{c["name"]: c["arguments"]} for c in parsed if c["name"] is not None]
    malformed = len(calls) != len(parsed)
    if category == "irrelevance":
        return not parsed, calls, None if not parsed else "made a call where no function fits"
    if malformed:
        return False, calls, "a <tool_call> block that is not a JSON call"
    check, python = checker()
    result = check(item["function"], calls, item["ground_truth"], python, category, "tunewise")
    errors = result.get("error") or []
    return bool(result["valid"]), calls, None if result["valid"] else "; ".join(map(str, errors if isinstance(errors, list) else [errors]))[:300]


def call_grammars(eng, items: list[dict], tool_choice: str | None) -> list | None:
    """With a variant's tool_choice: each item's call grammar (data.tools.call_grammar), as `serve` would hold the answer to
    its functions. An item whose parameters xgrammar cannot compile is decoded freely, and counted (BfclReport.unconstrained)."""
    from ..data.tools import ToolError, call_grammar
    from ..engine import ChoiceError

    if tool_choice is None:
        return None
    out = []
    for it in items:
        try:
            out.append(eng.grammar("structural_tag", call_grammar(tools_of(it["function"]), tool_choice)))
        except (ChoiceError, ToolError):
            out.append(None)
    return out


def run_bfcl(cfg, variant, categories=CATEGORIES, samples: int | None = None, max_new_tokens: int = 128, out_root: Path | None = None,
             progress=None) -> BfclReport:
    """Score one variant (base, few-shot or fine-tuned: a local model) on the BFCL categories; writes items.jsonl per category and
    summary.json under <run>/eval/bfcl/<variant>/."""
    from .evaluate import Engines

    if variant.kind not in ("base", "few-shot", "fine-tuned"):
        raise BfclError(f"variant {variant.name}: the BFCL suite scores a local model (kind base, few-shot or fine-tuned), not {variant.kind}")
    pool = shot_pool(cfg, variant) if variant.kind == "few-shot" else None  # its examples checked before the model loads
    engines = Engines(cfg)
    eng, adapter, model_id = engines.get(variant)
    out = (out_root or cfg.run_dir / "eval" / "bfcl") / variant.name
    system = variant.system_prompt
    summary = BfclReport(variant=variant.model_dump(mode="json"), model=model_id, max_new_tokens=max_new_tokens, samples_per_category=samples)
    t_all = time.time()
    for category in categories:
        items = load(category, samples)
        t0 = time.time()
        on_batch = (lambda d, t: progress(f"bfcl {category}: {d}/{t}" + rate_and_eta(d, t, time.time() - t0))) if progress else None
        grammars = call_grammars(eng, items, variant.tool_choice)
        shots = shots_for(pool, variant, items) if pool is not None else [None] * len(items)
        outs = eng.generate([prompt_of(it, system, sh) for it, sh in zip(items, shots)], max_new_tokens=max_new_tokens, batch_size=cfg.evaluation.batch_size,
                            adapter=adapter, on_batch=on_batch, grammar=grammars)
        rows, scores = [], []
        for k, (it, o) in enumerate(zip(items, outs)):
            ok, calls, error = judge(it, category, o.text)
            scores.append(float(ok))
            rows.append({"id": it["id"], "output": o.text, "calls": calls, "correct": ok, "error": error,
                         **({"constrained": grammars[k] is not None} if grammars else {})})
        if grammars:
            summary.unconstrained += sum(g is None for g in grammars)
        write_jsonl(out / f"{category}.jsonl", rows)
        summary.categories[category] = BfclCategory(**bootstrap_ci(scores).as_dict(), wall_s=round(time.time() - t0, 1))
    ast = [summary.categories[c].mean for c in AST_CATEGORIES if c in summary.categories]
    summary.non_live_ast_mean = sum(ast) / len(ast) if len(ast) == len(AST_CATEGORIES) else None
    summary.irrelevance = summary.categories["irrelevance"].mean if "irrelevance" in summary.categories else None
    summary.wall_s = round(time.time() - t_all, 1)
    atomic_write_json(out / "summary.json", summary.to_json())
    summary.dir = str(out)
    return summary
