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

from ..errors import TunewiseError
from ..config import ProjectConfig
from ..data.prepare import ensure_prepared
from ..data.tokenize import IGNORE, Tokenized, batch_order, collate, tokenize_records
from ..models import load_model
from ..util import atomic_replace_dir, atomic_write_json, write_jsonl
from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .budget import Plan, lr_factor
from .forward import FrozenCache, LayoutLoss, llama_parts, summed_cross_entropy
from .layout import make_layout, shared_prefix
from .methods import apply_method, count_params, decoder_layers, is_adapter
from .sharded import local


class TrainError(TunewiseError, RuntimeError):
    pass


class TokenLoss(torch.nn.Module):
    """Summed cross-entropy over loss tokens of a batch; the head runs only where labels are set."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        self.sparse = not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))
        self._base = [base]  # a list keeps it out of the module tree (it is already inside self.model)

    def forward(self, input_ids, attention_mask, labels):
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.sparse:
            base = self._base[0]
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
        return summed_cross_entropy(logits, targets[keep])


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


def _n_loss(b) -> int:
    """What a micro-batch's summed loss is divided by: loss tokens (a padded batch, a (Layout, keys) pair or GRPO's
    layouts per prompt), or pairs for the preference objectives."""
    if isinstance(b, tuple):
        return b[0].n_loss
    if "groups" in b:
        return sum(layout.n_loss for layout, _ in b["groups"])
    if "ref" in b:  # preference pairs (chosen rows, then rejected): the loss is summed per pair
        return b["input_ids"].shape[0] // 2
    return int((b["labels"][:, 1:] != IGNORE).sum())


def _loss(loss_fn, b):
    return loss_fn(*b) if isinstance(b, tuple) else loss_fn(**b)


@torch.no_grad()
def validation_loss(loss_fn, batches) -> float:
    """Mean token loss over micro-batches (plain dicts or (Layout, keys) pairs)."""
    loss_fn.model.eval()
    total, count = 0.0, 0
    for b in batches:
        total += _loss(loss_fn, b).item()
        count += _n_loss(b)
    loss_fn.model.train()
    return total / max(count, 1)


def backward_accumulated(loss_fn, micro: list, accelerator) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (summed loss, loss tokens).

    Each micro-batch's summed token loss is divided by the loss-token count of the whole step (all
    micro-batches, all processes), so the gradient equals that of one big batch: a per-micro-batch
    mean would over-weight micro-batches with few answer tokens.
    """
    n_loss = sum(_n_loss(b) for b in micro)
    n_all = accelerator.reduce(torch.tensor(float(n_loss), device=accelerator.device), "sum")
    loss_sum = 0.0
    for k, b in enumerate(micro):
        sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(loss_fn)
        with sync:
            loss = _loss(loss_fn, b)
            # DDP averages gradients over processes; multiplying by their number turns that into a sum.
            accelerator.backward(loss * accelerator.num_processes / n_all)
        loss_sum += loss.item()
    return loss_sum, n_loss


def _save_model(model, tokenizer, out: Path, meta: dict, state_dict: dict | None = None) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "tunewise.json", meta)
    atomic_replace_dir(tmp, out)


class Batches:
    """Micro-batches as the loss module takes them: (Layout, keys) for LayoutLoss, padded dicts otherwise.

    The layout options come from the config; `start` is the prefix every example of the run shares, which
    the frozen cache is keyed on (0 when prefixes are not shared)."""

    def __init__(self, t, pad_id: int, device, layouts: bool, start: int):
        self.t, self.pad_id, self.device, self.layouts, self.start = t, pad_id, device, layouts, start

    def make(self, examples, keys):
        if not self.layouts:
            return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}
        layout = make_layout(examples, self.pad_id, self.t.share_prefix, self.t.packing, at_least=self.start)
        return layout.to(self.device), keys

    def sorted_batches(self, examples, tag: str, batch_size: int):
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        return [self.make([examples[i] for i in order[k : k + batch_size]], [(tag, i) for i in order[k : k + batch_size]])
                for k in range(0, len(order), batch_size)]


