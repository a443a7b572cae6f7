"""The training loop, readable top to bottom: load -> method -> data -> optimise -> validate -> save.

Our own loop (no Trainer subclass). Runs through accelerate, so `accelerate launch` spreads it over GPUs.
Details that other loops get wrong or leave on the table:
  * gradient accumulation divides the summed token loss by the number of loss tokens across *all*
    micro-batches of the step (and processes), not by a per-micro-batch mean;
  * the output head runs only at positions that carry loss (a 49k-vocab head over prompt tokens is
    wasted work), which is exact for models whose logits are lm_head(hidden);
  * the batch's shared prefix runs once, examples are packed without padding, and a `freeze` run
    computes its frozen layers once per example (layout.py, forward.py; all exact);
  * training.max_minutes is a budget that holds (budget.py).

What differs between objectives (sft, pretrain, dpo, orpo, kto, grpo) is in train/objectives/, one class each:
this file never asks which objective it runs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import ProjectConfig
from ..data.prepare import ensure_prepared
from ..data.tokenize import IGNORE, Tokenized, batch_order
from ..models import load_model
from ..util import atomic_replace_dir, atomic_write_json, write_jsonl
from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .budget import Plan, lr_factor
from .methods import apply_method, count_params, decoder_layers, is_adapter
from .objectives import Context, Objective, Setup, TrainError, objective_of
from .objectives.base import call_loss, token_count, validation_loss
from .objectives.sft import TokenLoss
from .sharded import local

__all__ = ["TokenLoss", "TrainError", "TrainResult", "backward_accumulated", "train", "validation_loss"]


@dataclass
class TrainResult:
    out_dir: str
    model_dir: str
    steps: int
    total_steps: int
    train_loss: float | None
    first_val_loss: float | None
    best_val_loss: float | None
    last_val_loss: float | None
    stopped_early: bool
    interrupted: bool
    tokens_per_s: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    wall_s: float
    notes: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)  # the settings train/defaults.py chose, with reasons
    base_val_loss: float | None = None  # pretrain, grpo: the validation loss before the first step


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary (and checkpoint); a second one aborts."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def backward_accumulated(loss_fn, micro: list, accelerator, n_loss=token_count) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (summed loss, loss units).

    Each micro-batch's summed loss is divided by the loss units (tokens; pairs for preference objectives) of the
    whole step (all micro-batches, all processes), so the gradient equals that of one big batch: a per-micro-batch
    mean would over-weight micro-batches with few answer tokens.
    """
    n = sum(n_loss(b) for b in micro)
    n_all = accelerator.reduce(torch.tensor(float(n), device=accelerator.device), "sum")
    loss_sum = 0.0
    for k, b in enumerate(micro):
        sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(loss_fn)
        with sync:
            loss = call_loss(loss_fn, b)
            # DDP averages gradients over processes; multiplying by their number turns that into a sum.
            accelerator.backward(loss * accelerator.num_processes / n_all)
        loss_sum += loss.item()
    return loss_sum, n


def _save_model(model, tokenizer, out: Path, meta: dict, state_dict: dict | None = None) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "tunewise.json", meta)
    atomic_replace_dir(tmp, out)


