"""Graders as OpenAI defines them, one definition for evaluation (`evaluation.graders`: a metric per grader) and for
reinforcement learning (`training.grpo.rewards: [{name: grader, args: {file: ...}}]`).

A grader is the JSON object OpenAI's evals and reinforcement fine-tuning take, in a file (JSON or YAML) or inline:
- `string_check`: `input` against `reference` by `operation` eq | ne | like (contains) | ilike (contains, any case): 1 or 0;
- `text_similarity`: `input` against `reference` by `evaluation_metric`: fuzzy_match (rapidfuzz), bleu (sacrebleu),
  gleu (nltk), meteor (nltk; exact and Porter-stem matches: WordNet's synonym data is not installed), cosine (the
  bundled MiniLM embeddings), rouge_1..rouge_5 and rouge_l (rouge-score, F-measure); the score itself (OpenAI's
  `pass_threshold` is kept in the summary as a pass rate);
- `python`: `source` defining `grade(sample, item) -> float`, run in a separate process with a time limit, a memory
  limit and no network (every socket call refused by an audit hook); an item whose grader fails scores 0 and is reported;
- `score_model`: a judge model asked with `input` (messages, templated) for a number within `range`; the judge is an
  endpoint (`endpoint: {base_url, model, api_key_env, ...}` as an endpoint variant's) or the local model (`model: local`);
- `multi`: named `graders` combined by `calculate_output`, a formula of +, -, *, /, **, min, max, abs over their names.
Templates: `{{sample.output_text}}`, `{{sample.output_json.FIELD}}`, `{{item.FIELD}}` (a record's label, its reference
`answer`, and every extra field of its JSONL line).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import TunewiseError

TEMPLATE = re.compile(r"\{\{\s*(sample|item)\.([A-Za-z0-9_.\-]+)\s*\}\}")
SIMILARITY = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


class GraderError(TunewiseError, ValueError):
    """A grader definition that cannot be used: the message names where (file or config key) and the field."""


def load_definition(spec: Any, where: str, base_dir: Path | None = None) -> dict:
    """A grader's definition from a path (JSON or YAML file) or an inline mapping."""
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise GraderError(f"{where}: grader file not found: {path}")
    import yaml

    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except yaml.YAMLError as e:
        raise GraderError(f"{where}: {path}: not valid JSON or YAML: {e}") from None
    if not isinstance(obj, dict):
        raise GraderError(f"{where}: {path}: expected one grader object")
    return obj


# ---------------------------------------------------------------- templates


def references(text: Any) -> list[tuple[str, str]]:
    """The (sample|item, path) pairs a template (or a list of messages) refers to."""
    if isinstance(text, list):
        return [r for m in text for r in references(m.get("content", "") if isinstance(m, dict) else m)]
    return TEMPLATE.findall(str(text)) if isinstance(text, str) else []


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise KeyError(part)
    return obj


def render(text: str, sample: dict, item: dict) -> str:
    def sub(m: re.Match) -> str:
        value = _lookup(sample if m.group(1) == "sample" else item, m.group(2))
        return value if isinstance(value, str) else json.dumps(value)

    return TEMPLATE.sub(sub, text)


def sample_of(output: str) -> dict:
    try:
        parsed = json.loads(output)
    except (ValueError, TypeError):
        parsed = None
    return {"output_text": output, "output_json": parsed}


def item_of(record) -> dict:
    """What `{{item.X}}` sees: the record's extra fields (its JSONL line's keys beside messages), its label and answer."""
    meta = dict(record.meta) if isinstance(record.meta, dict) else {}
    return {**meta, "label": record.label, "answer": record.answer, "reference_answer": meta.get("reference_answer", record.label or record.answer)}


# ---------------------------------------------------------------- the graders


@dataclass
class Grader:
    name: str
    where: str
    spec: dict
    errors: list = field(default_factory=list)  # (item index, message) of items that could not be graded: scored 0

    def templates(self) -> list:
        return [self.spec.get(k) for k in ("input", "reference") if k in self.spec]

    def check_item(self, item: dict) -> str | None:
        """The first item field a template refers to that this item lacks (None: all present)."""
        for kind, path in [r for t in self.templates() for r in references(t)]:
            if kind == "item":
                try:
                    _lookup(item, path)
                except KeyError:
                    return path
        return None

    def grade(self, samples: list[dict], items: list[dict]) -> list[float]:
        raise NotImplementedError


class StringCheck(Grader):
    OPS: dict[str, Callable[[str, str], bool]] = {"eq": operator.eq, "ne": operator.ne, "like": lambda a, b: b in a,
                                                  "ilike": lambda a, b: b.lower() in a.lower()}

    def grade(self, samples, items):
        op = self.OPS[self.spec["operation"]]
        return [float(op(render(self.spec["input"], s, i), render(self.spec["reference"], s, i))) for s, i in zip(samples, items)]


