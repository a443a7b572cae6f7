"""The typed results of the stages: what `evaluate`, `compare`, `run_workflow`, `run_gate`, `run_monitor` and `retrain`
return (and `tunewise kb`, `export` and the gate's suites), with the JSON they write (`to_json`) and read back (`read`).

Each is a pydantic model whose fields are the keys of the JSON file the stage writes (summary.json, compare.json,
decision.json, gate.json, monitor.json), so
the shape of a result is written down here, a typo is an AttributeError at the line that makes it, and a file
written by an older version still opens: unknown keys are kept (extra="allow") and keys added later have
defaults. Training's result is `train.loop.TrainResult` (a dataclass, train_summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")
    omit_none: ClassVar[bool] = False  # write optional parts only where they were measured (no nulls in the file)

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=self.omit_none)

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate(json.loads(Path(path).read_text()))


class Estimate(Result):
    """A metric's mean over the items with its 95% bootstrap CI (`eval.stats.bootstrap_ci`)."""

    mean: float
    ci95: list[float] | None = None
    n: int = 0

    def __str__(self) -> str:
        return f"{self.mean:.3f}" + (f" [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}]" if self.ci95 else "")


class PairedTest(Result):
    """A variant against the comparison's reference on the same items: the mean difference (variant - reference) with
    its CI, and the two-sided sign-flip permutation p-value (`eval.stats.paired_test`)."""

    diff: Estimate
    p_value: float


class EvalSummary(Result):
    """`tunewise eval`: one variant scored on the evaluation split (summary.json beside its items.jsonl)."""

    variant: dict[str, Any]  # the VariantConfig as configured
    model: str  # what answered: a model reference, or "MODEL @ BASE_URL" for an endpoint
    split: str
    items: int
    metrics: dict[str, Estimate] = {}
    reference_perplexity: Estimate | None = None  # the reference answers' perplexity under the variant (evaluation.perplexity)
    latency_s: dict[str, float] = {}  # p50, p95
    items_per_s: float = 0.0
    generated_tokens_per_s: float | None = None
    processes: int = 1
    prompt_tokens_mean: float = 0.0
    completion_tokens_mean: float = 0.0
    cost_per_1k_queries_usd: float = 0.0
    wall_s: float = 0.0
    constrained_to: int | None = None  # the size of the label set decoding was held to
    documents: int | None = None  # held-out text (data.format text): the documents the blocks came from
    data: Any = None  # the prepared data's outputs (paths and hashes)
    config_sha256: str = ""
    fingerprint: str = ""
    config: dict[str, Any] = {}
    graders: list[str] | None = None
    grader_errors: dict[str, Any] | None = None  # items a grader could not score (scored 0), with why
    endpoint: dict[str, Any] | None = None  # an endpoint variant's request statistics, spend and prices
    reused_from: str | None = None  # the evaluation folder this result was taken over from
    reused: bool = Field(False, exclude=True)  # returned from disk rather than measured now (never written)

    omit_none: ClassVar[bool] = True  # the optional parts only where they were measured

    @property
    def kind(self) -> str:
        return self.variant.get("kind", "")

    def value(self, metric: str) -> float | None:
        """The metric's mean, None where this evaluation did not measure it."""
        m = self.metrics.get(metric)
        return None if m is None else m.mean


class Comparison(Result):
    """`tunewise compare`: the variants on the same items, each against the first (compare.json)."""

    reference_variant: str
    variants: dict[str, EvalSummary]
    paired_vs_reference: dict[str, dict[str, PairedTest]] = {}
    report: str | None = None  # compare.html

    def paired(self, variant: str, metric: str) -> PairedTest | None:
        return self.paired_vs_reference.get(variant, {}).get(metric)

    def to_json(self) -> dict:
        return {**self.model_dump(mode="json"), "variants": {k: v.to_json() for k, v in self.variants.items()}}


class RouteAdvice(Result):
    """One route as `tunewise advise` ranks it: its points and reasons from the use case, what to measure, its costs."""

    route: str
    points: int | float
    reasons: list[str] = []
    what_to_measure: str = ""
    cost: dict[str, Any] = {}  # per_query_usd, prompt_tokens, training_usd, training_hours, first_year_usd, break-evens