def _init_adapter(model, path: Path) -> None:
    """The adapter weights of a trained output directory, into the fresh adapter (training.init_from)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise TrainError(f"training.init_from: {path} holds no adapter (adapter_model.safetensors); a full model goes in model.name")
    if not hasattr(model, "peft_config"):
        raise TrainError("training.init_from: an adapter, but training.method trains no adapter (use lora, dora or qlora)")
    try:
        result = set_peft_model_state_dict(model, load_file(str(weights)))
    except RuntimeError as e:  # a size mismatch: another rank
        raise TrainError(f"training.init_from: the adapter at {path} does not fit this one (rank differs): {str(e).splitlines()[0]}") from None
    if getattr(result, "unexpected_keys", None):
        raise TrainError(f"training.init_from: the adapter at {path} does not fit this one (targets or method differ: "
                         f"{len(result.unexpected_keys)} of its tensors have no place here)")


@dataclass
class _Session:
    """What one training run holds between setup, the loop and the end (built by _setup)."""

    cfg: ProjectConfig
    t: object  # cfg.training as it runs
    objective: Objective
    setup: Setup  # the loss module, the batches and the examples (pairs, prompts) the objective trains on
    t0: float
    out_dir: Path
    ckpt_root: Path
    loaded: object
    accelerator: object
    train_stats: object
    default_notes: list[str]
    notes: list[str]
    model: torch.nn.Module
    n_trainable: int
    n_total: int
    params: list
    optimizer: object
    scheduler: object
    loss_fn: torch.nn.Module  # the loss module, wrapped in DDP with several processes
    n_batches: int
    plan: Plan
    val_batches: list
    state: dict
    step: int
    meta: dict
    sharded: bool
    metrics_file: object
    tracker: object = None

    @property
    def train_ex(self) -> list:
        return self.setup.train

    @property
    def val_ex(self) -> list:
        return self.setup.validation

    @property
    def tok(self):
        return self.loaded.tokenizer


def train(cfg: ProjectConfig, out_dir: Path | None = None, resume: bool = False, on_step=None, progress: bool = True,
          defaults: bool = False, say=None) -> TrainResult:
    """Train as configured. defaults=True first fills the training keys the config does not set from the
    task, the data and the model (train/defaults.py; `tunewise train` does, its notes are printed)."""
    from ..tracking import require

    require(cfg.tracking)  # a configured tracker that is not installed fails before the model loads
    run = _setup(cfg, Path(out_dir or cfg.train_dir), resume, defaults, say)
    run.tracker = _tracker(run, resume)
    status = "failed"
    try:
        outcome = _loop(run, on_step, progress)
        result = _finish(run, **outcome)
        status = "stopped" if result.interrupted else "finished"
        return result
    finally:
        run.metrics_file.close()
        run.tracker.close(status)


def _tracker(run: _Session, resume: bool):
    """The project's trackers for this run (main process only): the training settings as parameters; a resumed
    run continues the tracker runs it started (their ids in tracking.json)."""
    from ..tracking import Tracker

    state_file = run.out_dir / "tracking.json"
    if not resume:
        state_file.unlink(missing_ok=True)
    tracker = Tracker(run.cfg, "train", state_file, enabled=run.accelerator.is_main_process)
    tracker.params({"model": {"name": run.cfg.model.name}, "training": run.t.model_dump(mode="json"),
                    "data": {"train_sha256": ((run.meta.get("data") or {}).get("train") or {}).get("sha256"),
                             "train_examples": len(run.train_ex), "validation_examples": len(run.val_ex)},
                    "defaults": "; ".join(run.default_notes)})
    return tracker


def _emit(run: _Session, row: dict) -> None:
    """One row of metrics.jsonl (main process; other processes write to /dev/null), also sent to the trackers."""
    run.metrics_file.write(json.dumps(row) + "\n")
    run.metrics_file.flush()
    run.tracker.metrics(row, row["step"])


def _setup(cfg: ProjectConfig, out_dir: Path, resume: bool, defaults: bool, say) -> _Session:
    """Model, method, data, optimiser, schedule and budget; the state to resume from."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    ckpt_root = out_dir / "checkpoints"
    clean_partial(ckpt_root)
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and checkpoints:
        raise TrainError(f"{out_dir} already has checkpoints; pass --resume to continue or --fresh to start over")

    set_seed(cfg.training.seed)
    # the template's arguments (data.enable_thinking) render training's text, and are saved with the model's tokenizer
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, quantize_4bit=cfg.training.method == "qlora",
                        chat_kwargs=cfg.data.template_kwargs)
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    prepared = ensure_prepared(cfg, loaded.tokenizer)
    n_val = cfg.training.eval_samples
    val_records = prepared.splits["validation"][:n_val] if n_val else prepared.splits["validation"]
    train_ex, train_stats, val_ex = objective_of(cfg).examples(loaded.tokenizer, prepared, val_records)
    if not train_ex:
        raise TrainError("no training examples left after preparation (see the data summary)")
    cfg, default_notes = _defaults(cfg, prepared, train_ex, loaded, say) if defaults else (cfg, [])
    objective, t = objective_of(cfg), cfg.training

    set_seed(t.seed)
    model = apply_method(loaded.model, t)
    if t.init_from:
        _init_adapter(model, cfg.path(t.init_from))
    model.train()
    n_trainable, n_total = count_params(model)
    notes: list[str] = []
    sharded = t.fsdp and accelerator.num_processes > 1
    if sharded and t.share_prefix:  # each layer must run once per step: FSDP reshards it after its first backward
        t = t.model_copy(update={"share_prefix": False})
        notes.append("share_prefix: off under fsdp (the prefix row would run every layer twice per step)")
    setup = objective.setup(Context(cfg, t, model, loaded, accelerator.device, prepared, prepared.splits["train"], val_records,
                                    train_ex, val_ex, notes, say))
    _check_processes(objective, t, accelerator.num_processes, notes)
    layers = decoder_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if sharded:  # the optimizer is built on the shards
        from .sharded import shard

        shard(setup.loss_module, layers)
        notes.append(f"fsdp: parameters, gradients and optimizer state sharded over {accelerator.num_processes} processes")
    elif t.fsdp:
        notes.append("fsdp: one process, nothing to shard (use --processes N)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    n_batches = math.ceil(len(setup.train) / t.batch_size)
    plan, scheduler = _plan(t, t0, optimizer, n_batches, len(layers), setup)
    # FSDP syncs the gradients itself; otherwise accelerate wraps the loss module in DDP when there are several processes
    loss_fn, optimizer = (setup.loss_module, optimizer) if sharded else accelerator.prepare(setup.loss_module, optimizer)

    state = {"position": 0, "best_val": None, "first_val": None, "last_val": None, "bad_evals": 0, "tokens": 0, "planned_total": plan.total}
    step, rows = 0, []
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        saved, rng = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, sharded=sharded)
        step = saved.pop("step")
        state.update(saved)
        plan.total = state["planned_total"]
        set_rng_state(rng)
        if metrics_path.exists():
            rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("step", 0) <= step]
    out_dir.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process  # only the main process writes metrics, checkpoints and models
    if main:
        write_jsonl(metrics_path, rows)
    meta = _meta(cfg, t, loaded, prepared, train_stats)
    return _Session(cfg=cfg, t=t, objective=objective, setup=setup, t0=t0, out_dir=out_dir, ckpt_root=ckpt_root, loaded=loaded,
                    accelerator=accelerator, train_stats=train_stats, default_notes=default_notes, notes=notes, model=model,
                    n_trainable=n_trainable, n_total=n_total, params=params, optimizer=optimizer, scheduler=scheduler,
                    loss_fn=loss_fn, n_batches=n_batches, plan=plan,
                    val_batches=setup.batches.sorted_batches(setup.validation, "v", t.batch_size), state=state, step=step, meta=meta,
                    sharded=sharded, metrics_file=open(metrics_path, "a", encoding="utf-8") if main else open(os.devnull, "w"))


