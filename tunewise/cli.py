"""The `tunewise` command line: parse, call a stage function, print. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="tunewise: from private data and an LLM use case to a measured decision and a deployed model.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
models_app = typer.Typer(help="Bundled models and the model registry (list, show, promote, rollback).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
import_app = typer.Typer(help="Bring a project from elsewhere (an OpenAI fine-tuning job).", no_args_is_help=True)
app.add_typer(import_app, name="import")
kb_app = typer.Typer(help="Knowledge base for RAG: index and query.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
# Piped output (logs, CI, `make demo | tee`) gets a wide console: rich's 80-column default crushes the tables.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

SET_HELP = "Override a config key, e.g. --set training.max_steps=20 (repeatable)."


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # read by transformers and huggingface_hub when they are imported: no import here (`models list` needs no torch)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (a test, a Python caller): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _fail(msg: str, code: int = 2):
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)  # a message's own brackets ("tunewise[wandb]") are text
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None):
    from .config import load_config

    return load_config(config, overrides or [])


def _stage(fn):
    """The opening every command shares: libraries quietened, and an error the user caused (any TunewiseError:
    bad config, bad data, a missing model) printed as one line with exit code 2, not a traceback."""
    import functools

    @functools.wraps(fn)
    def command(*args, **kwargs):
        from .errors import TunewiseError

        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except TunewiseError as e:
            _fail(str(e))

    return command


@app.command()
@_stage
def init(
    path: Path = typer.Argument(Path("tunewise.yaml"), help="Where to write the starter config."),
    data: str = typer.Option("data/train.jsonl", help="Training file to put in the config."),
    format: Optional[str] = typer.Option(None, help="Its format: openai, alpaca, sharegpt, csv, parquet, openai-preference, trl-preference, hh-rlhf, trl-kto (default: told from the file)."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
):
    """Write a commented starter tunewise.yaml: the data file, its format and columns as found in it; every
    other key commented out with its default."""
    from .config import starter

    if path.exists() and not force:
        _fail(f"{path} exists (use --force to overwrite)")
    text, found = starter(data, format, base_dir=path.resolve().parent)
    path.write_text(text)
    for line in found:
        console.print(line)
    console.print(f"wrote {path}")


@data_app.command("prepare")
@_stage
def data_prepare(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    drop_leaks: bool = typer.Option(False, "--drop-leaks", help="Drop training records whose prompt (nearly) equals a validation/test prompt."),
    select: Optional[int] = typer.Option(None, "--select", help="Keep the N training records with the best quality score."),
    resume: bool = typer.Option(False, "--resume", help="Go on from where an interrupted prepare stopped (same inputs and config)."),
):
    """Read, validate, clean (normalise, redact PII, filter, dedup, near-dedup), quarantine, split, check leakage.
    Ctrl-C keeps a checkpoint; --resume goes on from it."""
    cfg = _load(config, (set_ or []) + (["data.clean.drop_leaks=true"] if drop_leaks else []) + ([f"data.clean.select={select}"] if select else []))

    from .data.prepare import checkpointed_records, prepare_data
    from .data.prepared import prepare_lock
    from .models import load_tokenizer

    out_dir = cfg.run_dir / "data"
    resumed = []
    try:
        with console.status("reading and validating records") as status:
            def show(stage: str, n: int) -> None:
                if stage == "resuming":
                    resumed.append(n)
                status.update(f"{stage}: {n:,} records")

            tokenizer = load_tokenizer(cfg.model.name, cfg.data.template_kwargs)
            with prepare_lock(out_dir):  # not while training or tune prepares the same folder
                prepared = prepare_data(cfg, out_dir, tokenizer=tokenizer, progress=show, resume=resume)
    except KeyboardInterrupt:
        n = checkpointed_records(out_dir)
        if n is None:
            raise
        console.print(f"interrupted; {n:,} records read and cleaned are checkpointed. Continue with: tunewise data prepare {config} --resume")
        raise typer.Exit(130)
    if resume:
        console.print(f"resumed after {resumed[0]:,} records" if resumed else
                      "[yellow]no checkpoint of these inputs and this data config to resume from: prepared from the beginning[/yellow]")
    _print_data_summary(prepared)


@data_app.command("synth")
@_stage
def data_synth(
    config: Path = typer.Argument(..., help="Project config with a rag section (index it first: tunewise kb index)."),
    out: Path = typer.Option(..., "--out", "-o", help="Chat JSONL to write."),
    chunks: int = typer.Option(100, help="How many chunks to sample (seeded)."),
    per_chunk: int = typer.Option(1, help="Pairs to generate per chunk."),
    k: int = typer.Option(5, "-k", help="Round-trip filter: the question must retrieve its chunk in the top k."),
    temperature: float = typer.Option(0.7),
    seed: int = typer.Option(0),
    raft: bool = typer.Option(False, "--raft", help="Write RAFT-style records (retrieved distractors, cited gold chunk)."),
    endpoint: Optional[str] = typer.Option(None, help="OpenAI-compatible /v1 base URL to generate with instead of the local model."),
    endpoint_model: Optional[str] = typer.Option(None, help="Model name at the endpoint."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Generate question/answer pairs from knowledge-base chunks; keep those the chunk supports and that retrieve their own chunk."""
    cfg = _load(config, set_)

    from .rag.synth import synthesize

    with console.status("generating") as status:
        rep = synthesize(cfg, out, chunks, per_chunk, k, seed, temperature, endpoint, endpoint_model, raft,
                         progress=lambda d, t: status.update(f"generating: {d}/{t}"))
    r = rep.as_dict()
    console.print(f"{r['generated']} pairs from {r['chunks']} chunks: {r['parsed']} parsed ({r['answered_separately']} answered in a second pass), {r['supported']} supported by their chunk, "
                  f"{r['kept']} retrieve their chunk in the top {k}; pass rate {r['pass_rate']:.1%} -> {out}")
    console.print(f"rejected: {r['rejected']}", highlight=False)
    for e in r["examples"][:3]:
        console.print(f"  e.g. [{e['chunk']}] Q: {e['question']}  A: {e['answer']}", highlight=False)