class Advice(Result):
    """`tunewise advise`: the route the use case points to before anything is measured, with the facts it rests on."""

    recommendation: str
    recommendation_text: str = ""
    ranking: list[RouteAdvice]
    facts: dict[str, Any] = {}  # what the data and knowledge base are (examples, tokens, answer tokens, ...)
    hardware: dict[str, Any] = {}
    model: dict[str, Any] = {}  # name, params, matmul_params, layers
    training_estimate: dict[str, Any] = {}
    use_case: dict[str, Any] = {}
    prices: dict[str, Any] = {}
    split_shift: dict[str, Any] | None = None  # set by `tunewise run`: the label shift between the prepared splits

    def route(self, name: str) -> RouteAdvice:
        return next(r for r in self.ranking if r.route == name)


class TuneTrial(Result):
    """One Optuna trial of `tunewise tune`, with what it recorded (its training's steps and loss, the CI, its notes)."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    value: float | None = None
    params: dict[str, Any] = {}
    duration_s: float | None = None
    is_defaults: bool = False  # the settings train/defaults.py picks, tried first
    ci95: list[float] | None = None
    steps: int | None = None
    best_val_loss: float | None = None
    wall_s: float | None = None


class TuneBest(Result):
    number: int
    value: float
    ci95: list[float] | None = None
    params: dict[str, Any] = {}
    is_defaults: bool = False


class TuneResult(Result):
    """`tunewise tune`: the study's best trial, how to apply it, the importances and every trial (trials.json)."""

    study: str
    direction: str  # minimize | maximize
    objective: str  # what was optimised, in words
    best: TuneBest
    defaults: dict[str, Any] | None = None  # the defaults' trial, when another won
    importances: dict[str, float] = {}
    trials: list[TuneTrial] = []
    best_yaml: str
    set: str  # the --set flags that apply the best trial
    report: str | None = None

    @property
    def completed(self) -> list[TuneTrial]:
        return [t for t in self.trials if t.state == "COMPLETE"]


class HarvestReport(Result):
    """`tunewise data harvest`: the served responses with feedback turned into training files (report.json)."""

    log: str
    out: str
    requests: int = 0
    with_feedback: int = 0
    neutral: int = 0
    raw_prompt_skipped: int = 0
    written: dict[str, int] = {}  # sft, preference, kto: records written
    set_aside: int = 0
    reasons: dict[str, int] = {}
    cleaning: dict[str, Any] = {}  # per cleaning step: changed, dropped, examples


class ConvertReport(Result):
    """`tunewise data convert`: a tool-use dataset in its own form, written as OpenAI chat JSONL."""

    source: str  # api-bank | toolrl
    input: str
    out: str
    records: int
    written: int
    bad: int = 0
    bad_file: str | None = None  # OUT.bad.jsonl: each record that did not convert, with its number and the reason
    calls: int = 0
    reasons: dict[str, int] = {}


class Goal(Result):
    metric: str
    threshold: float


class EvidenceRow(Result):
    """One variant measured by `tunewise run`: its quality on validation and test, and its costs."""

    route: str
    variant: str
    best_of_route: bool = False
    validation: float | None = None
    test: float | None = None
    test_ci95: list[float] | None = None
    meets_goal: bool = False  # on the validation split
    test_below_goal: bool = False  # the test CI lies wholly below the goal: met on validation alone
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    items_per_s: float = 0.0
    prompt_tokens: float = 0.0
    per_1k_queries_usd: float = 0.0
    hosted: bool = False
    training_usd: float = 0.0
    training_hours: float = 0.0
    retraining_usd_per_year: float = 0.0
    serving_usd_per_year: float = 0.0
    first_year_usd: float = 0.0

    @property
    def meets(self) -> bool:
        """Met on validation, and the test CI does not say otherwise."""
        return self.meets_goal and not self.test_below_goal


class Roi(Result):
    """The chosen route against the cheapest one that fell short."""

    against: str
    extra_cost_usd_per_year: float
    accuracy_gain: float
    more_correct_answers_per_year: float
    cost_per_extra_correct_answer_usd: float | None = None
    roi: float | None = None  # (value of the extra correct answers - extra cost) / extra cost, with use_case.value_per_correct_answer_usd