def _stats(b) -> tuple[int, int, int]:
    """(real tokens, computed tokens, rows) of a micro-batch: a shared prefix is computed once but counted once
    per example as a real token, as the peers count it."""
    if isinstance(b, tuple):
        lay = b[0]
        return lay.n_tokens, lay.prefix_len + lay.input_ids.numel(), lay.input_ids.shape[0] + (1 if lay.prefix_len else 0)
    if "groups" in b:
        return tuple(sum(x) for x in zip(*(_stats((lay, None)) for lay, _ in b["groups"])))
    return int(b["attention_mask"].sum()), b["input_ids"].numel(), len(b["input_ids"])


def _preference_pairs(cfg: ProjectConfig, tok, train_records, val_records):
    """(train pairs, validation pairs) for the preference objectives; None for sft."""
    t = cfg.training
    if t.objective in ("sft", "pretrain", "grpo"):
        return None
    from .preference import tokenize_pairs, tokenize_unpaired

    fn = tokenize_unpaired if t.objective == "kto" else tokenize_pairs
    train, dropped = fn(tok, train_records, cfg.data.max_length)
    if not train:
        wanted = ("unpaired feedback or preference pairs, and the training split has neither (use trl-kto, openai-preference, "
                  "trl-preference or hh-rlhf" if t.objective == "kto" else
                  "preference pairs, and the training split has none (use openai-preference, trl-preference or hh-rlhf")
        raise TrainError(f"training.objective: {t.objective} needs {wanted}; data.format is {cfg.data.format})"
                         + (f"; {dropped} do not fit data.max_length={cfg.data.max_length}" if dropped else ""))
    return train, fn(tok, val_records, cfg.data.max_length)[0]


def _loss_module(model, t, train_ex, val_ex, notes: list[str]):
    """LayoutLoss (prefix sharing, packing, frozen cache) where the model allows it, else the plain TokenLoss."""
    if llama_parts(model) is None:
        if t.share_prefix or t.packing or (t.method == "freeze" and t.cache_frozen):
            notes.append("share_prefix/packing/cache_frozen: off (the model is not Llama-shaped; plain padded batches)")
        return TokenLoss(model), False, 0, None
    start = shared_prefix(train_ex + val_ex) if t.share_prefix else 0
    first, cache = 0, None
    if t.method == "freeze" and t.cache_frozen:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        n_layers = len(decoder_layers(base))
        dropout = max(float(getattr(cfg, k, 0.0) or 0.0) for k in ("attention_dropout", "hidden_dropout", "resid_pdrop"))
        tokens = sum(len(e.input_ids) - start for e in train_ex + val_ex)
        nbytes = tokens * cfg.hidden_size * base.dtype.itemsize
        limit = _cache_limit_bytes()
        if dropout:
            notes.append(f"cache_frozen: off (the frozen layers have dropout {dropout})")
        elif nbytes > limit:
            notes.append(f"cache_frozen: off ({nbytes / 2**30:.1f} GiB of hidden states > {limit / 2**30:.1f} GiB, a quarter of memory)")
        else:
            first, cache = n_layers - t.trainable_layers, FrozenCache(start)
            notes.append(f"cache_frozen: layers 0-{first - 1} run once per example ({nbytes / 2**20:.0f} MiB of hidden states)")
    return LayoutLoss(model, first, cache), True, start, cache


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