def _meta(cfg: ProjectConfig, t, loaded, prepared, train_stats) -> dict:
    """What tunewise.json records beside the trained model."""
    return {"base_model": cfg.model.name, "base_model_path": loaded.path, "method": t.method, "objective": t.objective, "config": cfg.resolved(),
            "data": prepared.summary.get("outputs"), "data_inputs": prepared.summary.get("inputs"), "tokens": train_stats.summary(),
            **_tool_form(loaded.tokenizer, prepared.splits["train"])}


def _tool_form(tok, train: list) -> dict:
    """Tool-use data is trained in tunewise's text form (data/tools.py); the saved chat template then renders structured
    tools and tool_calls in that form (with_tool_form), so a runtime that sends them (vLLM, llama.cpp --jinja, serve)
    prompts the model as training did. Plain conversations render as before. A template that renders tools itself in
    that call syntax (Qwen2.5, Qwen3) is used as it is: "native". Returns what tunewise.json records."""
    from ..data.tools import TOOLS_FORMAT, native_tools, with_tool_form

    if not isinstance(tok.chat_template, str) or not any((r.meta or {}).get("tools") for r in train):
        return {}
    if native_tools(tok.chat_template):  # rendered by the model's own template (models.render_chat), saved as it is
        return {"tools_format": "native"}
    tok.chat_template = with_tool_form(tok.chat_template)
    return {"tools_format": TOOLS_FORMAT}


def _defaults(cfg: ProjectConfig, prepared, train_ex, loaded, say) -> tuple[ProjectConfig, list[str]]:
    """The training keys the config does not set, from the task, the data and the model (deterministic, so a
    resumed run gets the same settings)."""
    from .defaults import auto_training, data_facts

    f = data_facts(prepared.splits["train"], train_ex)
    f["examples"] = objective_of(cfg).example_count(prepared.splits["train"], train_ex)
    cfg, notes = auto_training(cfg, f["examples"], f["mean_tokens"], loaded.model.num_parameters(), f["answer_tokens"],
                               len(decoder_layers(loaded.model)), f["labelled"])
    if say:
        say("training settings: " + "; ".join(notes))
    return cfg, notes