class TextSimilarity(Grader):
    def grade(self, samples, items):
        metric = self.spec["evaluation_metric"]
        pairs = [(render(self.spec["input"], s, i), render(self.spec["reference"], s, i)) for s, i in zip(samples, items)]
        if metric == "cosine":
            return _cosine(pairs)
        fn = _similarity(metric)
        return [float(fn(a, b)) for a, b in pairs]


def _similarity(metric: str) -> Callable[[str, str], float]:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return lambda a, b: fuzz.ratio(a, b) / 100
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        bleu = BLEU(effective_order=True)
        return lambda a, b: bleu.sentence_score(a, [b]).score / 100
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return lambda a, b: sentence_gleu([b.split()], a.split())
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        class NoSynonyms:  # WordNet's data is a separate download; METEOR keeps its exact and stem stages
            @staticmethod
            def synsets(*_a, **_k):
                return []

        return lambda a, b: meteor_score([b.split()], a.split(), wordnet=NoSynonyms())
    from rouge_score import rouge_scorer

    key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
    scorer = rouge_scorer.RougeScorer([key])
    return lambda a, b: scorer.score(b, a)[key].fmeasure


def _cosine(pairs: list[tuple[str, str]]) -> list[float]:
    import numpy as np

    from ..models import cache_home
    from ..rag.embed import DEFAULT_EMBEDDING, Embedder

    emb = Embedder(DEFAULT_EMBEDDING, cache=cache_home() / "shot-embeddings.sqlite", batch_size=32, pack=False)
    a = emb.encode([x for x, _ in pairs])
    b = emb.encode([y for _, y in pairs])
    emb.close()
    return [float(x) for x in np.sum(a * b, axis=1)]  # the embedder's vectors are unit-length


class PythonGrader(Grader):
    def grade(self, samples, items):
        runner = PythonRunner(self.spec["source"], float(self.spec.get("timeout_s", 10)), int(self.spec.get("memory_mb", 1024)))
        out = []
        try:
            for k, (s, i) in enumerate(zip(samples, items)):
                score, err = runner.grade(s, i)
                if err:
                    self.errors.append((k, err))
                out.append(score)
        finally:
            runner.close()
        return out


class ScoreModel(Grader):
    """A judge asked for a number: the first number in its reply, clamped to `range`; no number scores range[0], reported."""

    judge: Callable[[list[list[dict]]], list[str]] | None = None  # set by graders_for: the endpoint or the local model

    def templates(self):
        return [self.spec.get("input")]

    def grade(self, samples, items):
        lo, hi = self.spec.get("range", [0, 1])
        convs = [[{"role": m["role"], "content": render(m["content"], s, i)} for m in self.spec["input"]] for s, i in zip(samples, items)]
        out = []
        for k, reply in enumerate(self.judge(convs)):
            m = re.search(r"-?\d+(?:\.\d+)?", reply or "")
            if m is None:
                self.errors.append((k, f"the judge's reply has no number: {reply[:80]!r}"))
                out.append(float(lo))
            else:
                out.append(min(float(hi), max(float(lo), float(m.group()))))
        return out


_FORMULA_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow,
                ast.USub: operator.neg, ast.UAdd: operator.pos}
_FORMULA_FNS = {"min": min, "max": max, "abs": abs, "sqrt": math.sqrt, "log": math.log, "exp": math.exp, "floor": math.floor, "ceil": math.ceil}


