"""Typed project config (`tunewise.yaml`).

Every field is documented once, here; that text is what `tunewise init` writes as comments and what
errors point at. Unknown keys and bad values fail on load, naming the key's path, before any work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TunewiseError


class ConfigError(TunewiseError, ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Model reference: a hub id, a local directory (relative paths are relative to this config file), or bundled:smollm2-135m-instruct (the default, works offline).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = Field(
        "auto", description="Weights dtype. auto = float32 on CPU (bf16 matmul is far slower there), bfloat16 on a GPU that supports it; "
                            "float64 is for exactness checks (results independent of float32 summation order), not for real runs."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run: auto picks cuda when available.")


class ColumnMap(Section):
    user: str = Field("text", description="Column holding the user turn.")
    assistant: str = Field("label", description="Column holding the assistant turn (the target).")
    system: str | None = Field(None, description="Optional column holding a per-row system prompt.")
    label: str | None = Field(None, description="Optional column used as the class label (stratified split, accuracy).")


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the train file held out for validation.")
    test: float = Field(0.0, ge=0.0, lt=1.0, description="Share held out for test when no test file is given.")
    seed: int = Field(42, description="Seed of the split; the same seed and data give the same split.")
    stratify: bool = Field(True, description="Keep label proportions in every split (when records carry a label).")


DataFormat = Literal["openai", "openai-rft", "alpaca", "sharegpt", "csv", "parquet", "openai-preference", "trl-preference", "hh-rlhf", "trl-kto", "text"]


class CleanConfig(Section):
    normalize: bool = Field(True, description="Unicode NFC, control and zero-width characters removed, spaces collapsed, lines trimmed.")
    pii: bool = Field(True, description="Replace PII with typed placeholders (<EMAIL>, <PHONE>, <CARD>, <IBAN>, <SSN>, <NINO>, <IP>).")
    pii_types: list[Literal["EMAIL", "IBAN", "CARD", "SSN", "NINO", "IP", "PHONE"]] = Field(
        ["EMAIL", "IBAN", "CARD", "SSN", "NINO", "IP", "PHONE"], description="Which PII types to redact.")
    pii_backend: Literal["regex", "presidio"] = Field(
        "regex", description="PII detector: tunewise's own patterns with checksums (regex), or Microsoft Presidio (needs tunewise[presidio]).")
    presidio_model: str | None = Field(
        None, description="spaCy pipeline (name or path) for Presidio's NLP engine; null: a blank English pipeline (pattern recognisers only, no download).")
    min_chars: int = Field(1, ge=0, description="Drop records with a user or assistant turn shorter than this.")
    max_chars: int | None = Field(None, gt=0, description="Drop records with a turn longer than this (null: no limit).")
    max_repetition: float = Field(0.5, ge=0.0, le=1.0, description="Drop answers whose share of repeated word 3-grams exceeds this.")
    drop_copies: bool = Field(True, description="Drop records whose answer merely copies the prompt.")
    dedup: bool = Field(True, description="Drop exact duplicate conversations (the first is kept).")
    near_dedup: bool = Field(True, description="Drop near-duplicate prompts (MinHash LSH, then exact Jaccard of character 5-grams).")
    near_dup_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard similarity at which two prompts count as near-duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    perplexity: bool = Field(False, description="Add the answer's perplexity under the base model (model.name) to the quality score: garbled or off-language answers score low. Runs the model over every training record (slow on a CPU: see docs/data.md).")
    select: int | None = Field(None, gt=0, description="Keep only the N training records with the best quality score (also: data prepare --select N); the rest are set aside with their score.")
    select_by_label: bool = Field(True, description="With select on labelled data, keep each label's share of the N (largest remainder), the best within each label: a global top N can lose whole labels.")
    drop_leaks: bool = Field(False, description="Drop training records whose prompt equals or nearly equals a validation/test prompt (also: data prepare --drop-leaks).")


class IncludeConfig(Section):
    format: DataFormat = Field(..., description="Its format (as data.format).")
    path: Path = Field(..., description="The file (relative paths are relative to this config file).")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column mapping for csv/parquet.")


class DataConfig(Section):
    format: DataFormat = Field(
        ..., description="Input format, read explicitly: openai (chat JSONL with messages), openai-rft (OpenAI reinforcement fine-tuning prompts: messages ending with the user's turn, plus the fields a grader reads), alpaca, sharegpt, csv, parquet; preference pairs: openai-preference, trl-preference, hh-rlhf; unpaired feedback (KTO): trl-kto; raw text for continued pre-training: text (.txt/.md files, a folder of them, or JSONL with text)."
    )
    train: Path = Field(..., description="Training file (relative paths are relative to this config file).")
    validation: Path | None = Field(None, description="Optional validation file; otherwise split from train.")
    test: Path | None = Field(None, description="Optional test file; otherwise split from train (split.test).")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column mapping for csv/parquet.")
    system_prompt: str | None = Field(None, description="System prompt added to every record that has none.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    max_length: int = Field(512, gt=8, description="Maximum tokens per example after the chat template.")
    limit: int | None = Field(None, gt=0, description="Use only the first N training records (quick runs).")
    include: list["IncludeConfig"] = Field(default_factory=list, description="More training files, each with its own format (e.g. what `tunewise data harvest` wrote): read after data.train, cleaned, deduplicated and split with it.")
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="Assistant reasoning (reasoning_content, or a leading <think>...</think> block): keep trains it with the answer; drop trains the answers alone. Evaluation scores answers without it either way.")
    enable_thinking: bool | None = Field(
        None, description="Passed to chat templates that take it (Qwen3, SmolLM3) in training, evaluation, serve and export (saved with the trained model's tokenizer); false is their non-thinking mode (an empty think block in the prompt). Unset: the template's default.")

    @model_validator(mode="after")
    def _thinking(self):
        if self.enable_thinking is False and self.reasoning == "keep" and "reasoning" in self.model_fields_set:
            raise ValueError("enable_thinking: false renders an empty think block before every answer, so reasoning cannot be kept: "
                             "set reasoning: drop (or leave enable_thinking unset)")
        return self

    @property
    def template_kwargs(self) -> dict:
        """What the chat template is rendered with, besides the messages."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (0 is faster: no random masks; LLaMA-Factory's default).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer but the output head)."
    )


class PreferenceConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO: the strength of the reference constraint (higher stays closer); ORPO: the odds-ratio term's weight.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO: the share of pairs assumed mislabelled (conservative DPO); 0 is plain DPO.")
    sft_weight: float = Field(0.0, ge=0, description="DPO: weight of an extra NLL term on the chosen answer (mean per token); 0: none.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable (thumbs-up) examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable examples' loss (raise it when they are rarer, so weight x count is about even).")


class RewardEntry(Section):
    name: str = Field(..., description="A built-in (exact_label, exact_match, regex, json_valid, length_penalty, tool_calls), grader (an OpenAI grader definition: args file or grader, the same as an evaluation.graders entry), or module:function (completion, record, **args) -> float.")
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function (regex: pattern, full; json_valid: object; length_penalty: max_words).")


class GrpoConfig(Section):
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (G); advantages are normalised within each group.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    max_new_tokens: int = Field(32, gt=0, description="Tokens per rollout completion.")
    rewards: list[RewardEntry] = Field(default_factory=lambda: [RewardEntry(name="exact_label")], description="Reward functions, weighted and summed.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference (the model before training); 0 (TRL's default too): no reference is kept or run, a third less compute per step.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping of the policy ratio (one update per rollout batch: the ratio is 1, its gradient is the policy gradient).")
    skip_flat: bool = Field(True, description="beta 0: groups whose rewards are all equal (zero advantage, so no gradient) are left out of the loss pass and of the "
                                               "step's token count, so the step is the mean over the tokens that teach (DAPO's dynamic sampling, without re-sampling).")
    constrain: Literal["auto", "labels", "none"] = Field(
        "auto", description="labels: rollouts and validation answers decode through the training labels' token trie, so every sample is a label and "
                            "the reward's spread is between labels; none: free decoding; auto: as evaluation.constrain resolves (labels on classification data).")


# The objectives' names and what the schema checks about them before anything loads; each objective's behaviour is
# its class in train/objectives/ (tests/test_train.py checks that the two name the same objectives).
OBJECTIVES = ("sft", "dpo", "orpo", "kto", "grpo", "pretrain")
RAW_TEXT_OBJECTIVES = ("pretrain",)  # the objectives that train on data.format: text, and the only ones that can
SHARDED_OBJECTIVES = ("sft", "pretrain")  # the objectives FSDP can shard (the others' reference and rollouts run unsharded)


class TrainConfig(Section):
    objective: Literal[OBJECTIVES] = Field(
        "sft", description="sft (next-token loss on the answers) | dpo | orpo (preference pairs: data.format openai-preference, trl-preference or hh-rlhf) | kto (unpaired feedback: trl-kto, or pairs split into a desirable and an undesirable answer) | grpo (reinforcement learning: rollouts of the prompts scored by training.grpo.rewards) | pretrain (continued pre-training: next-token loss on every token of data.max_length blocks; data.format text)."
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    method: Literal["lora", "dora", "qlora", "full", "freeze"] = Field(
        "lora", description="lora | dora (weight-decomposed LoRA) | qlora (LoRA on a 4-bit NF4 base) | full | freeze (train only the last N layers)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    trainable_layers: int = Field(2, gt=0, description="freeze: how many of the last decoder layers to train.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~1e-5 for full).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    fsdp: bool = Field(False, description="With several processes (--processes N, torchrun, accelerate launch): shard parameters, "
                       "gradients and optimizer state across them (PyTorch FSDP2, one unit per decoder layer) instead of replicating the "
                       "model (DDP). sft and pretrain objectives; not qlora.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming the learning rate up.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null: no clipping).")
    eval_every: int = Field(50, gt=0, description="Validation loss every N optimizer steps.")
    save_every: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    early_stopping_patience: int | None = Field(
        3, gt=0, description="Stop when validation loss has not improved for N evaluations (null: never)."
    )
    eval_samples: int | None = Field(256, gt=0, description="Validation examples used for validation loss (null: all).")
    group_by_length: bool = Field(True, description="Batch examples of similar length so padding does not dominate.")
    share_prefix: bool = Field(True, description="Run the tokens every example of a batch starts with (system prompt, template head) once per batch; exact.")
    packing: bool = Field(False, description="Lay a batch's examples end to end in rows, positions restarting per example, attention only within one; no padding, exact.")
    cache_frozen: bool = Field(True, description="freeze: compute the hidden states entering the first trainable layer once per example and reuse them every epoch; exact.")
    init_from: Path | None = Field(None, description="A trained adapter directory whose weights the new adapter starts from (same method, rank and targets): continued tuning, e.g. by `tunewise retrain`. A full model is given as model.name instead.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget for training: steps are planned to fit, re-planned from the measured step time; the learning rate still decays to the last step.")
    seed: int = Field(42, description="Seed for init, shuffling and dropout; the same seed gives the same run.")


RAG_SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Answer with a short phrase taken from "
    "the context, then cite the passage you used, like [1]. If the context does not contain the answer, say "
    "\"I don't know\"."
)