def _objective_setup(t, model, tok, device, pairs, train_ex, val_ex, train_records, val_records, notes: list[str], say):
    """The objective's loss module and what it trains on: (loss module, layouts?, shared prefix, frozen cache, train, val).
    Pairs (dpo, orpo, kto) and prompts (grpo) replace the tokenized examples; the reference is the model as it is now."""
    if pairs is not None:  # dpo / orpo / kto: pairs replace the examples; the reference is the model as it is now
        from .preference import REFERENCE, PreferenceLoss, reference_logps

        train_ex, val_ex = pairs
        if t.objective in REFERENCE:
            if say:
                say(f"{t.objective}: the reference log-probs of {len(train_ex) + len(val_ex):,} {'pairs' if t.objective == 'dpo' else 'examples'}, "
                    "once, from the model before training")
            reference_logps(model, train_ex + val_ex, tok.pad_token_id, device, t.batch_size)
        p = t.preference
        loss_module = PreferenceLoss(model, t.objective, p.beta, p.label_smoothing, p.sft_weight, p.desirable_weight, p.undesirable_weight)
        layouts, start, cache = False, 0, None
        if t.share_prefix or t.packing or (t.method == "freeze" and t.cache_frozen):
            notes.append(f"share_prefix/packing/cache_frozen: off for objective {t.objective} (pairs run as padded rows)")
    elif t.objective == "grpo":  # prompts replace the examples; each step samples and scores their completions
        from .grpo import GRPOLoss, prompts_of

        train_ex, val_ex = prompts_of(tok, train_records), prompts_of(tok, val_records)
        loss_module, layouts, start, cache = GRPOLoss(model, t.grpo.beta, t.grpo.epsilon), False, 0, None
    else:
        loss_module, layouts, start, cache = _loss_module(model, t, train_ex, val_ex, notes)
    return loss_module, layouts, start, cache, train_ex, val_ex


def _rollout_labels(cfg: ProjectConfig, prepared) -> list[str] | None:
    """The label set GRPO's rollouts decode into (training.grpo.constrain; auto: as evaluation.constrain resolves)."""
    mode = cfg.training.grpo.constrain
    if mode == "none":
        return None
    from ..eval.evaluate import EvalError, label_set

    try:
        return label_set(cfg if mode == "auto" else cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"constrain": "labels"})}), prepared)
    except EvalError:
        raise TrainError("training.grpo.constrain: labels, but the data has no labels (set data.columns.label, or training.grpo.constrain: none)") from None


def _cache_limit_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 * 2**30