class HostedVsLocal(Result):
    """The best hosted variant against the best trained local one, and the volume at which they cost the same."""

    hosted: str
    local: str
    hosted_test: float | None = None
    local_test: float | None = None
    quality_diff: float
    hosted_per_1k_usd: float
    local_per_1k_usd: float
    hosted_first_year_usd: float
    local_first_year_usd: float
    break_even_queries_per_day: float | None = None
    queries_per_day: int
    cheaper: str


class Decision(Result):
    """`tunewise run` (and `tunewise demo`): the routes measured, the one chosen and why (decision.json, report.html)."""

    goal: Goal
    met: bool
    met_at: str | None = None  # the route whose best variant met the goal on validation first
    chosen: str  # the route
    chosen_variant: str
    evidence: list[EvidenceRow]
    roi: Roi | None = None
    why: str = ""
    not_measured: list[dict[str, Any]] = []  # route, variant, reason
    validation_only: list[str] = []  # variants that met the goal on validation but not on test
    hosted_vs_local: HostedVsLocal | None = None
    advice_before: dict[str, Any] = {}  # the recommendation and ranking before anything was measured
    estimates_for_untried: dict[str, dict[str, float]] = {}
    hardware: dict[str, Any] = {}
    prices: dict[str, Any] = {}
    use_case: dict[str, Any] = {}
    training: dict[str, Any] | None = None  # the training summary of the fine-tune route
    config_sha256: str = ""
    wall_s: float = 0.0
    steps: list[dict[str, Any]] = []  # the journal (steps.json)
    report: str | None = None  # report.html
    compare_report: str | None = None  # the test comparison's report
    gate: GateVerdict | None = None  # the promotion gate's verdict on the chosen fine-tune

    def row(self, variant: str) -> EvidenceRow:
        return next(r for r in self.evidence if r.variant == variant)

    def to_json(self) -> dict:
        return {**self.model_dump(mode="json"), "gate": self.gate.to_json() if self.gate is not None else None}


class GateCheck(Result):
    """One check of the gate: the reference's and the candidate's value, the rule and whether it held."""

    check: str
    reference: float
    candidate: float
    diff: float
    passed: bool
    rule: str
    p_value: float | None = None  # the task check's paired test
    diff_ci95: list[float] | None = None
    ci95: dict[str, list[float]] = {}

    omit_none: ClassVar[bool] = True  # p_value and diff_ci95 only where they are measured

    def reason(self) -> str:
        """Why the check failed, in one line."""
        return (f"{self.check}: {self.reference:.3f} -> {self.candidate:.3f} ({self.diff:+.3f}); needs {self.rule}"
                + (f" (p={self.p_value:.4f})" if self.p_value is not None else ""))


class GateVerdict(Result):
    """`tunewise gate`: the checks, the registry action and where the evidence is (gate.json)."""

    name: str
    action: str  # "promoted" | "promoted (forced)" | "blocked"
    passed: bool
    forced: bool = False
    candidate: str  # the candidate's registry reference (NAME:VERSION)
    reference: str  # what it was compared with
    reasons: list[str] = []
    checks: list[GateCheck]
    metric: str
    production: str | None = None  # the production model after the gate
    task: dict[str, Any] = {}  # per role: the task evaluation's metrics, items, latency and cost
    suites: dict[str, Any] = {}  # per role and suite (advbench, xstest-safe, xstest-unsafe, mmlu): its summary
    examples: dict[str, list] = {}
    timings_s: dict[str, float] = {}
    wall_s: float = 0.0
    registry: str = ""
    report: str | None = None  # gate.html

    def to_json(self) -> dict:
        return {**self.model_dump(mode="json"), "checks": [c.to_json() for c in self.checks]}

    @property
    def blocked(self) -> bool:
        return self.action == "blocked"