def _check_processes(objective: Objective, t, processes: int, notes: list[str]) -> None:
    """More processes than examples per step: sft and pretrain give the spare ones a masked copy; others cannot."""
    if processes <= t.batch_size:
        return
    if not objective.idle_rows:
        raise TrainError(f"training.batch_size={t.batch_size} is smaller than the {processes} processes: with "
                         f"{t.objective} every process needs at least one example per step; raise batch_size or use fewer processes")
    notes.append(f"batch_size={t.batch_size} < {processes} processes: {processes - t.batch_size} of them "
                 "run a masked copy each step (no loss, no gradient) so that the collectives meet")


def _plan(t, t0: float, optimizer, n_batches: int, n_layers: int, setup: Setup):
    """The step plan (the budget, budget.py) and the learning-rate schedule that follows it."""
    from torch.optim.lr_scheduler import LambdaLR

    natural = t.max_steps or max(1, math.ceil(n_batches * t.epochs / t.grad_accum))
    first = setup.loss_module.first_trainable if setup.cache is not None else 0
    # a cached step runs the trainable layers only (forward + backward ~ 3x), a fresh one also the frozen forward
    plan = Plan(natural, t.max_minutes * 60 if t.max_minutes else None, t0,
                fresh_steps=math.ceil(n_batches / t.grad_accum) if setup.cache is not None else 0,
                cached_ratio=3 * (n_layers - first) / (first + 3 * (n_layers - first)),
                eval_every=t.eval_every, has_validation=bool(setup.validation))
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, plan.total, int(t.warmup_ratio * plan.total), t.scheduler))
    return plan, scheduler


class _Feed:
    """The training micro-batches in order: an epoch's batch order from its seed, each process's share of a batch;
    `state["position"]` (checkpointed) is where the feed stands, so a resumed run continues with the same batches."""

    def __init__(self, run: _Session):
        self.run, self.orders = run, {}
        self.lengths = [len(e.input_ids) for e in run.train_ex]

    def next(self):
        run, t, state, accelerator = self.run, self.run.t, self.run.state, self.run.accelerator
        epoch, i = divmod(state["position"], run.n_batches)
        if epoch not in self.orders:
            self.orders = {epoch: batch_order(self.lengths, t.batch_size, t.seed + epoch, t.group_by_length)}
        state["position"] += 1
        idx = self.orders[epoch][i]
        if accelerator.num_processes > 1:  # data parallel: each process takes its share of the global batch
            share = idx[accelerator.process_index :: accelerator.num_processes]
            if not share:  # fewer examples than processes (an epoch's last batch): a copy of one with no loss target
                return _idle(run, idx[0])  # runs the same forward and backward, so the collectives still meet
            idx = share
        return run.setup.batches.make([run.train_ex[j] for j in idx], [("t", j) for j in idx])


def _checkpoint(run: _Session, at_step: int) -> None:
    full = {}
    if run.sharded:  # every process takes part in gathering the full tensors; the main one writes them
        from .sharded import full_optimizer_state, full_state

        full = {"tensors": full_state(run.model, trainable_only=True), "optim_state": full_optimizer_state(run.model, run.optimizer)}
    if run.accelerator.is_main_process:
        save_checkpoint(run.ckpt_root, at_step, run.model, run.optimizer, run.scheduler, dict(run.state), rng_state(), run.t.keep_checkpoints, **full)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def _optimise(run: _Session, micro: list) -> tuple[float, int, float | None]:
    """One optimizer step over the micro-batches: (summed loss, loss units, gradient norm before clipping)."""
    t = run.t
    loss_sum, n_loss = backward_accumulated(run.loss_fn, micro, run.accelerator, run.objective.n_loss)
    grad_norm = local(run.accelerator.clip_grad_norm_(run.params, t.max_grad_norm)) if t.max_grad_norm else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_loss, grad_norm