class _Session:
    """What one training run holds between setup, the loop and the end (built by _setup)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


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
    from torch.optim.lr_scheduler import LambdaLR

    t0 = time.time()
    ckpt_root = out_dir / "checkpoints"
    clean_partial(ckpt_root)
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and checkpoints:
        raise TrainError(f"{out_dir} already has checkpoints; pass --resume to continue or --fresh to start over")

    set_seed(cfg.training.seed)
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, quantize_4bit=cfg.training.method == "qlora")
    tok = loaded.tokenizer
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    prepared = ensure_prepared(cfg, tok)
    n_val = cfg.training.eval_samples
    val_records = prepared.splits["validation"][:n_val] if n_val else prepared.splits["validation"]
    if cfg.training.objective == "pretrain":  # documents end to end in blocks, every token a target
        from ..data.text import text_blocks

        train_ex, train_stats = text_blocks(tok, prepared.splits["train"], cfg.data.max_length)
        val_ex = text_blocks(tok, prepared.splits["validation"], cfg.data.max_length)[0]
        val_ex = val_ex[:n_val] if n_val else val_ex
    else:
        train_ex, train_stats = tokenize_records(tok, prepared.splits["train"], cfg.data.max_length)
        val_ex, _ = tokenize_records(tok, val_records, cfg.data.max_length)
    if not train_ex:
        raise TrainError("no training examples left after preparation (see the data summary)")
    pairs = _preference_pairs(cfg, tok, prepared.splits["train"], val_records)
    default_notes: list[str] = []
    if defaults:  # deterministic from the data and config, so a resumed run gets the same settings
        from .defaults import auto_training, data_facts

        f = data_facts(prepared.splits["train"], train_ex)
        if cfg.training.objective == "pretrain":
            f["examples"] = len(train_ex)  # blocks, not documents
        cfg, default_notes = auto_training(cfg, f["examples"], f["mean_tokens"], loaded.model.num_parameters(), f["answer_tokens"],
                                           len(decoder_layers(loaded.model)), f["labelled"])
        if say:
            say("training settings: " + "; ".join(default_notes))
    t = cfg.training

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
    loss_module, layouts, start, cache, train_ex, val_ex = _objective_setup(t, model, tok, loaded.device, pairs, train_ex, val_ex,
                                                                            prepared.splits["train"], val_records, notes, say)
    if accelerator.num_processes > t.batch_size:
        if t.objective not in ("sft", "pretrain"):
            raise TrainError(f"training.batch_size={t.batch_size} is smaller than the {accelerator.num_processes} processes: with "
                             f"{t.objective} every process needs at least one example per step; raise batch_size or use fewer processes")
        notes.append(f"batch_size={t.batch_size} < {accelerator.num_processes} processes: {accelerator.num_processes - t.batch_size} of them "
                     "run a masked copy each step (no loss, no gradient) so that the collectives meet")
    layers = decoder_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if sharded:  # the optimizer is built on the shards
        from .sharded import shard

        shard(loss_module, layers)
        notes.append(f"fsdp: parameters, gradients and optimizer state sharded over {accelerator.num_processes} processes")
    elif t.fsdp:
        notes.append("fsdp: one process, nothing to shard (use --processes N)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    n_batches = math.ceil(len(train_ex) / t.batch_size)
    natural = t.max_steps or max(1, math.ceil(n_batches * t.epochs / t.grad_accum))
    n_layers = len(layers)
    first = loss_module.first_trainable if cache is not None else 0
    # a cached step runs the trainable layers only (forward + backward ~ 3x), a fresh one also the frozen forward
    plan = Plan(natural, t.max_minutes * 60 if t.max_minutes else None, t0,
                fresh_steps=math.ceil(n_batches / t.grad_accum) if cache is not None else 0,
                cached_ratio=3 * (n_layers - first) / (first + 3 * (n_layers - first)),
                eval_every=t.eval_every, has_validation=bool(val_ex))
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, plan.total, int(t.warmup_ratio * plan.total), t.scheduler))
    if sharded:  # FSDP syncs the gradients itself
        loss_fn = loss_module
    else:  # accelerate wraps it in DDP when there are several processes
        loss_fn, optimizer = accelerator.prepare(loss_module, optimizer)
    if t.objective == "grpo":
        from .grpo import Rollouts

        batches = Rollouts(loaded, model, t.grpo, t.seed, tok.pad_token_id, accelerator.device, groups=loss_module.groups,
                           labels=_rollout_labels(cfg, prepared), cfg=cfg)
        model.train()  # the engine put it in eval mode
    else:
        from .preference import PairBatches

        batches = (PairBatches(tok.pad_token_id, accelerator.device) if pairs is not None
                   else Batches(t, tok.pad_token_id, accelerator.device, layouts, start))

    state = {"position": 0, "best_val": None, "first_val": None, "last_val": None, "bad_evals": 0, "tokens": 0, "planned_total": natural}
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    rows: list[dict] = []
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
    meta = {"base_model": cfg.model.name, "base_model_path": loaded.path, "method": t.method, "objective": t.objective, "config": cfg.resolved(),
            "data": prepared.summary.get("outputs"), "data_inputs": prepared.summary.get("inputs"), "tokens": train_stats.summary()}
    return _Session(cfg=cfg, t=t, t0=t0, out_dir=out_dir, ckpt_root=ckpt_root, loaded=loaded, tok=tok, accelerator=accelerator,
                    train_ex=train_ex, train_stats=train_stats, val_ex=val_ex, default_notes=default_notes, model=model,
                    n_trainable=n_trainable, n_total=n_total, params=params, optimizer=optimizer, scheduler=scheduler, notes=notes,
                    loss_fn=loss_fn, loss_module=loss_module, cache=cache, start=start, n_batches=n_batches, plan=plan, batches=batches,
                    val_batches=batches.sorted_batches(val_ex, "v", t.batch_size), state=state, step=step, meta=meta, sharded=sharded,
                    metrics_file=open(metrics_path, "a", encoding="utf-8") if main else open(os.devnull, "w"))


def _loop(run: _Session, on_step, progress: bool) -> dict:
    """Optimise until the planned last step, the budget, early stopping or Ctrl-C. Every exit but Ctrl-C is at
    the end of a step, after that step's validation and checkpoint."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    t, state, plan, accelerator, cache = run.t, run.state, run.plan, run.accelerator, run.cache
    orders: dict[int, list[list[int]]] = {}
    lengths = [len(e.input_ids) for e in run.train_ex]

    def next_batch():
        epoch, i = divmod(state["position"], run.n_batches)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(lengths, t.batch_size, t.seed + epoch, t.group_by_length)
        state["position"] += 1
        idx = orders[epoch][i]
        if accelerator.num_processes > 1:  # data parallel: each process takes its share of the global batch
            share = idx[accelerator.process_index :: accelerator.num_processes]
            if not share:  # fewer examples than processes (an epoch's last batch): a copy of one with no loss target
                return _idle(run, idx[0])  # runs the same forward and backward, so the collectives still meet
            idx = share
        return run.batches.make([run.train_ex[j] for j in idx], [("t", j) for j in idx])

    def ckpt(at_step):
        full = {}
        if run.sharded:  # every process takes part in gathering the full tensors; the main one writes them
            from .sharded import full_optimizer_state, full_state

            full = {"tensors": full_state(run.model, trainable_only=True), "optim_state": full_optimizer_state(run.model, run.optimizer)}
        if accelerator.is_main_process:
            save_checkpoint(run.ckpt_root, at_step, run.model, run.optimizer, run.scheduler, dict(state), rng_state(), t.keep_checkpoints, **full)

    bar = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not (progress and accelerator.is_main_process),
    )
    step = run.step
    task = bar.add_task("train", total=plan.total, completed=step, loss="-", val="-", tps="-")
    stopped_early = interrupted = out_of_time = False
    last_loss = None
    run_tokens, run_time = 0, 0.0
    if t.objective in ("pretrain", "grpo") and step == 0 and run.val_ex and state.get("base_val") is None:
        _base_validation(run)
    with bar, _StopFlag() as stop:
        while step < plan.total:
            if stop.requested:
                interrupted = True
                ckpt(step)
                break
            ts = time.time()
            step_extra = 0.0  # validation and checkpoint time inside this iteration (planned apart)
            micro = [next_batch() for _ in range(t.grad_accum)]
            fresh = cache is not None and not all(cache.has(b[1]) for b in micro)
            loss_sum, n_loss = backward_accumulated(run.loss_fn, micro, accelerator)
            grad_norm = local(accelerator.clip_grad_norm_(run.params, t.max_grad_norm)) if t.max_grad_norm else None
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - ts
            if t.max_minutes:  # re-planned every step (arithmetic only): the schedule follows the measured pace
                plan.replan(step)
                plan.total = int(_agree(accelerator, plan.total)[0])  # every process follows the main one's plan (and LR)
                state["planned_total"] = plan.total
                bar.update(task, total=plan.total)
            n_tokens, computed, n_rows = (sum(x) for x in zip(*map(_stats, micro)))
            if accelerator.num_processes > 1:  # the step's loss and tokens over all processes
                loss_sum, n_loss, n_tokens = accelerator.reduce(torch.tensor([loss_sum, float(n_loss), float(n_tokens)], dtype=torch.float64,
                                                                             device=accelerator.device), "sum").tolist()
                n_loss, n_tokens = int(n_loss), int(n_tokens)
            state["tokens"] += n_tokens
            run_tokens += n_tokens
            run_time += dt
            last_loss = loss_sum / max(n_loss, 1)
            row = {"step": step, "loss": round(last_loss, 6), "lr": run.scheduler.get_last_lr()[0], "tokens": state["tokens"],
                   "tokens_per_s": round(n_tokens / dt, 1), "epoch": round(state["position"] / run.n_batches, 4),
                   "padded_tokens": computed, "rows": n_rows, "elapsed_s": round(time.time() - run.t0, 3)}
            if grad_norm is not None:
                row["grad_norm"] = round(float(grad_norm), 6)
            _objective_stats(run, row)
            ending = step >= plan.total or plan.must_stop(step)
            ending_f, stop_f = _agree(accelerator, ending, stop.requested)  # decided once, by the main process
            ending, stop.requested = bool(ending_f), bool(stop_f)
            out_of_time = out_of_time or (ending and step < plan.total)
            if run.val_ex and (step % t.eval_every == 0 or ending):
                tv = time.time()
                stopped_early = _validate(run, step, row)
                bar.update(task, val=f"{state['last_val']:.4f}")
                tv = time.time() - tv
                step_extra += tv
                plan.observe_eval(tv)  # validation and saving the best model
            _emit(run, row)
            bar.update(task, completed=step, loss=f"{last_loss:.4f}", tps=f"{run_tokens / run_time:.0f}")
            if step % t.save_every == 0 or ending or stopped_early:
                tc = time.time()
                ckpt(step)
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
    b = run.batches.make([dc_replace(ex, labels=[IGNORE] * len(ex.labels))], [("idle", j)])
    if isinstance(b, tuple):
        b[0].n_tokens = 0
    return b