@data_app.command("harvest")
@_stage
def data_harvest(
    config: Path = typer.Argument(..., help="Project config (its serve log: serve.log_dir, default <run>/serve-log)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: <run>/harvest)."),
    log_dir: Optional[Path] = typer.Option(None, help="Read this serve log instead of the project's."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Turn the production log and its feedback into training data: SFT records (corrected and well-rated answers),
    preference pairs (correction over answer) and KTO examples, with provenance, cleaned and deduplicated."""
    cfg = _load(config, set_)

    from .data.harvest import harvest

    r = harvest(cfg, out, log_dir)
    console.print(f"{r.requests:,} logged responses, {r.with_feedback:,} with feedback ({r.neutral} neutral, "
                  f"{r.raw_prompt_skipped} raw-prompt completions skipped)", highlight=False)
    for name, fmt in (("sft", "openai"), ("preference", "openai-preference"), ("kto", "trl-kto")):
        console.print(f"  {name}: {r.written[name]:,} records -> {Path(r.out) / (name + '.jsonl')} (data.format: {fmt})", highlight=False)
    console.print(f"set aside: {r.set_aside:,} (-> {Path(r.out) / 'quarantine.jsonl'})", highlight=False)
    for reason, n in r.reasons.items():
        console.print(f"  {n:>6}  {reason}", highlight=False)


@data_app.command("convert")
@_stage
def data_convert(
    file: Path = typer.Argument(..., help="The dataset file (JSON array or JSON lines)."),
    source: str = typer.Option(..., "--from", help="Its form: api-bank (API-Request: [Api(key='v')]) or toolrl (ToolRL's SFT split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Chat JSONL to write (OpenAI tools and tool_calls; read it with data.format: openai)."),
):
    """Convert a tool-use dataset written in its own text form to OpenAI chat JSONL with tools and tool_calls; records
    that do not convert go to OUT.bad.jsonl with their number and the reason."""
    from .data.convert import convert

    if not file.exists():
        _fail(f"{file}: no such file")
    r = convert(file, source, out)
    console.print(f"{r.records:,} {r.source} records -> {r.written:,} conversations with {r.calls:,} calls -> {r.out}", highlight=False)
    if r.bad:
        console.print(f"did not convert: {r.bad:,} (-> {r.bad_file})", highlight=False)
        for reason, n in r.reasons.items():
            console.print(f"  {n:>6}  {reason}", highlight=False)


def _print_data_summary(prepared) -> None:
    s = prepared.summary
    table = Table(title=f"prepared data -> {prepared.dir}")
    for col in ("split", "records", "labels", "tokens p50", "p95", "max", "truncated", "too long"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, out in s["outputs"].items():
        tk = s.get("tokens", {}).get(name, {})
        table.add_row(name, str(out["records"]), str(s["labels"][name]), *(str(tk.get(k, "-")) for k in ("length_p50", "length_p95", "length_max", "truncated", "dropped_too_long")))
    console.print(table)
    c = s.get("cleaning")
    if c:
        steps = ", ".join(f"{name}: {v['changed']} changed" if v["changed"] else f"{name}: {v['dropped']} dropped" for name, v in c["steps"].items())
        console.print(f"cleaning: {s['read']['valid']} valid records -> {s['read']['kept']} kept ({steps or 'nothing to do'})", highlight=False)
        if c["pii_found"]:
            console.print("  PII redacted: " + ", ".join(f"{k} {v}" for k, v in sorted(c["pii_found"].items())), highlight=False)
    q = s.get("quality")
    if q and q.get("mean") is not None:
        sel = f"; --select {q['selected']['text']}" if q.get("selected") else ""
        console.print(f"quality score of training records: mean {q['mean']:.3f}, histogram (0-1, 10 bins) {q['histogram']}{sel}", highlight=False)
    console.print(f"quarantined: {s['read']['quarantined']} (-> {prepared.dir / 'quarantine.jsonl'})")
    if s.get("report"):
        console.print(f"[bold]data report:[/] {s['report']}")
    for reason, n in s["quarantine_reasons"].items():
        console.print(f"  {n:>6}  {reason}", highlight=False)
    for line in s["quarantine_examples"][:5]:
        console.print(f"  e.g. {line}", highlight=False)
    shift = s.get("split_shift")
    if shift and shift["warning"]:
        console.print(f"[yellow]validation and test differ:[/] label distributions {shift['total_variation']:.1%} apart (total variation; "
                      f"chi-square p={shift['p_value']:.2g}); most: " + ", ".join(f"{x['label']} {x['validation']:.1%} -> {x['test']:.1%}" for x in shift["labels"][:3])
                      + (f"; in test only: {', '.join(shift['missing_in_validation'][:5])}" if shift["missing_in_validation"] else "")
                      + ". A goal met on validation may not hold on test: `tunewise run` checks its test CI.", highlight=False)
    lk = s["leaks"]
    if lk.get("dropped"):
        console.print(f"leakage: {lk['dropped']} training records dropped (--drop-leaks): their prompts were in an evaluation split")
    if lk["count"] or lk.get("near_duplicates"):
        console.print(f"[yellow]leakage:[/] {lk['count']} prompts appear in more than one split, {lk.get('near_duplicates', 0)} training prompts "
                      f"nearly duplicate an evaluation prompt (see summary.json; --drop-leaks removes them from train)")
    else:
        console.print("leakage: none (no prompt appears in two splits)")


@app.command()
@_stage
def train(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete earlier checkpoints of this run and start over."),
    output: Optional[Path] = typer.Option(None, help="Run directory (default: <output_dir>/<project>/train)."),
    processes: int = typer.Option(1, help="Data-parallel processes on this machine (torchrun; gloo on CPU, NCCL on GPUs)."),
):
    """Fine-tune (LoRA by default) with validation, early stopping and checkpoints. Ctrl-C checkpoints; --resume continues."""
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # start N copies of this command under torchrun
        raise typer.Exit(_launch(config, set_, fresh, output, processes))
    cfg = _load(config, set_)

    import shutil

    from .train.loop import train as train_fn

    out = output or cfg.train_dir
    if fresh and out.exists():
        shutil.rmtree(out)
    r = train_fn(cfg, out, resume=resume, defaults=True, say=console.print)
    table = Table(title=f"training {'interrupted' if r.interrupted else 'done'}: {r.out_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("steps", "total_steps", "train_loss", "first_val_loss", "best_val_loss", "stopped_early", "tokens_per_s", "peak_memory_mb", "trainable_params", "total_params", "wall_s"):
        v = getattr(r, k)
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    if r.base_val_loss is not None and r.best_val_loss is not None:  # pretrain: held-out perplexity; grpo: reward
        from .train.objectives import objective_of

        gain = objective_of(cfg).describe_gain(r.base_val_loss, r.best_val_loss)
        if gain:
            table.add_row(*gain)
    console.print(table)
    if r.interrupted:
        console.print(f"checkpoint saved; continue with: tunewise train {config} --resume")
        raise typer.Exit(130)
    for note in r.notes:
        console.print(f"note: {note}")
    console.print(f"model: {r.model_dir}")


def _launch(config: Path, set_, fresh: bool, output, processes: int) -> int:
    """What must happen once happens here, before the processes start: --fresh, and the data preparation (N processes
    preparing one directory would race). Then torchrun starts N copies of the command without --processes/--fresh."""
    import shutil
    import subprocess

    from .data.prepare import ensure_prepared
    from .models import load_tokenizer

    cfg = _load(config, set_)
    out = output or cfg.train_dir
    if fresh and out.exists():
        shutil.rmtree(out)
    ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))
    args = list(sys.argv[1:])
    for flag in ("--processes", "--fresh"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            i = next(k for k, a in enumerate(args) if a == flag or a.startswith(flag + "="))
            del args[i : i + (2 if args[i] == "--processes" else 1)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "tunewise", *args]
    console.print(f"launching {processes} processes: {' '.join(cmd[2:])}", highlight=False)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))})


@app.command()
@_stage
def chat(
    config: Optional[Path] = typer.Argument(None, help="Project config; its model and system prompt are used."),
    model: Optional[str] = typer.Option(None, help="Model reference (default: the config's, or the bundled model)."),
    adapter: Optional[Path] = typer.Option(None, help="A trained output directory (LoRA adapter or full model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt; without it, an interactive loop."),
    system: Optional[str] = typer.Option(None, help="System prompt (default: the config's data.system_prompt)."),
    max_new_tokens: int = typer.Option(128, help="Generation budget per reply."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
):
    """Talk to the base model or a fine-tuned one: one prompt, or an interactive loop."""
    from .models import DEFAULT_MODEL

    cfg = _load(config, None) if config else None
    ref = model or (cfg.model.name if cfg else DEFAULT_MODEL)
    system = system if system is not None else (cfg.data.system_prompt if cfg else None)

    from .engine import Engine

    with console.status("loading model"):
        eng = Engine.load(ref, str(adapter) if adapter else None)
    name = "default" if eng.adapters else None
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        out = eng.generate([history], max_new_tokens=max_new_tokens, temperature=temperature, adapter=name)[0]
        history.append({"role": "assistant", "content": out.text})
        return out.text

    if prompt is not None:
        console.print(answer(prompt), highlight=False, markup=False)
        return
    console.print("[dim]interactive chat; /reset clears history, /exit or Ctrl-D quits[/]")
    while True:
        try:
            text = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            del history[1 if system else 0 :]
            continue
        if text.strip():
            console.print(f"[bold blue]model>[/] {answer(text)}", highlight=False)


@app.command("eval")
@_stage
def eval_cmd(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    variant: str = typer.Option("fine-tuned", "--variant", "-v", help="A name from evaluation.variants."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    processes: Optional[int] = typer.Option(None, help="Processes generating the answers (default: evaluation.processes)."),
    suite: Optional[str] = typer.Option(None, help="bfcl: the Berkeley Function Calling Leaderboard's non-live AST categories, scored by its checker."),
    categories: Optional[str] = typer.Option(None, help="--suite bfcl: comma-separated categories (default: simple_python, multiple, parallel, parallel_multiple, irrelevance)."),
    samples: Optional[int] = typer.Option(None, help="--suite bfcl: a seeded sample of N questions per category (default: all)."),
    max_new_tokens: int = typer.Option(128, help="--suite bfcl: tokens per answer."),
):
    """Score one variant on the evaluation split: per-item JSONL and a summary with 95% CIs, latency, cost. With --suite bfcl,
    on BFCL's function-calling categories instead."""
    cfg = _load(config, (set_ or []) + ([f"evaluation.processes={processes}"] if processes else []))

    from .eval.evaluate import evaluate, track_evaluation
    from .tracking import require

    chosen = next((v for v in cfg.evaluation.variants if v.name == variant), None)
    if chosen is None:
        _fail(f"unknown variant {variant!r}; configured: {[v.name for v in cfg.evaluation.variants]}")
    if suite is not None:
        if suite != "bfcl":
            _fail(f"--suite: {suite!r} is not a suite (bfcl)")
        from .eval.bfcl import CATEGORIES, run_bfcl

        cats = tuple(c.strip() for c in categories.split(",")) if categories else CATEGORIES
        with console.status(f"bfcl: {variant}") as status:
            s = run_bfcl(cfg, chosen, cats, samples, max_new_tokens, progress=lambda msg: status.update(msg))
        held = f"; calls held to the functions' schemas (tool_choice {chosen.tool_choice})" if chosen.tool_choice else ""
        t = Table(title=f"BFCL ({variant}, {s.model}{held}): accuracy by category, 95% bootstrap CIs")
        for h in ("category", "items", "accuracy [95% CI]", "s"):
            t.add_column(h)
        for cat, m in s.categories.items():
            t.add_row(cat, str(m.n), str(m), f"{m.wall_s:.0f}")
        console.print(t)
        if s.non_live_ast_mean is not None:
            console.print(f"non-live AST mean (simple_python, multiple, parallel, parallel_multiple): {s.non_live_ast_mean:.3f}")
        if s.unconstrained:
            console.print(f"{s.unconstrained} items decoded freely: xgrammar could not compile their functions' parameters")
        console.print(f"items: {s.dir}")
        return
    require(cfg.tracking)
    with console.status(f"evaluating {variant}") as status:
        s = evaluate(cfg, chosen, progress=lambda msg: status.update(f"evaluating {msg}"))
    from .results import Comparison

    alone = Comparison(reference_variant=variant, variants={variant: s})
    track_evaluation(cfg, "eval", alone, files=[cfg.run_dir / "eval" / variant / "summary.json"])
    _print_compare(alone, cfg)
    console.print(f"items: {cfg.run_dir / 'eval' / variant / 'items.jsonl'}")


@app.command()
@_stage
def compare(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    variants: Optional[list[str]] = typer.Option(None, "--variant", "-v", help="Variants to compare (default: all configured)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    rerun: bool = typer.Option(False, "--rerun", help="Evaluate every variant again, even where a saved result still matches."),
    processes: Optional[int] = typer.Option(None, help="Processes generating the answers (default: evaluation.processes)."),
):
    """Evaluate variants on the same items; side-by-side table with CIs and paired tests against the first.

    A variant whose saved result has the same fingerprint (variant, evaluation settings, model, trained
    model, data) is reused, so an interrupted compare goes on where it stopped."""
    cfg = _load(config, (set_ or []) + ([f"evaluation.processes={processes}"] if processes else []))

    from .eval.evaluate import compare as compare_fn

    with console.status("comparing") as status:
        result = compare_fn(cfg, variants, progress=lambda name: status.update(f"evaluating {name}"), reuse=not rerun)
    _print_compare(result, cfg)
    console.print(f"results: {cfg.run_dir / 'eval' / 'compare.json'}")
    console.print(f"[bold]report:[/] {result.report}")


def _print_compare(result, cfg) -> None:
    """A Comparison (results.Comparison) as a table: each metric with its CI and paired p-value, latency, rate, cost."""
    from .metrics import reported_metrics

    metrics = reported_metrics(cfg, result.variants.values())
    ref = result.reference_variant
    first = next(iter(result.variants.values()))
    table = Table(title=f"{cfg.project}: {first.split} split, {first.items} items (95% bootstrap CIs; p: paired test vs {ref})")
    table.add_column("variant")
    for m in metrics:
        table.add_column(m, justify="right")
    for col in ("ref. perplexity", "latency p50/p95 s", "items/s", "prompt tok", "$/1k queries"):
        table.add_column(col, justify="right")
    for name, s in result.variants.items():
        cells = []
        for m in metrics:
            e = s.metrics.get(m)
            if e is None:
                cells.append("-")
                continue
            p = result.paired(name, m)
            cells.append(str(e) + (f" p={p.p_value:.3g}" if p else ""))
        lat, ppl = s.latency_s, s.reference_perplexity
        if s.reused:
            name += " (saved)"
        table.add_row(name, *cells, f"{ppl.mean:.2f} [{ppl.ci95[0]:.2f}, {ppl.ci95[1]:.2f}]" if ppl else "-", f"{lat['p50']:.2f}/{lat['p95']:.2f}",
                      f"{s.items_per_s:.2f}", f"{s.prompt_tokens_mean:.0f}", f"{s.cost_per_1k_queries_usd:.4f}")
    console.print(table)


@kb_app.command("index")
@_stage
def kb_index(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml) with a rag section."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Read, chunk, embed (cached by content) and store the knowledge base; build the BM25 index."""
    cfg = _load(config, set_)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .rag.retrieve import build_index, index_dir_of

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("reading and chunking", total=None)

        def progress(stage, done, total):
            bar.update(task, description=stage, completed=done, total=total)

        m = build_index(cfg, progress)
    console.print(f"{m.documents} documents -> {m.chunks} chunks ({m.embedding_model}, {m.dim} dims); "
                  f"embeddings reused from cache: {m.embedding_cache['hits']}, computed: {m.embedding_cache['misses']}; "
                  f"store: {m.store} ({m.stored} chunks); {m.seconds} s")
    for b in m.bad_files:
        err.print(f"[yellow]skipped[/] {b.path}: {b.reason}", highlight=False)
    console.print(f"index: {index_dir_of(cfg)}")


@kb_app.command("query")
@_stage
def kb_query(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    question: str = typer.Argument(..., help="What to look up."),
    k: int = typer.Option(5, "-k", help="How many chunks to show."),
    mode: Optional[str] = typer.Option(None, "--mode", help="hybrid, bm25 or dense (default: rag.retrieval)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Print the ranked chunks for a question, with their sources and each retriever's rank."""
    cfg = _load(config, set_)
    if mode not in (None, "hybrid", "bm25", "dense"):
        _fail(f"--mode {mode!r}: one of hybrid, bm25, dense")

    from .rag.retrieve import Retriever

    r = Retriever(cfg)
    t0 = time.time()
    hits = r.search(question, k=k, mode=mode)
    ms = (time.time() - t0) * 1000
    table = Table(title=f"{question!r}: {mode or cfg.rag.retrieval}, {ms:.0f} ms")
    for col in ("#", "score", "bm25", "dense", "source", "text"):
        table.add_column(col, overflow="fold")
    for i, h in enumerate(hits, 1):
        text = h.chunk.text if len(h.chunk.text) <= 160 else h.chunk.text[:157] + "..."
        table.add_row(str(i), f"{h.score:.4f}", str(h.ranks.get("bm25", "-")), str(h.ranks.get("dense", "-")), h.chunk.citation, text)
    console.print(table)
    r.close()


@kb_app.command("raft")
@_stage
def kb_raft(
    config: Path = typer.Argument(..., help="Project config; its training split needs meta.gold_sources."),
    out: Path = typer.Option(..., "--out", "-o", help="Chat JSONL to write (train ft+rag on it with --set data.train=...)."),
    distractors: int = typer.Option(2, help="Retrieved non-gold chunks per example."),
    p_oracle: float = typer.Option(0.8, help="Share of examples that include the gold chunk (RAFT's P)."),
    seed: int = typer.Option(0),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Write RAFT-style training data for ft+rag: each question with retrieved context (gold + distractors), the answer citing the gold chunk."""
    cfg = _load(config, set_)

    from .rag.raft import write_raft

    with console.status("retrieving context for the training split"):
        counts = write_raft(cfg, out, distractors, p_oracle, seed)
    console.print(f"{out}: {counts.examples} examples ({counts.with_gold} with the gold chunk, "
                  f"{counts.without_gold} without); {counts.skipped_no_gold_source} records skipped (no meta.gold_sources)")


@models_app.command("prepare")
@_stage
def models_prepare():
    """Convert the bundled GGUF model to a cached safetensors directory (done once; later loads take <1 s)."""
    from .models import DEFAULT_MODEL, bundled_embedding_dir, resolve_model

    with console.status("converting the bundled model (once)"):
        path = resolve_model(DEFAULT_MODEL)
    console.print(f"{DEFAULT_MODEL} -> {path}")
    console.print(f"embedding model -> {bundled_embedding_dir()}")


@models_app.command("tiny")
@_stage
def models_tiny(out: Path = typer.Argument(..., help="Directory to write the tiny random model to.")):
    """Write a tiny randomly initialised model (2 layers, hidden 64) with the bundled tokenizer, for tests."""
    from .models import tiny_model_dir

    console.print(str(tiny_model_dir(out)))


@import_app.command("openai-job")
@_stage
def import_openai_job(
    job: Path = typer.Argument(..., help="The job as the API returns it (GET /v1/fine_tuning/jobs/ID) or its create request, as JSON."),
    file: Optional[list[str]] = typer.Option(None, "--file", help="ID=PATH: the local copy of an OpenAI file the job names (repeatable); "
                                                                  "default: <ID>.jsonl beside the job file."),
    model: Optional[str] = typer.Option(None, help="The model to train (default: the bundled SmolLM2-135M-Instruct); OpenAI's weights are not available."),
    out: Optional[Path] = typer.Option(None, help="Where to write the config (default: tunewise.yaml beside the job file)."),
):
    """Write a tunewise.yaml from an OpenAI fine-tuning job (supervised, dpo or reinforcement) that `tunewise train`
    accepts as written; every field it cannot carry over is named, with what was done instead."""
    from .openai_job import JobImportError, import_job

    files = {}
    for item in file or []:
        if "=" not in item:
            raise JobImportError(f"--file {item!r}: expected ID=PATH")
        k, v = item.split("=", 1)
        files[k] = v
    path, notes = import_job(job, files, model, out)
    console.print(f"[bold]wrote[/] {path}")
    for n in notes:
        console.print(f"  - {n}", highlight=False)
    console.print(f"next: tunewise train {path}")


@app.command()
@_stage
def advise(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml) with its use_case section."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the whole advice as JSON."),
):
    """Recommend a route (prompt, RAG, fine-tune, hybrid, pre-train) from the use case, with reasons and estimated costs."""
    cfg = _load(config, set_)

    from .advise.decide import advise as advise_fn
    from .models import load_tokenizer

    a = advise_fn(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs))
    if as_json:
        print(json.dumps(a.to_json(), indent=2, default=str))
        return
    console.print(f"[bold]recommended:[/] {a.recommendation} - {a.recommendation_text}")
    t = Table(title=f"routes ({a.hardware['name']}, {a.hardware['tflops']:.3f} matmul TFLOP/s measured, "
                    f"{cfg.use_case.queries_per_day:,} queries/day)")
    for h in ("route", "points", "$ / 1k queries", "training", "re-training / yr", "first year", "why"):
        t.add_column(h, overflow="fold")
    for r in a.ranking:
        c = r.cost
        t.add_row(r.route, str(r.points), f"{c['per_query_usd'] * 1000:.4f}" + (" hosted" if c["hosted"] else ""),
                  f"${c['training_usd']:.2f} ({c['training_hours'] * 60:.0f} min)" if c["training_hours"] else "-",
                  f"${c['retraining_usd_per_year']:.2f}", f"${c['first_year_usd']:,.2f}", "\n".join(r.reasons))
    console.print(t)
    te = a.training_estimate
    console.print(f"training estimate ({te['method']}): {te['steps']} steps, {te['tokens']:,} tokens, {te['flops']:.2e} FLOPs, "
                  f"{te['hours'] * 60:.1f} min, peak memory {te['memory_gb']:.2f} GB{'' if te['fits'] else ' (does NOT fit)'}")
    console.print(f"to confirm, measure: {a.ranking[0].what_to_measure} (`tunewise run` does it in order)")


class _Steps:
    """A workflow's output: a line per step, and a transient status line for the progress inside one (it closes
    before the next step, so a step's own display, the training bar, has the screen)."""

    def __init__(self):
        self.status = None

    def step(self, text: str) -> None:
        self.close()
        console.print(f"[bold]>[/] {text}", highlight=False)

    def live(self, text: str) -> None:
        if self.status is None:
            self.status = console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _run_and_print(fn) -> None:
    """fn(step, live) runs a workflow and returns its decision."""
    out = _Steps()
    try:
        d = fn(out.step, out.live)
    finally:
        out.close()
    g = d.goal
    t = Table(title=f"decision: {g.metric} >= {g.threshold:g}")
    for h in ("route", "variant", "validation", "test [95% CI]", "goal", "latency p50 s", "$ / 1k q", "training", "first year"):
        t.add_column(h)
    for r in d.evidence:
        ci = r.test_ci95 or [0, 0]
        t.add_row(r.route, r.variant, f"{r.validation:.3f}", f"{r.test:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                  "met" if r.meets_goal else "short", f"{r.latency_p50_s:.2f}", f"{r.per_1k_queries_usd:.4f}",
                  f"${r.training_usd:.2f}" if r.training_hours else "-", f"${r.first_year_usd:,.2f}")
    for n in d.not_measured:
        t.add_row(n["route"], n["variant"], "not measured", n["reason"], "", "", "", "", "")
    console.print(t)
    from .report.decision_html import step_sentence

    for i, s in enumerate(d.steps, 1):
        console.print(f"  {i}. {step_sentence(s)}")
    if d.met:
        console.print(f"[bold green]chosen:[/] {d.chosen} ({d.chosen_variant}): meets the goal at the lowest first-year cost")
    else:
        console.print(f"[bold yellow]goal not met[/]; best: {d.chosen} ({d.chosen_variant})")
    if d.why:
        console.print(d.why)
    if d.roi:
        r = d.roi
        console.print(f"vs {r.against}: {r.accuracy_gain:+.3f} {g.metric} for ${r.extra_cost_usd_per_year:,.2f}/yr more"
                      + (f", ${r.cost_per_extra_correct_answer_usd:.2g} per extra correct answer" if r.cost_per_extra_correct_answer_usd else "")
                      + (f"; ROI {r.roi:.0f}x at the configured value per correct answer" if r.roi is not None else ""))
    if d.hosted_vs_local:
        h = d.hosted_vs_local
        be = h.break_even_queries_per_day
        console.print(f"hosted or local: {h.local} {h.quality_diff:+.3f} {g.metric} vs {h.hosted}; ${h.local_per_1k_usd:.4f} vs "
                      f"${h.hosted_per_1k_usd:.4f} per 1k queries; "
                      + (f"the trained model costs less above {be:,.0f} queries/day" if be is not None else "the hosted model stays cheaper at any volume"))
    console.print(f"wall time {d.wall_s:.0f} s")
    console.print(f"[bold]report:[/] {d.report}")
    if d.gate:
        _print_gate(d.gate)


@app.command()
@_stage
def tune(
    config: Path = typer.Argument(..., help="Project config; tune.space says what to search."),
    trials: Optional[int] = typer.Option(None, help="Trials to finish over all workers (default: tune.trials)."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: tune.storage, else <run>/tune/study.db)."),
    workers: int = typer.Option(1, help="Processes on this machine working on the study (each gets its share of the CPU threads)."),
    worker_rank: int = typer.Option(0, hidden=True, help="Set by --workers for the processes it starts."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Search hyperparameters with Optuna: each trial trains through the loop and its budget, is scored on the
    validation split and can be pruned early; an interrupted study resumes. Writes best.yaml and a report."""
    from .tune import run_tune

    r = run_tune(config, set_ or [], trials, storage, workers, worker_rank, say=lambda m: console.print(m, highlight=False))
    if r is None:
        return
    b = r.best
    ci = f" [{b.ci95[0]:.4f}, {b.ci95[1]:.4f}]" if b.ci95 else ""
    who = f"the defaults (trial {b.number})" if b.is_defaults else f"trial {b.number}"
    console.print(f"best of {len(r.completed)} completed trials ({sum(t.state == 'PRUNED' for t in r.trials)} pruned): {who}, "
                  f"{r.objective} {b.value:.4f}{ci}", highlight=False)
    if r.defaults and not b.is_defaults:
        console.print(f"the defaults scored {r.defaults['value']:.4f}", highlight=False)
    if r.importances:
        console.print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in r.importances.items()), highlight=False)
    console.print(f"apply: {r.set}", highlight=False)
    console.print(f"best: {r.best_yaml}")
    console.print(f"[bold]report:[/] {r.report}")


@app.command()
@_stage
def monitor(
    config: Path = typer.Argument(..., help="Project config (its serve log and training data)."),
    log_dir: Optional[Path] = typer.Option(None, help="Read this serve log instead of the project's."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Production queries against the training data: embedding drift (MMD, p-value), queries far from every training
    example (clustered), answered labels, abstention, latency and errors. Exits 3 when a monitor threshold is crossed."""
    cfg = _load(config, set_)

    from .monitor import run_monitor

    with console.status("monitoring"):
        r = run_monitor(cfg, log_dir)
    console.print(f"{r.queries:,} logged queries of {r.requests:,} requests", highlight=False)
    if not r.measured:
        console.print(r.verdict)
        return
    d, f, s = r.drift, r.far, r.service
    console.print(f"drift: MMD^2 {d['mmd2']:.5f}, p = {d['p_value']:.4f} ({d['production']:,} vs {d['training']:,} training queries)", highlight=False)
    console.print(f"far from the training data: {f['count']:,} ({f['share']:.1%}) in {len(f['clusters'])} clusters", highlight=False)
    for c in f["clusters"][:5]:
        console.print(f"  {c['size']:>5}  e.g. {c['examples'][0]!r}", highlight=False, markup=False)
    if r.surges:
        sg = r.surges
        console.print(f"surges (neighbourhoods where production asks far more than training has): {sg['count']:,} ({sg['share']:.1%}) "
                      f"in {len(sg['clusters'])} clusters", highlight=False)
        for c in sg["clusters"][:8]:
            answered = ", ".join(f"{a} ({n})" for a, n in c["answers"])
            console.print(f"  {c['size']:>5}  e.g. {c['examples'][0]!r}; answered {answered}", highlight=False, markup=False)
    if r.labels:
        console.print(f"labels: total variation {r.labels['total_variation']:.3f} from training, {r.labels['unknown_share']:.1%} unknown", highlight=False)
    console.print(f"abstention {s['abstention_rate']:.1%}, errors {s['error_rate']:.1%}, latency p50 {s['latency_p50_s']:.2f} s, "
                  f"p95 {s['latency_p95_s']:.2f} s", highlight=False)
    console.print(f"[bold]report:[/] {r.report}")
    from rich.markup import escape

    for a in r.alerts:
        console.print(f"[red]alert:[/] {escape(a)}", highlight=False)
    if r.alerts:
        raise typer.Exit(3)


@app.command()
@_stage
def retrain(
    config: Path = typer.Argument(..., help="Project config (data.include can name a harvest)."),
    when: str = typer.Option("data-changed", help="data-changed (the data key differs from the last re-training's, or the "
                                                  "production model's), drift (the monitor alerts) or always."),
    start: str = typer.Option("production", help="production (continue from the production model) or base (fresh)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Re-train when the data changed (or drift, or always): prepare, train, gate against production, promote or keep;
    journaled in the registry, idempotent, resumable after a kill."""
    cfg = _load(config, set_)

    from .retrain import retrain as retrain_fn

    r = retrain_fn(cfg, when, start, say=lambda m: console.print(m, highlight=False))
    console.print(f"re-training: {r.action} (journal #{r.journal['id']})", highlight=False)


@app.command()
@_stage
def ui(
    configs: list[Path] = typer.Argument(..., help="Project configs to show."),
    workspace: Optional[Path] = typer.Option(None, help="Where the job list and logs live (default: <first project's output_dir>/.ui)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (anything but loopback needs a token)."),
    port: int = typer.Option(8765),
    token: Optional[str] = typer.Option(None, help="Access token (default: TUNEWISE_UI_TOKEN; generated when bound beyond loopback)."),
):
    """A local web dashboard: projects, live training curves, reports, the registry (promote, rollback) and background jobs."""
    import secrets

    import uvicorn

    from .ui.app import LOOPBACK, create_ui

    token = token or os.environ.get("TUNEWISE_UI_TOKEN")
    if host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(18)
    first = _load(configs[0], None)
    ws = workspace or (first.path(first.output_dir) / ".ui")
    app_ = create_ui(configs, ws, token)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"tunewise ui: {url}  (workspace {ws}; Ctrl-C stops)", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("run")
@_stage
def run_cmd(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml) with goal and use_case."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    all_routes: bool = typer.Option(False, "--all", help="Go on through every route after the goal is met (more evidence, more time)."),
    validation_samples: Optional[int] = typer.Option(200, help="Validation items each variant is scored on while searching (a seeded sample)."),
    test_samples: Optional[int] = typer.Option(None, help="Test items in the final comparison, a seeded sample (default: evaluation.max_samples, "
                                                     "else 1,000: +-0.02 on accuracy; 0: the whole split)."),
    gate_: bool = typer.Option(True, "--gate/--no-gate", help="When the chosen route is a fine-tune, run the promotion gate on it at the end."),
):
    """The workflow: prompt baselines -> RAG -> fine-tune -> ft+rag, stopping when the goal is met; then a decision
    report, and the promotion gate when the chosen route is a trained model."""
    from .pipeline import run_workflow

    cfg = _load(config, set_)
    _run_and_print(lambda step, live: run_workflow(cfg, step, all_routes=all_routes, validation_samples=validation_samples,
                                                   test_samples=test_samples, gate=gate_, live=live))


@app.command()
@_stage
def demo(
    config: Path = typer.Argument(Path("examples/support-intents/tunewise.yaml"), help="Example project."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """`tunewise run` on the example with every route measured, sized for a CPU: 200 validation and 200 test items, one
    variant of each kind (base, few-shot, fine-tuned), 4 minutes of training."""
    cfg = _load(config, set_)

    from .pipeline import demo as demo_fn

    _run_and_print(lambda step, live: demo_fn(cfg, step, live))


def _print_gate(r) -> None:  # a GateVerdict, or its JSON (decision.json)
    from .results import GateVerdict

    r = r if isinstance(r, GateVerdict) else GateVerdict.model_validate(r)  # decision.json holds it as JSON
    t = Table(title=f"gate: {r.candidate} vs {r.reference}")
    for h in ("check", "reference [95% CI]", "candidate [95% CI]", "diff", "rule", "result"):
        t.add_column(h)
    for c in r.checks:
        def cell(role, c=c):
            ci = c.ci95.get(role)
            return f"{getattr(c, role):.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

        t.add_row(c.check, cell("reference"), cell("candidate"), f"{c.diff:+.3f}" + (f" p={c.p_value:.4f}" if c.p_value is not None else ""),
                  c.rule, "[green]pass[/]" if c.passed else "[red]FAIL[/]")
    console.print(t)
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.timings_s.items()))
    colour = {"promoted": "green", "promoted (forced)": "yellow", "blocked": "red"}[r.action]
    console.print(f"[bold {colour}]{r.action}[/]: {r.candidate}; production is {r.production}")
    for reason in r.reasons:
        console.print(f"  - {reason}")
    console.print(f"[bold]report:[/] {r.report}")


@app.command()
@_stage
def gate(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    candidate: Optional[Path] = typer.Option(None, help="Trained output directory to judge (default: <run>/train/model)."),
    force: bool = typer.Option(False, "--force", help="Promote even if a check fails (recorded as forced)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Promotion gate: task metric (paired test), AdvBench refusal, XSTest over-refusal and MMLU forgetting,
    candidate vs the production model (or the base); registers the candidate and promotes it only if it passes.
    Exit code 1 when blocked."""
    cfg = _load(config, set_)

    from .gate import run_gate

    with console.status("gate") as status:
        r = run_gate(cfg, candidate, force=force, progress=lambda m: status.update(m))
    _print_gate(r)
    if r.blocked:
        raise typer.Exit(1)


def _registry(cfg):
    from .registry import Registry, registry_path

    return Registry(registry_path(cfg))


@models_app.command("list")
@_stage
def models_list(config: Path = typer.Argument(..., help="Project config (its output_dir holds the registry).")):
    """Registered models: version, base model, kind, production marker, last gate verdict."""
    reg = _registry(_load(config, None))
    t = Table(title=f"registry {reg.path}")
    for h in ("model", "base model", "kind", "created", "production", "last gate"):
        t.add_column(h)
    prods = {}
    for m in reg.models():
        if m.name not in prods:
            p = reg.production(m.name)
            prods[m.name] = p.id if p else None
        last = reg.last_gate(m.id)
        verdict = "-" if last is None else ("pass" if all(c["passed"] for c in last) else "fail: " + ", ".join(c["check"].split(":")[0] for c in last if not c["passed"]))
        t.add_row(m.ref, m.base_model, "adapter" if m.adapter else "full", time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created)),
                  "*" if prods[m.name] == m.id else "", verdict)
    console.print(t)


@models_app.command("show")
@_stage
def models_show(config: Path = typer.Argument(..., help="Project config."),
                ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME:production.")):
    """One model's record: path, lineage (base model, training run, dataset hashes), evaluations, promotion history."""
    reg = _registry(_load(config, None))
    m = reg.get(ref)
    console.print_json(json.dumps({**m.as_dict(), "evaluations": [{k: e[k] for k in ("suite", "created")} | {"checks": e["metrics"].get("checks")}
                                                                    for e in reg.evaluations(m.id)],
                                   "promotions": [p for p in reg.promotions(m.name) if p["ref"] == m.ref]}, default=str))


@models_app.command("promote")
@_stage
def models_promote(config: Path = typer.Argument(..., help="Project config."),
                   ref: str = typer.Argument(..., help="NAME:VERSION to make production."),
                   force: bool = typer.Option(False, "--force", help="Promote without a passing gate verdict (recorded as forced).")):
    """Make a registered model production. Needs its last gate verdict to be a pass, or --force."""
    from .registry import RegistryError

    reg = _registry(_load(config, None))
    m = reg.get(ref)
    checks = reg.last_gate(m.id)
    passed = checks is not None and all(c["passed"] for c in checks)
    if not passed and not force:
        raise RegistryError(f"{m.ref} has {'no gate verdict' if checks is None else 'a failing gate verdict'}; run `tunewise gate` or pass --force")
    reg.promote(m.id, {"manual": True, "gate_passed": passed}, forced=not passed)
    console.print(f"production: {m.ref}" + (" (forced)" if not passed else ""))


@models_app.command("rollback")
@_stage
def models_rollback(config: Path = typer.Argument(..., help="Project config."),
                    name: Optional[str] = typer.Argument(None, help="Model name (default: gate.name or the project).")):
    """Production goes back to the model that was production before the current one."""
    cfg = _load(config, None)
    reg = _registry(cfg)
    n = name or cfg.gate.name or cfg.project
    before = reg.production(n)
    m = reg.rollback(n)
    console.print(f"production: {m.ref} (was {before.ref if before else None})")


@app.command()
@_stage
def serve(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml): its model, registry, knowledge base and `serve` section."),
    host: Optional[str] = typer.Option(None, help="Override serve.host."),
    port: Optional[int] = typer.Option(None, help="Override serve.port."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """OpenAI-compatible server: /v1/chat/completions (streaming too), /v1/completions, /v1/embeddings, /v1/models, /health.
    `model` picks base, production, NAME:VERSION from the registry, or any of them +kb for RAG with citations."""
    cfg = _load(config, set_)
    import logging

    import uvicorn

    from .serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app_ = create_app(cfg)
    console.print(f"loading {cfg.model.name} ...")
    app_.state.models.base  # load before the first request
    h, p = host or cfg.serve.host, port or cfg.serve.port
    console.print(f"[bold]serving[/] http://{h}:{p}/v1  (models: {', '.join(m['id'] for m in app_.state.models.listing())})")
    uvicorn.run(app_, host=h, port=p, access_log=False, log_level="warning", timeout_keep_alive=30)


@app.command()
@_stage
def export(
    config: Path = typer.Argument(..., help="Project config (tunewise.yaml)."),
    ref: str = typer.Argument("production", help="Registry model (NAME:VERSION, NAME:production, production) or a trained output directory."),
    out: Path = typer.Option(Path("export"), help="Output directory."),
    format_: str = typer.Option("vllm", "--format", help="vllm (adapter/ and merged/ safetensors), gguf (one .gguf for llama.cpp) "
                                                          "or ollama (the .gguf and a Modelfile)."),
    quant: str = typer.Option("f16", help="gguf/ollama: f32, f16 or q8_0 (K-quants: llama.cpp's llama-quantize on the f16 file)."),
    gguf_pre: Optional[str] = typer.Option(None, help="gguf/ollama: llama.cpp's pre-tokenizer name (taken from the base model's GGUF "
                                                      "when it came from one; otherwise required, e.g. llama-bpe, qwen2)."),
    merge: bool = typer.Option(True, help="vllm: write merged/: base + adapter as plain safetensors weights."),
    adapter: bool = typer.Option(True, help="vllm: write adapter/: the PEFT adapter for vLLM's --enable-lora."),
):
    """Export a model: for vLLM (the PEFT adapter and/or merged safetensors, and the `vllm serve` command), as a GGUF for
    llama.cpp, or for Ollama (GGUF + Modelfile whose template renders the chat template, with its stop tokens)."""
    cfg = _load(config, None)

    from .serve.export import FORMATS, export_gguf, export_model

    if format_ not in FORMATS:
        raise typer.BadParameter(f"--format {format_}: one of {', '.join(FORMATS)}")
    if Path(ref).is_dir():
        src, name = Path(ref), Path(ref).name
    else:
        reg = _registry(cfg)
        m = reg.get(f"{cfg.gate.name or cfg.project}:production" if ref == "production" else ref)
        src, name = Path(m.path), m.ref
    if format_ == "vllm":
        done = export_model(src, out, name, merge=merge, adapter=adapter)
        written = "serve.sh, export.json"
    else:
        with console.status(f"writing {format_} ({quant})"):
            done = export_gguf(src, out, name, quant=quant, pre=gguf_pre, ollama=format_ == "ollama")
        g = done.gguf
        console.print(f"{g.path}: {g.arch}, {g.quant} ({', '.join(f'{n} {k}' for k, n in g.tensors.items())}), "
                      f"{g.bytes / 2**20:.1f} MiB; stops on {', '.join(done.stop_tokens)}", highlight=False)
        if done.lora_gguf:
            console.print(f"{done.lora_gguf.path}: the LoRA adapter alone, {done.lora_gguf.bytes / 2**20:.1f} MiB", highlight=False)
        elif done.lora_gguf_skipped:
            console.print(f"no LoRA GGUF: {done.lora_gguf_skipped}", highlight=False)
        written = "export.json" + (", Modelfile" if format_ == "ollama" else "")
    for k, v in done.commands.items():
        console.print(f"[bold]{k}:[/] {v}")
    console.print(f"written: {out}/ ({written})")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