def _step_row(run: _Session, step: int, micro: list, loss_sum: float, n_loss: int, grad_norm, dt: float) -> tuple[dict, int, float]:
    """The step's metrics row, its real tokens and its loss (over all processes)."""
    accelerator = run.accelerator
    n_tokens, computed, n_rows = (sum(x) for x in zip(*map(run.objective.stats, micro)))
    if accelerator.num_processes > 1:  # the step's loss and tokens over all processes
        loss_sum, n_loss, n_tokens = accelerator.reduce(torch.tensor([loss_sum, float(n_loss), float(n_tokens)], dtype=torch.float64,
                                                                     device=accelerator.device), "sum").tolist()
        n_loss, n_tokens = int(n_loss), int(n_tokens)
    run.state["tokens"] += n_tokens
    loss = loss_sum / max(n_loss, 1)
    row = {"step": step, "loss": round(loss, 6), "lr": run.scheduler.get_last_lr()[0], "tokens": run.state["tokens"],
           "tokens_per_s": round(n_tokens / dt, 1), "epoch": round(run.state["position"] / run.n_batches, 4),
           "padded_tokens": computed, "rows": n_rows, "elapsed_s": round(time.time() - run.t0, 3)}
    if grad_norm is not None:
        row["grad_norm"] = round(float(grad_norm), 6)
    row.update(run.objective.step_fields(run.setup))
    return row, n_tokens, loss


def _loop(run: _Session, on_step, progress: bool) -> dict:
    """Optimise until the planned last step, the budget, early stopping or Ctrl-C. Every exit but Ctrl-C is at
    the end of a step, after that step's validation and checkpoint."""
    t, plan, accelerator, cache = run.t, run.plan, run.accelerator, run.setup.cache
    feed = _Feed(run)
    bar = _progress_bar(progress and accelerator.is_main_process)
    step = run.step
    task = bar.add_task("train", total=plan.total, completed=step, loss="-", val="-", tps="-")
    stopped_early = interrupted = out_of_time = False
    last_loss = None
    run_tokens, run_time = 0, 0.0
    if run.objective.measures_base and step == 0 and run.val_ex and run.state.get("base_val") is None:
        _base_validation(run)
    with bar, _StopFlag() as stop:
        while step < plan.total:
            if stop.requested:
                interrupted = True
                _checkpoint(run, step)
                break
            ts = time.time()
            step_extra = 0.0  # validation and checkpoint time inside this iteration (planned apart)
            micro = [feed.next() for _ in range(t.grad_accum)]
            fresh = cache is not None and not all(cache.has(b[1]) for b in micro)
            loss_sum, n_loss, grad_norm = _optimise(run, micro)
            step += 1
            dt = time.time() - ts
            if t.max_minutes:  # re-planned every step (arithmetic only): the schedule follows the measured pace
                plan.replan(step)
                plan.total = int(_agree(accelerator, plan.total)[0])  # every process follows the main one's plan (and LR)
                run.state["planned_total"] = plan.total
                bar.update(task, total=plan.total)
            row, n_tokens, last_loss = _step_row(run, step, micro, loss_sum, n_loss, grad_norm, dt)
            run_tokens, run_time = run_tokens + n_tokens, run_time + dt
            ending = step >= plan.total or plan.must_stop(step)
            ending_f, stop_f = _agree(accelerator, ending, stop.requested)  # decided once, by the main process
            ending, stop.requested = bool(ending_f), bool(stop_f)
            out_of_time = out_of_time or (ending and step < plan.total)
            if run.val_ex and (step % t.eval_every == 0 or ending):
                tv = time.time()
                stopped_early = _validate(run, step, row)
                bar.update(task, val=f"{run.state['last_val']:.4f}")
                tv = time.time() - tv
                step_extra += tv
                plan.observe_eval(tv)  # validation and saving the best model
            _emit(run, row)
            bar.update(task, completed=step, loss=f"{last_loss:.4f}", tps=f"{run_tokens / run_time:.0f}")
            if step % t.save_every == 0 or ending or stopped_early:
                tc = time.time()
                _checkpoint(run, step)
                tc = time.time() - tc
                step_extra += tc
                plan.observe_save(tc)
            if on_step:
                on_step(step, row, run.model)
            # a step's cost for planning is the whole iteration (logging, callbacks) but validation and saving
            plan.observe(time.time() - ts - step_extra, fresh)
            if stopped_early or ending:
                break
    return {"step": step, "last_loss": last_loss, "stopped_early": stopped_early, "interrupted": interrupted,
            "out_of_time": out_of_time, "tokens_per_s": run_tokens / run_time if run_time else 0.0}