class MonitorReport(Result):
    """`tunewise monitor`: production queries against the training data (monitor.json)."""

    log: str
    requests: int
    queries: int
    alerts: list[str] = []
    verdict: str  # "ok" | "alert" | why nothing could be told
    drift: dict[str, Any] | None = None  # mmd2, p_value, test, production, training
    far: dict[str, Any] | None = None  # threshold, share, count, clusters
    surges: dict[str, Any] | None = None  # count, share, neighbours, clusters
    labels: dict[str, Any] | None = None  # total_variation, p_value, unknown_share, ...
    service: dict[str, Any] | None = None  # abstention_rate, error_rate, latency_p50_s, latency_p95_s
    report: str | None = None

    @property
    def measured(self) -> bool:
        """Whether there were enough queries to measure anything."""
        return self.drift is not None


class RetrainOutcome(Result):
    """`tunewise retrain`: what happened this time, and the journal row that records it."""

    action: str  # "nothing to do" | the gate's action
    reason: str | None = None  # why there was nothing to do
    gate: GateVerdict | None = None
    journal: dict[str, Any]


class SuiteResult(Result):
    """One gate suite on one model (`eval.suites`): AdvBench or XSTest refusal rate, or MMLU accuracy. Its rows go to
    <suite>.jsonl, not into suites.json."""

    suite: str
    items: int
    wall_s: float
    refusal_rate: Estimate | None = None
    accuracy: Estimate | None = None
    rows: list[dict[str, Any]] = Field(default=[], exclude=True)
    omit_none: ClassVar[bool] = True  # a refusal suite has no accuracy, MMLU no refusal rate

    def value(self, field: str) -> Estimate:
        est = getattr(self, field)
        if est is None:
            raise KeyError(f"suite {self.suite} has no {field}")
        return est


class BfclCategory(Estimate):
    """One BFCL category: accuracy with its CI, and the seconds it took."""

    wall_s: float = 0.0


class BfclReport(Result):
    """`tunewise eval --suite bfcl`: one variant on the BFCL categories (summary.json beside <category>.jsonl)."""

    variant: dict[str, Any]
    model: str
    categories: dict[str, BfclCategory] = {}
    max_new_tokens: int
    non_live_ast_mean: float | None = None  # over simple_python, multiple, parallel, parallel_multiple, when all four ran
    irrelevance: float | None = None
    wall_s: float = 0.0
    samples_per_category: int | None = None
    unconstrained: int = 0  # with the variant's tool_choice: items whose functions xgrammar could not compile, decoded freely
    dir: str | None = Field(default=None, exclude=True)  # where the files are; not written into them


class SkippedFile(Result):
    path: str
    reason: str


class IndexManifest(Result):
    """`tunewise kb index`: what the knowledge-base index holds (manifest.json in the index directory)."""

    documents: int
    chunks: int
    stored: int
    removed_from_store: int = 0
    bad_files: list[SkippedFile] = []
    embedding_model: str
    dim: int
    embedding_cache: dict[str, int] = {}  # hits, misses
    store: str = "sqlite"
    bm25_stemmer: str | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    seconds: float = 0.0


class RaftCounts(Result):
    """`tunewise kb raft`: how the training split became RAFT examples."""

    records: int = 0
    with_gold: int = 0
    without_gold: int = 0
    skipped_no_gold_source: int = 0

    @property
    def examples(self) -> int:
        return self.with_gold + self.without_gold


class GgufFile(Result):
    """One .gguf written by `serve.gguf_export.write_gguf`."""

    path: str
    arch: str
    quant: str
    pre: str | None = None
    tensors: dict[str, int] = {}  # tensor type -> count
    bytes: int


class ExportResult(Result):
    """`tunewise export`: what was written (export.json) and the commands that serve it."""

    source: str
    base_model: str
    name: str
    commands: dict[str, str] = {}
    adapter: str | None = None  # vllm: the PEFT adapter directory
    merged: str | None = None  # vllm: the merged safetensors directory
    gguf: GgufFile | None = None  # gguf, ollama
    lora_gguf: GgufFile | None = None  # gguf, ollama, from a LoRA: the adapter alone, for llama.cpp's --lora
    lora_gguf_skipped: str | None = None  # why a LoRA adapter was not written as one (DoRA, ...)
    stop_tokens: list[str] = []
    modelfile: str | None = None  # ollama
    omit_none: ClassVar[bool] = True  # only what the format writes


Decision.model_rebuild()  # its gate is a GateVerdict, defined after it