def _objective_stats(run: _Session, row: dict) -> None:
    """The objective's own numbers of the step into its metrics row: preference margin and accuracy (the last
    micro-batch), KL (kto, grpo), the rollouts' rewards (grpo)."""
    stats = getattr(run.loss_module, "stats", None)
    if stats and "pairs" in stats:
        row["reward_margin"] = round(stats["margin_sum"] / max(stats["pairs"], 1), 6)
        row["pref_accuracy"] = round(stats["correct"] / max(stats["pairs"], 1), 4)
    if stats and "kl" in stats:
        row["kl"] = round(stats["kl"], 6)
    row.update(getattr(run.batches, "last_stats", None) or {})


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
    if run.t.objective == "grpo":
        reward = run.batches.validate(run.val_batches)["reward"]
        run.state["base_val"], row = -reward, {"step": 0, "val_loss": round(-reward, 6), "val_reward": round(reward, 6)}
    else:
        val = validation_loss(run.loss_module, run.val_batches)
        run.state["base_val"], row = val, {"step": 0, "val_loss": round(val, 6), "val_perplexity": round(math.exp(min(val, 50.0)), 4)}
    _emit(run, row)


def _validate(run: _Session, step: int, row: dict) -> bool:
    """Validation loss into the row and the state; the best model saved. Returns whether to stop early."""
    state, t = run.state, run.t
    if t.objective == "grpo":  # the validation loss is minus the mean reward of greedy completions
        v = run.batches.validate(run.val_batches)
        val = -v["reward"]
        row["val_reward"] = round(v["reward"], 6)
    elif t.objective in ("sft", "pretrain"):
        val = validation_loss(run.loss_module, run.val_batches)
        if t.objective == "pretrain":
            row["val_perplexity"] = round(math.exp(min(val, 50.0)), 4)
    else:
        from .preference import preference_validation

        v = preference_validation(run.loss_module, run.val_batches)
        val = v["loss"]
        row["val_pref_accuracy"], row["val_reward_margin"] = round(v["accuracy"], 4), round(v["margin"], 6)
        state["val_pref_accuracy"] = v["accuracy"]
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
        _save_model(run.loss_module.model, run.tok, out, meta, sd)


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
                                                            "shared_prefix_tokens": run.start})
        run.tracker.metrics({f"final_{k}": v for k, v in asdict(result).items() if k in ("best_val_loss", "tokens_per_s", "wall_s", "peak_memory_mb")}, step)
        run.tracker.artifact(out_dir / "train_summary.json")
        run.tracker.artifact(out_dir / "metrics.jsonl")
        if is_adapter(t) and not interrupted:  # the adapter (megabytes); a full model stays on disk, its path in the summary
            run.tracker.artifact(out_dir / "model", "adapter")
    return result