def _idle(run: _Session, j: int):
    """A micro-batch that contributes nothing: example j with every target masked (zero loss, zero gradient)."""
    from dataclasses import replace as dc_replace

    ex = run.train_ex[j]
    if not isinstance(ex, Tokenized):
        raise TrainError(f"a batch of {len(run.train_ex) % run.t.batch_size or run.t.batch_size} {run.t.objective} examples for "
                         f"{run.accelerator.num_processes} processes: with {run.t.objective}, every process needs one; make the "
                         "training examples a multiple of training.batch_size, and batch_size at least the number of processes")
    b = run.setup.batches.make([dc_replace(ex, labels=[IGNORE] * len(ex.labels))], [("idle", j)])
    if isinstance(b, tuple):
        b[0].n_tokens = 0
    return b


def _agree(accelerator, *values) -> tuple[float, ...]:
    """The main process's values on every process (one process: the values): a budget, a stop or a plan that
    differed between processes would leave one waiting for the others."""
    if accelerator.num_processes == 1:
        return tuple(float(v) for v in values)
    from accelerate.utils import broadcast

    return tuple(broadcast(torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device), from_process=0).tolist())


def _base_validation(run: _Session) -> None:
    """The model before training on the validation split, as step 0 of metrics.jsonl: what continued pre-training
    (held-out perplexity) and GRPO (the reward of greedy completions) are measured against."""
    val, fields = run.objective.base_validation(run.setup, run.val_batches)
    run.state["base_val"] = val
    _emit(run, {"step": 0, "val_loss": round(val, 6), **fields})


def _validate(run: _Session, step: int, row: dict) -> bool:
    """Validation loss into the row and the state; the best model saved. Returns whether to stop early."""
    state, t = run.state, run.t
    val, fields = run.objective.validate(run.setup, run.val_batches)
    row.update(fields)
    row["val_loss"] = round(val, 6)
    state["last_val"] = val
    if state["first_val"] is None:
        state["first_val"] = val
    if state["best_val"] is None or val < state["best_val"]:
        state["best_val"], state["bad_evals"] = val, 0
        _save(run, run.out_dir / "model", {**run.meta, "step": step, "val_loss": val})
        return False
    state["bad_evals"] += 1
    return bool(t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience)


def _save(run: _Session, out: Path, meta: dict) -> None:
    """The model to out/ by the main process; sharded, every process first takes part in gathering it."""
    sd = None
    if run.sharded:
        from .sharded import full_state

        sd = full_state(run.model)
    if run.accelerator.is_main_process:
        _save_model(run.setup.loss_module.model, run.tok, out, meta, sd)


def _finish(run: _Session, step: int, last_loss, stopped_early: bool, interrupted: bool, out_of_time: bool, tokens_per_s: float) -> TrainResult:
    """The model (if no validation saved one), the notes, train_summary.json and the result."""
    t, state, plan, out_dir = run.t, run.state, run.plan, run.out_dir
    if t.max_minutes and not interrupted and not stopped_early and step < plan.natural:
        run.notes.append(f"stopped at step {step} of {plan.natural}: training.max_minutes={t.max_minutes:g} "
                         f"({'reached' if out_of_time else 'planned to fit'})")
    if not interrupted and state["best_val"] is None:
        _save(run, out_dir / "model", {**run.meta, "step": step})
    result = TrainResult(
        out_dir=str(out_dir), model_dir=str(out_dir / "model"), steps=step, total_steps=plan.total,
        train_loss=last_loss, first_val_loss=state["first_val"], best_val_loss=state["best_val"],
        last_val_loss=state["last_val"], stopped_early=stopped_early, interrupted=interrupted,
        tokens_per_s=tokens_per_s, peak_memory_mb=_peak_memory_mb(run.loaded.device),
        trainable_params=run.n_trainable, total_params=run.n_total, wall_s=time.time() - run.t0, notes=run.notes,
        defaults=run.default_notes, base_val_loss=state.get("base_val"),
    )
    if run.accelerator.is_main_process:
        atomic_write_json(out_dir / "train_summary.json", {**asdict(result), "adapter": is_adapter(t), "tokens": run.train_stats.summary(),
                                                            "budget_s": plan.seconds, "natural_steps": plan.natural,
                                                            "shared_prefix_tokens": run.setup.start})
        run.tracker.metrics({f"final_{k}": v for k, v in asdict(result).items() if k in ("best_val_loss", "tokens_per_s", "wall_s", "peak_memory_mb")}, step)
        run.tracker.artifact(out_dir / "train_summary.json")
        run.tracker.artifact(out_dir / "metrics.jsonl")
        if is_adapter(t) and not interrupted:  # the adapter (megabytes); a full model stays on disk, its path in the summary
            run.tracker.artifact(out_dir / "model", "adapter")
    return result