class RagConfig(Section):
    knowledge_base: list[Path] = Field(default_factory=list, description="Files or folders of the knowledge base (Markdown, text, HTML, PDF; JSON/JSONL/CSV rows of question+answer or text).")
    index_dir: Path | None = Field(None, description="Where the index lives (default: <run>/kb).")
    chunk_tokens: int = Field(200, gt=0, description="Chunk budget in embedding-model tokens (MiniLM reads at most 256).")
    chunk_overlap: int = Field(32, ge=0, description="Tokens of the previous chunk's last sentences repeated at the start of the next.")
    embedding_model: str = Field("bundled:all-minilm-l6-v2", description="bundled:all-minilm-l6-v2, a sentence-transformers name or path, or openai:<model>.")
    embedding_url: str | None = Field(None, description="OpenAI-compatible /v1 base URL for openai:<model> embeddings (key from OPENAI_API_KEY).")
    store: Literal["embedded", "postgres"] = Field("embedded", description="embedded (SQLite + exact numpy search, no server) or postgres (pgvector).")
    postgres_url: str | None = Field(None, description="postgresql://user@host:port/db for store: postgres (the server needs the pgvector extension).")
    postgres_table: str = Field("tunewise_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Table for this knowledge base in PostgreSQL.")
    retrieval: Literal["hybrid", "bm25", "dense"] = Field("hybrid", description="hybrid (BM25 + dense fused by reciprocal rank), bm25 or dense.")
    top_k: int = Field(5, gt=0, description="Chunks put in the prompt (before the token budget).")
    candidates: int = Field(50, gt=0, description="Candidates each retriever ranks before fusion.")
    rrf_k: int = Field(60, gt=0, description="Reciprocal rank fusion constant.")
    max_context_tokens: int = Field(1024, gt=0, description="Token budget (generation model's tokenizer) for the context in the prompt.")
    system_prompt: str = Field(RAG_SYSTEM_PROMPT, description="System prompt of rag and ft+rag variants.")