def formula(text: str, names: set[str], where: str) -> Callable[[dict], float]:
    """calculate_output as a function of the named scores: arithmetic and a few functions, nothing else (no eval)."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise GraderError(f"{where}.calculate_output: not a formula: {e.msg}") from None

    def check(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _FORMULA_OPS:
            check(node.left), check(node.right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _FORMULA_OPS:
            check(node.operand)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            pass
        elif isinstance(node, ast.Name):
            if node.id not in names:
                raise GraderError(f"{where}.calculate_output: {node.id!r} is not one of the graders ({', '.join(sorted(names))})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FORMULA_FNS and not node.keywords:
            for a in node.args:
                check(a)
        else:
            raise GraderError(f"{where}.calculate_output: {ast.unparse(node)!r} is not allowed (numbers, grader names, + - * / **, "
                              f"{', '.join(_FORMULA_FNS)})")

    check(tree)

    def run(node, env):
        if isinstance(node, ast.BinOp):
            return _FORMULA_OPS[type(node.op)](run(node.left, env), run(node.right, env))
        if isinstance(node, ast.UnaryOp):
            return _FORMULA_OPS[type(node.op)](run(node.operand, env))
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        return _FORMULA_FNS[node.func.id](*(run(a, env) for a in node.args))

    return lambda env: float(run(tree, env))


class Multi(Grader):
    parts: dict = {}
    calc: Callable[[dict], float] | None = None

    def templates(self):
        return [t for g in self.parts.values() for t in g.templates()]

    def check_item(self, item):
        return next((m for g in self.parts.values() if (m := g.check_item(item))), None)

    def grade(self, samples, items):
        scores = {n: g.grade(samples, items) for n, g in self.parts.items()}
        for n, g in self.parts.items():
            self.errors += [(k, f"{n}: {e}") for k, e in g.errors]
        out = []
        for k in range(len(samples)):
            try:
                out.append(self.calc({n: s[k] for n, s in scores.items()}))
            except (ArithmeticError, ValueError) as e:
                self.errors.append((k, f"calculate_output: {e}"))
                out.append(0.0)
        return out


CLASSES = {"string_check": StringCheck, "text_similarity": TextSimilarity, "python": PythonGrader, "score_model": ScoreModel, "multi": Multi}


def build(spec: dict, where: str, judge_for=None) -> Grader:
    """A grader from its definition, every field checked (unknown type, missing field, a python source that does not
    compile, a formula over unknown names): GraderError naming where and the field."""
    kind = spec.get("type")
    if kind not in CLASSES:
        raise GraderError(f"{where}.type: unknown grader type {kind!r}; one of {', '.join(TYPES)}")
    name = spec.get("name") or kind
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", str(name)):
        raise GraderError(f"{where}.name: {name!r}: letters, digits, _ and - (it names the metric)")

    def need(*keys):
        for k in keys:
            if k not in spec:
                raise GraderError(f"{where}.{k}: missing (a {kind} grader needs {', '.join(keys)})")

    g = CLASSES[kind](name=str(name), where=where, spec=spec)
    if kind == "string_check":
        need("input", "reference", "operation")
        if spec["operation"] not in StringCheck.OPS:
            raise GraderError(f"{where}.operation: {spec['operation']!r} is not one of {', '.join(StringCheck.OPS)}")
    elif kind == "text_similarity":
        need("input", "reference", "evaluation_metric")
        if spec["evaluation_metric"] not in SIMILARITY:
            raise GraderError(f"{where}.evaluation_metric: {spec['evaluation_metric']!r} is not one of {', '.join(SIMILARITY)}")
    elif kind == "python":
        need("source")
        try:
            compiled = compile(spec["source"], f"<{where}.source>", "exec")
        except SyntaxError as e:
            raise GraderError(f"{where}.source: does not compile: {e.msg} (line {e.lineno})") from None
        if "grade" not in compiled.co_names:
            raise GraderError(f"{where}.source: defines no grade(sample, item) function")
    elif kind == "score_model":
        need("input")
        if not isinstance(spec["input"], list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in spec["input"]):
            raise GraderError(f"{where}.input: expected a list of messages with role and content")
        rng = spec.get("range", [0, 1])
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, (int, float)) for x in rng) and rng[0] < rng[1]):
            raise GraderError(f"{where}.range: expected [low, high] with low < high")
        g.judge = judge_for(spec, where) if judge_for else None
    elif kind == "multi":
        need("graders", "calculate_output")
        if not isinstance(spec["graders"], dict) or not spec["graders"]:
            raise GraderError(f"{where}.graders: expected a mapping of names to graders")
        g.parts = {n: build({"name": n, **sub} if isinstance(sub, dict) else sub, f"{where}.graders.{n}", judge_for) for n, sub in spec["graders"].items()}
        g.calc = formula(str(spec["calculate_output"]), set(g.parts), where)
    for t in g.templates():
        for kind_, path in references(t):
            if kind_ == "sample" and path.split(".")[0] not in ("output_text", "output_json"):
                raise GraderError(f"{where}: {{{{sample.{path}}}}}: a sample has output_text and output_json")
    return g


def check_items(graders: list[Grader], items: list[dict]) -> None:
    """Before any work: every template's item field is in every item (else GraderError naming the grader, the field and
    the first item without it)."""
    for g in graders:
        for k, item in enumerate(items):
            missing = g.check_item(item)
            if missing is not None:
                raise GraderError(f"{g.where}: the template refers to {{{{item.{missing}}}}}, which item {k} does not have "
                                  f"(it has {', '.join(sorted(item)) or 'no fields'})")


# ---------------------------------------------------------------- python graders in a sandboxed process

_RUNNER = r'''
import json, resource, sys
limit_mb = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
def _no_network(event, args):
    if event.startswith("socket.") or event in ("urllib.Request",):
        raise PermissionError("a python grader may not use the network (" + event + ")")
sys.addaudithook(_no_network)
source = json.loads(sys.stdin.readline())
env = {}
exec(compile(source, "<grader>", "exec"), env)
grade = env["grade"]
for line in sys.stdin:
    job = json.loads(line)
    try:
        value = float(grade(job["sample"], job["item"]))
        out = {"score": value}
    except MemoryError:
        out = {"error": "MemoryError: the grader went over its memory limit (memory_mb=%d)" % limit_mb}
    except BaseException as e:
        out = {"error": type(e).__name__ + ": " + str(e)[:300]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
'''


class PythonRunner:
    """One worker process for a python grader: items go one at a time; one that runs past timeout_s kills the worker (a
    new one takes the next item)."""

    def __init__(self, source: str, timeout_s: float, memory_mb: int):
        self.source, self.timeout_s, self.memory_mb = source, timeout_s, memory_mb
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, str(self.memory_mb)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.proc.stdin.write(json.dumps(self.source) + "\n")
        self.proc.stdin.flush()

    def grade(self, sample: dict, item: dict) -> tuple[float, str | None]:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"sample": sample, "item": item}, default=str) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return 0.0, self._died()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.close()
            return 0.0, f"timed out after {self.timeout_s:g} s (timeout_s)"
        line = self.proc.stdout.readline()
        if not line:
            return 0.0, self._died()
        out = json.loads(line)
        if "error" in out:
            return 0.0, out["error"]
        score = out["score"]
        return (score, None) if math.isfinite(score) else (0.0, f"returned {score}")

    def _died(self) -> str:
        err = (self.proc.stderr.read() or "").strip().splitlines()
        self.proc = None
        return "the grader process died" + (f": {err[-1][:300]}" if err else "")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------- for evaluation and rewards


def judges(cfg, engines=None):
    """The judge_for(spec, where) of score_model graders: an endpoint (spec.endpoint) or the local model (model: local)."""
    def judge_for(spec: dict, where: str):
        if "endpoint" in spec:
            from ..config import EndpointConfig, VariantConfig
            from .endpoint import EndpointClient

            try:
                ep = EndpointConfig(**spec["endpoint"])
            except Exception as e:  # noqa: BLE001 - pydantic's message names the field
                raise GraderError(f"{where}.endpoint: {e}") from None
            client = EndpointClient(VariantConfig(name=f"judge-{spec.get('name', 'score_model')}", kind="endpoint", endpoint=ep),
                                    cfg.prices, cfg.endpoint_cache)
            client.check(cfg.use_case.on_premises)
            max_tokens = int((spec.get("sampling_params") or {}).get("max_completion_tokens", 16))
            return lambda convs: [o.text for o in client.generate(convs, max_tokens)]
        if spec.get("model", "local") != "local":
            raise GraderError(f"{where}.model: {spec['model']!r}: a score_model judge is an endpoint (endpoint: {{base_url, model, ...}}) "
                              "or the local model (model: local)")

        def local(convs):
            from ..engine import Engine

            eng = engines._engine(cfg.model.name) if engines is not None else Engine.load(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
            return [o.text for o in eng.generate(convs, max_new_tokens=16)]

        return local

    return judge_for


def graders_for(cfg, specs: list, where: str, engines=None) -> list[Grader]:
    out = []
    for k, spec in enumerate(specs):
        at = f"{where}[{k}]"
        out.append(build(load_definition(spec, at, cfg.base_dir), at, judges(cfg, engines)))
    names = [g.name for g in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise GraderError(f"{where}: two graders are named {dup!r} (each name is a metric)")
    return out


def grade_all(graders: list[Grader], outputs: list[str], records: list) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Per grader, each item's score; and the items that could not be graded (scored 0), with why."""
    samples = [sample_of(o) for o in outputs]
    items = [item_of(r) for r in records]
    scores, errors = {}, {}
    for g in graders:
        g.errors = []
        scores[g.name] = g.grade(samples, items)
        if g.errors:
            errors[g.name] = [{"i": i, "error": e} for i, e in g.errors]
    return scores, errors


def grader_reward(cfg, args: dict, where: str) -> Callable:
    """A GRPO reward from a grader definition (args: file or grader): fn(completion, record) -> float."""
    spec = args.get("file") or args.get("grader")
    if spec is None:
        raise GraderError(f"{where}.args: give file (a grader's JSON/YAML) or grader (inline)")
    g = build(load_definition(spec, where, cfg.base_dir), where, judges(cfg))

    def batch(completions: list[str], records: list) -> list[float]:
        g.errors = []
        return g.grade([sample_of(c) for c in completions], [item_of(r) for r in records])

    def reward(completion: str, record, **_) -> float:
        return batch([completion], [record])[0]

    reward.grader, reward.batch = g, batch
    return reward


def grader_names(cfg) -> list[str]:
    """The metric names evaluation.graders adds (their definitions read, nothing built)."""
    defs = [load_definition(spec, f"evaluation.graders[{k}]", cfg.base_dir) for k, spec in enumerate(cfg.evaluation.graders)]
    return [str(d.get("name") or d.get("type")) for d in defs]