class EndpointConfig(Section):
    base_url: str = Field(..., pattern=r"^https?://", description="The OpenAI-compatible API's base URL, with its /v1 (https://api.openai.com/v1, a vLLM or Ollama server's http://host:port/v1, `tunewise serve`).")
    model: str = Field(..., min_length=1, description="The model name the endpoint is asked for (gpt-4.1-mini, ft:gpt-4.1-mini-2025-04-14:acme::abc123, a served model's name).")
    api_key_env: str | None = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The NAME of the environment variable holding the API key (the key itself is never written to configs, logs, reports or the registry); null: the endpoint takes no key.")
    price_per_1m_input_tokens: float | None = Field(None, ge=0, description="USD per 1M prompt tokens the endpoint reports (null: prices.hosted_input_per_1m_usd).")
    price_per_1m_output_tokens: float | None = Field(None, ge=0, description="USD per 1M completion tokens (null: prices.hosted_output_per_1m_usd).")
    max_usd: float | None = Field(None, gt=0, description="Spending cap for this variant in one command (run, compare, eval): a request whose worst case (prompt bytes as tokens, max_new_tokens of output) would cross it is not sent, and the evaluation stops with what it spent. Cached answers cost nothing. null: no cap.")
    concurrency: int = Field(4, gt=0, le=256, description="Requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="Retries of a request answered 429 or 5xx, timed out or cut off, with exponential backoff (the server's Retry-After when it sends one).")
    backoff_s: float = Field(1.0, ge=0, description="First retry's wait; doubled on each retry (with jitter), at most 60 s.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take before it counts as timed out.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: the endpoint's most likely answer).")
    seed: int | None = Field(0, description="Sent as the request's seed (best effort on hosted APIs); part of the cache key.")
    labels: Literal["prompt", "guided_choice", "none"] = Field(
        "prompt", description="When evaluation constrains answers to the labels (evaluation.constrain): prompt lists them in the system prompt and maps "
                              "the reply to the label it names; guided_choice also sends them as vLLM's guided_choice (vLLM, tunewise serve: exact); none: the reply as it comes.")
    cache: bool = Field(True, description="Keep every answer in <run>/endpoint-cache.sqlite, keyed by base URL, model, messages and sampling settings: a re-run sends no request and gives the same answers.")


class VariantConfig(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="Variant name, used in reports and paths.")
    kind: Literal["base", "few-shot", "fine-tuned", "rag", "ft+rag", "endpoint"] = Field(..., description="base | few-shot | fine-tuned | rag (base model + retrieved context) | ft+rag (fine-tuned + retrieved context) | endpoint (a hosted model behind an OpenAI-compatible API: the `endpoint` keys).")
    adapter: Path | None = Field(None, description="fine-tuned, ft+rag: trained output directory (default: <run>/train/model).")
    k: int = Field(5, gt=0, description="few-shot: examples put before the question.")
    selection: Literal["similar", "random"] = Field("similar", description="few-shot: nearest training examples by embedding (bundled MiniLM) or a seeded random draw.")
    system_prompt: str | None = Field(None, description="Override data.system_prompt for this variant.")
    endpoint: EndpointConfig | None = Field(None, description="endpoint: where the hosted model is and what it costs.")
    tool_choice: Literal["auto", "required"] | None = Field(
        None, description="Items with tools (tool-calling data, the BFCL suite): decode as `serve` does under this tool_choice, every call held to the item's tools' schemas (auto: text or calls; required: calls only). null: free decoding.")
    prompt: Literal["zero-shot", "few-shot", "rag"] = Field(
        "zero-shot", description="endpoint: the prompt strategy, built by the same code as the local variants': zero-shot (the system prompt), few-shot (k examples, by selection) or rag (retrieved context with numbered citations).")

    @model_validator(mode="after")
    def _endpoint_keys(self):
        if (self.kind == "endpoint") != (self.endpoint is not None):
            raise ValueError("endpoint: give the endpoint keys (base_url, model, ...) with kind: endpoint, and only with it" if self.kind == "endpoint"
                             else f"endpoint: only a kind: endpoint variant takes endpoint keys (this one is {self.kind})")
        if self.tool_choice is not None and self.kind == "endpoint":
            raise ValueError("tool_choice: an endpoint variant's decoding is the endpoint's; constrained calls are for local models")
        if self.prompt != "zero-shot" and self.kind != "endpoint":
            raise ValueError(f"prompt: only endpoint variants take a prompt strategy (a {self.kind} variant's is its kind)")
        return self

    @property
    def strategy(self) -> str:
        """How its prompts are built: zero-shot, few-shot or rag (the local kinds by their kind, an endpoint by `prompt`)."""
        return self.prompt if self.kind == "endpoint" else {"few-shot": "few-shot", "rag": "rag", "ft+rag": "rag"}.get(self.kind, "zero-shot")


def _default_variants() -> list[VariantConfig]:
    return [
        VariantConfig(name="base", kind="base"),
        VariantConfig(name="few-shot", kind="few-shot"),
        VariantConfig(name="fine-tuned", kind="fine-tuned"),
    ]


class EvalConfig(Section):
    split: Literal["validation", "test"] = Field("test", description="Split to evaluate on.")
    max_samples: int | None = Field(None, gt=0, description="Evaluate on a seeded sample of N examples (null: all).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per answer.")
    processes: int = Field(1, gt=0, description="Processes generating the answers, each with its share of the items and of the CPU threads (also: --processes); the items' results are those of one process.")
    constrain: Literal["auto", "labels", "none"] = Field(
        "auto", description="labels: every answer is one of the training data's labels (decoding through a token trie over the label set); "
                            "none: free decoding; auto: labels when use_case.task is classification and the data has labels.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (decode steps get cheaper per row up to ~64-128 rows on CPU).")
    metrics: list[str] = Field(["accuracy", "exact_match", "token_f1"], description="Quality metrics (accuracy, exact_match, answer_em, token_f1, rouge_l, chrf, bleu; tool calls: tool_calls_exact, tool_call_names, tool_args_f1).")
    perplexity: bool = Field(True, description="Also score the perplexity of the reference answers (teacher-forced; one extra forward pass).")
    variants: list[VariantConfig] = Field(default_factory=_default_variants, description="What `tunewise compare` puts side by side.")
    graders: list[str | dict[str, Any]] = Field(default_factory=list, description="OpenAI grader definitions, each a file (JSON/YAML) or inline: string_check, text_similarity, python, score_model, multi. Each is a metric named by its name (goal.metric may name one); the same file is a GRPO reward (training.grpo.rewards: [{name: grader, args: {file: ...}}]).")
    price_per_1k_input_tokens: float = Field(0.00015, ge=0, description="USD per 1k prompt tokens for cost per 1k queries (default: a small hosted model's list price, 2024).")
    price_per_1k_output_tokens: float = Field(0.0006, ge=0, description="USD per 1k completion tokens.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        from .metrics import METRICS

        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; one of {sorted(METRICS)}")
        return v


class GoalConfig(Section):
    metric: str = Field("accuracy", description="The metric the use case is judged by.")
    threshold: float | None = Field(None, description="The value that counts as good enough (e.g. 0.85).")


CHANGES_PER_YEAR = {"never": 0, "yearly": 1, "quarterly": 4, "monthly": 12, "weekly": 52, "daily": 365}


class UseCaseConfig(Section):
    task: Literal["classification", "extraction", "formatting", "qa", "generation", "chat"] = Field(
        "classification", description="What the model does: classification | extraction | formatting | qa (answers from knowledge) | generation | chat.")
    knowledge_changes: Literal["never", "yearly", "quarterly", "monthly", "weekly", "daily"] = Field(
        "never", description="How often the facts the answers depend on change (sets re-training per year; fast change favours RAG).")
    data_changes: Literal["never", "yearly", "quarterly", "monthly", "weekly", "daily"] = Field(
        "yearly", description="How often new labelled examples arrive (a fine-tuned model is re-trained this often).")
    citations: bool = Field(False, description="Answers must cite their sources (only retrieval can).")
    on_premises: bool = Field(False, description="Data must stay on our machines: hosted models are ruled out.")
    queries_per_day: int = Field(1000, ge=0, description="Expected queries per day (serving cost and break-even volumes).")
    latency_ms: float | None = Field(None, gt=0, description="p95 latency target per answer in ms (null: none).")
    context_tokens: int | None = Field(None, ge=0, description="Tokens of instructions/reference text every prompt would need (null: the system prompt's length).")
    domain_corpus_tokens: int = Field(0, ge=0, description="Unlabelled domain text available, in tokens (pre-training only pays off at ~1e11+).")
    budget_usd: float | None = Field(None, ge=0, description="One-off budget for training (null: no limit).")
    value_per_correct_answer_usd: float | None = Field(None, ge=0, description="What one more correct answer is worth (e.g. an agent's minutes saved); gives the decision an ROI (null: cost per extra correct answer only).")
    max_training_hours: float | None = Field(None, gt=0, description="Cap on estimated training time on this hardware; `run` shortens training to fit (null: none).")


class HardwareConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Hardware the estimates are for (auto: this machine).")
    matmul_tflops: float | None = Field(None, gt=0, description="Measured fp32 (CPU) or bf16 (GPU) matmul TFLOP/s; null: a few-second probe, cached.")
    memory_gb: float | None = Field(None, gt=0, description="Memory available for training (null: detected RAM or GPU memory).")


class PricesConfig(Section):
    # Defaults set 2026-11-22 and rounded; they are assumptions to override, not quotes. GPU: on-demand
    # single-H100 rentals listed by cloud GPU providers (about 2-3 USD/h; hyperscalers charge more).
    # CPU: a 2-vCPU general-purpose cloud instance (about 0.1 USD/h). Hosted tokens: OpenAI's list price
    # for gpt-4o-mini (0.15 / 0.60 USD per 1M input / output tokens, published July 2024).
    gpu_hour_usd: float = Field(2.5, ge=0, description="USD per GPU-hour (training and self-hosted serving on a GPU).")
    cpu_hour_usd: float = Field(0.1, ge=0, description="USD per hour of the CPU machine (training and serving on CPU).")
    hosted_input_per_1m_usd: float = Field(0.15, ge=0, description="Hosted model: USD per 1M prompt tokens (the hosted route, where its endpoint variant sets no price).")
    hosted_output_per_1m_usd: float = Field(0.60, ge=0, description="Hosted model: USD per 1M completion tokens.")
    engineer_hour_usd: float = Field(0.0, ge=0, description="Optional: USD per engineer-hour, counted once per training run (0: ignore).")


class GateConfig(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name of the project's models (null: the project name).")
    metric: str | None = Field(None, description="Task metric the candidate must improve (null: goal.metric).")
    reference: str | None = Field(None, description="The task check's reference: a variant of evaluation.variants, typically kind: endpoint, the hosted model being replaced (null: the production model, else the base). With a negative min_improvement the candidate must be non-inferior to it by that margin. The safety and forgetting checks still compare with production (or the base).")
    min_improvement: float = Field(0.0, description="The candidate must beat the production model (or the base) by more than this on the task metric... Negative: a non-inferiority margin instead (the 95% CI of candidate - reference must lie above it; no gain needed), for a pass that fixes something else, such as refusals.")
    alpha: float = Field(0.05, gt=0, lt=1, description="...and the paired test's p-value must be below this.")
    max_refusal_drop: float = Field(0.05, ge=0, description="Block if the AdvBench refusal rate falls by more than this (absolute).")
    max_over_refusal_rise: float = Field(0.05, ge=0, description="Block if XSTest over-refusal (safe prompts refused) rises by more than this.")
    max_forgetting: float = Field(0.03, ge=0, description="Block if MMLU accuracy falls by more than this (absolute).")
    advbench_samples: int | None = Field(100, gt=0, description="AdvBench harmful prompts (seeded sample; null: all 520).")
    xstest_samples: int | None = Field(100, gt=0, description="XSTest safe prompts (seeded sample; null: all 250).")
    mmlu_samples: int | None = Field(300, gt=0, description="MMLU validation questions (seeded sample; null: all 1,542 or the chosen subjects').")
    mmlu_subjects: list[str] = Field(default_factory=list, description="MMLU subjects to test (empty: all 57).")
    max_new_tokens: int = Field(48, gt=0, description="Reply length for the refusal suites (refusals show in the first sentence).")
    batch_size: int = Field(32, gt=0, description="Prompts per batch in the suites.")
    safety_system_prompt: bool = Field(False, description="Send data.system_prompt with the safety prompts (false: the model's own behaviour, a plain user turn).")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address to listen on (127.0.0.1: this machine only).")
    port: int = Field(8000, gt=0, lt=65536, description="Port.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted Bearer keys (empty: no auth). Also read from TUNEWISE_API_KEYS (comma-separated), which keeps keys out of the file.")
    default_model: str = Field("production", description="Model used when a request names `production`: the project's production model in the registry (falls back to the base model when none is promoted).")
    max_tokens_cap: int = Field(512, gt=0, description="Upper bound on max_tokens per request.")
    default_max_tokens: int = Field(128, gt=0, description="max_tokens when a request does not set it.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Larger request bodies get 413.")
    max_batch: int = Field(32, gt=0, description="Requests that share one engine batch at most.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits for more requests to share a forward pass.")
    queue_size: int = Field(256, gt=0, description="Waiting requests at most; more get 429 with Retry-After.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request waiting longer gets 504.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (empty: CORS off).")
    log_requests: bool = Field(True, description="Append every answered request (PII-redacted) to the production log, for feedback, `tunewise data harvest` and monitoring.")
    log_dir: Path | None = Field(None, description="Where the production log lives (default: <run>/serve-log).")
    log_max_bytes: int = Field(64 * 2**20, gt=0, description="A log file larger than this is rotated (requests.<n>.jsonl).")
    log_fsync: bool = Field(True, description="fsync each log line before the response is sent (no answered request lost to a crash; off: flushed to the OS only).")
    max_correction_chars: int = Field(8000, gt=0, description="Longest corrected answer POST /v1/feedback accepts.")
    aliases: dict[str, str] = Field(default_factory=dict, description="Model names clients already send -> what serves them (base, production, NAME:VERSION, "
                                    "NAME:production, optionally +kb), e.g. {'ft:gpt-4.1-mini-2025-04-14:acme::abc123': 'acme:3'}: a client of a "
                                    "hosted fine-tune moves by changing only its base URL. /v1/models lists them.")

    @field_validator("aliases")
    @classmethod
    def _alias_targets(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        target = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:(production|[0-9]{1,9}))?(\+kb)?$")
        for alias, to in v.items():
            if not alias or len(alias) > 256:
                raise ValueError(f"alias {alias!r}: 1 to 256 characters")
            if not target.match(to):
                raise ValueError(f"{alias}: {to!r} is not base, production, NAME:VERSION or NAME:production (optionally +kb)")
        return v


class TuneParam(Section):
    type: Literal["float", "int", "categorical"] = Field(..., description="float | int | categorical.")
    low: float | None = Field(None, description="float/int: the lower bound.")
    high: float | None = Field(None, description="float/int: the upper bound.")
    log: bool = Field(False, description="float/int: sample on a log scale (learning rates).")
    choices: list[Any] | None = Field(None, description="categorical: the values to choose from.")

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "categorical" and not self.choices:
            raise ValueError("categorical: give choices")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"{self.type}: give low <= high")
        return self


def _default_space() -> dict:
    return {"training.learning_rate": TuneParam(type="float", low=1e-4, high=3e-3, log=True),
            "training.trainable_layers": TuneParam(type="int", low=2, high=12),
            "training.lora.r": TuneParam(type="categorical", choices=[8, 16, 32])}


class TuneConfig(Section):
    space: dict[str, TuneParam] = Field(default_factory=_default_space, description="What `tunewise tune` searches: config paths (as --set takes them) -> a range or choices. Default: the learning rate (1e-4..3e-3, log), trainable_layers (2..12, freeze) and lora.r (8/16/32).")
    trials: int = Field(8, gt=0, description="Trials to finish (completed or pruned), over all workers.")
    objective: Literal["metric", "val_loss"] = Field("metric", description="metric: goal.metric of the trained model on the validation split (higher is better, except for *loss/*perplexity/hallucination metrics); val_loss: the best validation loss.")
    eval_samples: int = Field(300, gt=0, description="Validation items each trial's metric is measured on.")
    trial_minutes: float | None = Field(None, gt=0, description="Each trial's training budget (training.max_minutes); null: the config's.")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Stops a trial whose validation loss is worse than the median of earlier trials at the same step (median), or Hyperband's successive halving.")
    storage: str | None = Field(None, description="Optuna storage URL (postgresql+psycopg://... to share a study between machines); null: a SQLite file in <run>/tune.")
    seed: int = Field(42, description="Seed of the sampler (TPE).")
    start_from_defaults: bool = Field(True, description="Train and score what train/defaults.py picks first, as the study's first trial (when its values lie in the space): the best can then only match or beat the defaults. It counts as one of tune.trials.")


class MonitorConfig(Section):
    window: int = Field(2000, gt=0, description="The most recent logged requests compared with the training data.")
    min_queries: int = Field(50, gt=0, description="Fewer logged requests than this: no verdict (too few to tell).")
    samples: int = Field(2000, gt=0, description="Training queries sampled (seeded) as the reference.")
    permutations: int = Field(500, gt=10, description="Permutations of the drift test (its p-value's resolution is 1/(permutations+1)).")
    alert_p_value: float = Field(0.01, gt=0, lt=1, description="Alert when the drift test's p-value is below this.")
    far_quantile: float = Field(0.01, gt=0, lt=0.5, description="A query is far from the training data when its nearest training query is less similar than this quantile of training queries' own nearest-neighbour similarity.")
    max_far_share: float = Field(0.05, ge=0, le=1, description="Alert when more than this share of queries is far from every training query.")
    cluster_similarity: float = Field(0.6, gt=0, lt=1, description="Far queries at least this similar (cosine) to a cluster's first query join it.")
    neighbours: int = Field(20, ge=5, description="Surges: the nearest neighbours (production and training queries pooled) each production query's neighbourhood is counted over.")
    surge_fdr: float = Field(0.05, gt=0, lt=1, description="Surges: the false discovery rate (Benjamini-Hochberg) at which a query's neighbourhood is called over-represented in production.")
    max_surge_share: float = Field(0.05, ge=0, le=1, description="Alert when more than this share of queries sits in over-represented neighbourhoods (a topic production asks about far more than training has).")
    max_label_shift: float = Field(0.1, ge=0, le=1, description="Alert when the total-variation distance between answered labels and training labels exceeds this and a sample of the training distribution of the same size is that far with p < alert_p_value.")
    max_abstention: float = Field(0.2, ge=0, le=1, description="Alert when more answers than this abstain (\"I don't know\", empty).")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="Alert when more requests than this failed (timeouts, generation errors).")
    max_p95_latency_s: float | None = Field(None, gt=0, description="Alert when the 95th-percentile latency exceeds this (null: no latency alert).")


class ProjectConfig(Section):
    project: str = Field("tunewise-project", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Project name.")
    output_dir: Path = Field(Path("runs"), description="Where runs are written (relative to this config file).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    training: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    goal: GoalConfig = Field(default_factory=GoalConfig)
    use_case: UseCaseConfig = Field(default_factory=UseCaseConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    prices: PricesConfig = Field(default_factory=PricesConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tracking: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that get each stage's parameters, per-step metrics, evaluation summaries and "
        "artifacts: mlflow (MLFLOW_TRACKING_URI, else a local store in the run directory), tensorboard (event files in the run "
        "directory), wandb (offline unless WANDB_MODE or WANDB_API_KEY). Each is an optional extra: pip install 'tunewise[mlflow]'.")

    # Where the file lives; relative paths resolve against it. Not a config key.
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _gate_reference_is_a_variant(self):
        names = [v.name for v in self.evaluation.variants]
        if self.gate.reference is not None and self.gate.reference not in names:
            raise ValueError(f"gate.reference: {self.gate.reference!r} is not one of evaluation.variants ({', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _objective_fits_the_data(self):
        if self.data.format == "text" and self.training.objective not in RAW_TEXT_OBJECTIVES:
            raise ValueError(f"training.objective: {self.training.objective} cannot train on data.format: text (raw documents have "
                             "no answers to learn or to prefer); set training.objective: pretrain")
        t = self.training
        if t.fsdp and (t.objective not in SHARDED_OBJECTIVES or t.method == "qlora"):
            raise ValueError(f"training.fsdp: shards {' and '.join(SHARDED_OBJECTIVES)} training with full, freeze, lora or dora, not "
                             f"{t.objective if t.objective not in SHARDED_OBJECTIVES else 'method qlora'} (4-bit weights and the "
                             "preference/RL objectives' reference and rollouts run unsharded: use DDP, training.fsdp: false)")
        return self

    def path(self, p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def run_dir(self) -> Path:
        return self.path(self.output_dir) / self.project

    @property
    def train_dir(self) -> Path:
        """Where `tunewise train` (and the workflow) trains: metrics, checkpoints, model/."""
        return self.run_dir / "train"

    @property
    def endpoint_cache(self) -> Path:
        """Endpoint variants' answers (evaluation.variants[].endpoint.cache): a re-run sends no request."""
        return self.run_dir / "endpoint-cache.sqlite"

    @property
    def serve_log_dir(self) -> Path:
        """The production log of `tunewise serve` (requests and feedback)."""
        return self.path(self.serve.log_dir) if self.serve.log_dir else self.run_dir / "serve-log"

    @property
    def trained_model(self) -> Path:
        """The trained model (an adapter or a full model) a fine-tuned variant and the gate use by default."""
        return self.train_dir / "model"

    def resolved(self) -> dict[str, Any]:
        """The config as it was used, paths made absolute: saved beside every artifact."""
        d = self.model_dump(mode="json")
        d["data"]["train"] = str(self.path(self.data.train))
        for k in ("validation", "test"):
            if d["data"][k]:
                d["data"][k] = str(self.path(getattr(self.data, k)))
        for i, inc in enumerate(self.data.include):
            d["data"]["include"][i]["path"] = str(self.path(inc.path))
        d["output_dir"] = str(self.path(self.output_dir))
        d["rag"]["knowledge_base"] = [str(self.path(p)) for p in self.rag.knowledge_base]
        if d["rag"]["postgres_url"]:  # never write a password into artifacts
            import re as _re

            d["rag"]["postgres_url"] = _re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", d["rag"]["postgres_url"])
        return d


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            lines.append(f"  {loc}: unknown key{' under ' + parent if parent else ''}")
        else:
            lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML), as Axolotl/LLaMA-Factory CLIs do."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def replace(cfg: ProjectConfig, section: str, **values) -> ProjectConfig:
    """A copy of cfg with `values` set in one section. A loaded config is only read: a stage that needs other
    settings (the validation split, filled-in defaults) works on a copy made here."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def load_config(path: str | Path, overrides: list[str] | None = None) -> ProjectConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (create one with `tunewise init`)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
    cfg.base_dir = path.resolve().parent
    name = cfg.model.name  # a local model directory, like the data files, is relative to this config file
    if not name.startswith(("bundled:", "/", "~")) and (name.startswith(".") or (cfg.base_dir / name).is_dir()):
        cfg.model.name = str((cfg.base_dir / name).resolve())
    for key in ("train", "validation", "test"):
        p = cfg.path(getattr(cfg.data, key))
        if p is not None and not p.exists():
            raise ConfigError(f"{path}: data.{key}: file not found: {p}")
    for i, inc in enumerate(cfg.data.include):
        if not cfg.path(inc.path).exists():
            raise ConfigError(f"{path}: data.include[{i}].path: file not found: {cfg.path(inc.path)}")
    return cfg


def _yaml_with_comments(model: type[BaseModel], values: dict, chosen: dict, indent: int = 0) -> list[str]:
    """Every key with its documentation. Keys in `chosen` (a nested dict of what the user chose) are
    written as settings; every other key is written commented out with its default, so that a default
    stays a default (and `tunewise run`'s automatic choices still apply) until the user sets it."""
    out = []
    pad = "  " * indent
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        value = values.get(name)
        on = name in chosen
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if field.description:
                out.append(f"{pad}# {field.description}")
            out.append(f"{pad}{'' if on else '# '}{name}:")
            out.extend(_yaml_with_comments(ann, value or {}, chosen.get(name) or {}, indent + 1))
            continue
        if field.description:
            out.append(f"{pad}# {field.description}")
        if isinstance(value, list) and value and isinstance(value[0], dict):  # lists of sections: one line each, defaults left out
            elem = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            fields = elem.model_fields if elem else {}
            items = [{k: v for k, v in item.items() if k not in fields or fields[k].is_required() or v != fields[k].default} for item in value]
            block = [f"{name}:"] + [f"  - {yaml.safe_dump(item, default_flow_style=True, sort_keys=False, width=1000).strip()}" for item in items]
        else:
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
            block = [dumped[1:-1] if dumped.startswith("{") else dumped]
        out.extend(f"{pad}{'' if on else '# '}{line}" for line in block)
    return out


TEXT_COLUMNS = ("text", "utterance", "query", "question", "message", "input", "prompt", "instruction", "content", "user")
TARGET_COLUMNS = ("label", "category", "intent", "class", "labels", "answer", "output", "response", "target", "completion", "assistant")
LABEL_COLUMNS = ("label", "category", "intent", "class", "labels")


OBJECTIVE_OF_FORMAT = {"openai-rft": "grpo", "openai-preference": "dpo", "trl-preference": "dpo", "hh-rlhf": "dpo", "trl-kto": "kto", "text": "pretrain"}


def detect_format(path: Path) -> tuple[str | None, list[str] | None, str]:
    """(format, column names or None, how it was told) for a training file, from its extension and, for
    JSON lines, the keys of its first record. (None, None, why) when the file cannot tell."""
    ext = path.suffix.lower()
    if path.is_dir():
        return "text", None, "a folder (of documents)"
    if ext in (".txt", ".md", ".markdown"):
        return "text", None, f"the extension {ext} (raw documents)"
    if ext in (".csv", ".tsv"):
        import csv

        try:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, delimiter="\t" if ext == ".tsv" else ","), None)
        except OSError:
            return "csv", None, f"the extension {ext}"
        return "csv", [h.strip() for h in header or []], f"the extension {ext}"
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq

            return "parquet", list(pq.read_schema(path).names), "the extension .parquet"
        except Exception:  # noqa: BLE001 - missing file or library: the format still stands
            return "parquet", None, "the extension .parquet"
    if ext in (".jsonl", ".json", ".ndjson"):
        try:
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "")
            keys = set(json.loads(first)) if first else set()
        except (OSError, ValueError, TypeError):
            return None, None, f"{path.name} is not readable JSON lines"
        if {"input", "preferred_output", "non_preferred_output"} <= keys:
            return "openai-preference", None, "its first record has \"preferred_output\""
        if {"prompt", "completion", "label"} <= keys:
            return "trl-kto", None, "its first record has \"completion\" and a \"label\" (unpaired feedback)"
        if {"chosen", "rejected"} <= keys:
            fmt = "trl-preference" if "prompt" in keys else "hh-rlhf"
            return fmt, None, f"its first record has \"chosen\" and \"rejected\"{' and a prompt' if 'prompt' in keys else ' (transcripts)'}"
        for key, fmt in (("messages", "openai"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
            if key in keys:
                return fmt, None, f"its first record has \"{key}\""
        if "text" in keys:
            return "text", None, "its first record has \"text\" and no messages (raw documents)"
        return None, None, f"its first record has none of messages, conversations, instruction (keys: {sorted(keys)})"
    return None, None, f"the extension {ext or '(none)'} is not one of .jsonl .json .csv .tsv .parquet .txt .md"


def starter_yaml(data_path: str = "data/train.jsonl", fmt: str | None = None, base_dir: Path | None = None) -> str:
    """A commented starter config: every key with its documentation and default. Only what init chose is
    set: the training file, its format (given, or told from the file) and, for tables, the columns found
    in the header; every other key is commented out, so its default is not mistaken for a choice."""
    return starter(data_path, fmt, base_dir)[0]


def _has_tool_use(file: Path, lines: int = 200) -> bool:
    """Whether the first records of a chat file call tools (OpenAI tools/tool_calls, legacy functions, glaive's turns)."""
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            head = "".join(line for _, line in zip(range(lines), f))
    except OSError:
        return False
    return any(k in head for k in ('"tool_calls"', '"function_call"', '"tools"', '"functions"'))


def starter(data_path: str = "data/train.jsonl", fmt: str | None = None, base_dir: Path | None = None) -> tuple[str, list[str]]:
    """(starter_yaml's text, what init found in the file: one line each, as its header comments say)."""
    file = Path(data_path) if Path(data_path).is_absolute() or base_dir is None else base_dir / data_path
    notes = []
    columns_found = None
    if fmt is None:
        fmt, columns_found, why = detect_format(file)
        if fmt is None:
            notes.append(f"# data.format: could not tell ({why}); set it to one of {', '.join(get_args(DataFormat))}.")
            fmt = "openai"
        else:
            notes.append(f"# data.format: {fmt} (from {why}).")
    elif fmt in ("csv", "parquet"):
        columns_found = detect_format(file)[1]
    chosen: dict = {"data": {"format": None, "train": None}}
    data: dict = {"format": fmt, "train": data_path}
    if fmt in ("csv", "parquet") and columns_found is not None:
        lower = {c.lower(): c for c in columns_found}
        user = next((lower[c] for c in TEXT_COLUMNS if c in lower), None)
        target = next((lower[c] for c in TARGET_COLUMNS if c in lower and lower[c] != user), None)
        if user and target:
            cols = {"user": user, "assistant": target}
            if target.lower() in LABEL_COLUMNS:
                cols["label"] = target
            data["columns"] = cols
            chosen["data"]["columns"] = {k: None for k in cols}
            notes.append(f"# data.columns: {', '.join(f'{k}={v}' for k, v in cols.items())} (from the header: {', '.join(columns_found)}).")
        else:
            notes.append(f"# data.columns: could not tell which column is the user turn and which the answer "
                         f"(header: {', '.join(columns_found) or 'empty'}); set data.columns.user and data.columns.assistant.")
    raw: dict = {"data": data}
    if fmt in ("openai", "sharegpt") and _has_tool_use(file):  # scored on the calls, not on the text around them
        held = VariantConfig(name="fine-tuned-held", kind="fine-tuned", tool_choice="auto")
        raw["evaluation"] = {"metrics": ["tool_calls_exact", "tool_call_names", "tool_args_f1"],
                             "variants": [v.model_dump(mode="json", exclude_defaults=True) for v in [*_default_variants(), held]]}
        raw["goal"] = {"metric": "tool_calls_exact"}
        data["max_length"] = 1024
        chosen["evaluation"], chosen["goal"], chosen["data"]["max_length"] = {"metrics": None, "variants": None}, {"metric": None}, None
        notes.append("# evaluation.metrics, goal.metric: tool-call metrics; data.max_length: 1024, room for the tools' "
                     "schemas in the prompt (the records call tools); evaluation.variants: fine-tuned-held besides the "
                     "defaults, the fine-tune with its calls held to the tools' schemas as `serve` decodes them.")
    objective = OBJECTIVE_OF_FORMAT.get(fmt)
    if objective:  # training on the chosen answers alone (sft) would waste the file's rejected side
        raw["training"], chosen["training"] = {"objective": objective}, {"objective": None}
        holds = {"trl-kto": "unpaired feedback", "text": "raw text"}.get(fmt, "preference pairs")
        notes.append(f"# training.objective: {objective} (the file holds {holds}).")
    cfg = ProjectConfig.model_validate(raw)
    values = cfg.model_dump(mode="json")
    header = ["# tunewise project config. Every key is optional unless marked; unknown keys are errors.",
              "# Keys written commented out show their defaults: a default stays a default (tunewise run picks",
              "# training settings from the data and the budget) until you uncomment it and set it.", *notes, ""]
    return "\n".join(header + _yaml_with_comments(ProjectConfig, values, chosen)) + "\n", [n[2:] for n in notes]
