"""The training loop, readable top to bottom: load -> method -> data -> optimise -> validate -> save.

Our own loop (no Trainer subclass). Runs through accelerate, so `accelerate launch` spreads it over GPUs.
Two details that other loops get wrong:
  * gradient accumulation divides the summed token loss by the number of loss tokens across *all*
    micro-batches of the step (and processes), not by a per-micro-batch mean;
  * the output head runs only at positions that carry loss (a 49k-vocab head over prompt tokens is
    wasted work), which is exact for models whose logits are lm_head(hidden).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ProjectConfig
from ..data.prepare import ensure_prepared
from ..data.tokenize import IGNORE, batch_order, collate, tokenize_records
from ..models import load_model
from ..util import atomic_replace_dir, atomic_write_json, write_jsonl
from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .methods import apply_method, count_params, is_adapter


class TrainError(RuntimeError):
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
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


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


@torch.no_grad()
def validation_loss(loss_fn: TokenLoss, examples, batch_size: int, pad_id: int, device) -> float:
    loss_fn.model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for k in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[k : k + batch_size]], pad_id)
        batch = {n: t.to(device) for n, t in batch.items()}
        total += loss_fn(**batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    loss_fn.model.train()
    return total / max(count, 1)


def backward_accumulated(loss_fn, micro: list[dict], accelerator) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (summed loss, loss tokens).

    Each micro-batch's summed token loss is divided by the loss-token count of the whole step (all
    micro-batches, all processes), so the gradient equals that of one big batch: a per-micro-batch
    mean would over-weight micro-batches with few answer tokens.
    """
    n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    n_all = accelerator.reduce(torch.tensor(float(n_loss), device=accelerator.device), "sum")
    loss_sum = 0.0
    for k, b in enumerate(micro):
        sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(loss_fn)
        with sync:
            loss = loss_fn(**b)
            # DDP averages gradients over processes; multiplying by their number turns that into a sum.
            accelerator.backward(loss * accelerator.num_processes / n_all)
        loss_sum += loss.item()
    return loss_sum, n_loss


def _save_model(model, tokenizer, out: Path, meta: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "tunewise.json", meta)
    atomic_replace_dir(tmp, out)


def train(cfg: ProjectConfig, out_dir: Path | None = None, resume: bool = False, on_step=None, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t0 = time.time()
    t = cfg.training
    out_dir = Path(out_dir or cfg.run_dir / "train")
    ckpt_root = out_dir / "checkpoints"
    clean_partial(ckpt_root)
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {ckpt_root}")
    if not resume and checkpoints:
        raise TrainError(f"{out_dir} already has checkpoints; pass --resume to continue or --fresh to start over")

    # --- model, method, data -------------------------------------------------------------------
    set_seed(t.seed)
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    tok = loaded.tokenizer
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    prepared = ensure_prepared(cfg, tok)
    train_ex, train_stats = tokenize_records(tok, prepared.splits["train"], cfg.data.max_length)
    val_records = prepared.splits["validation"][: t.eval_samples] if t.eval_samples else prepared.splits["validation"]
    val_ex, _ = tokenize_records(tok, val_records, cfg.data.max_length)
    if not train_ex:
        raise TrainError("no training examples left after preparation (see the data summary)")

    set_seed(t.seed)
    model = apply_method(loaded.model, t)
    model.train()
    n_trainable, n_total = count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    n_batches = math.ceil(len(train_ex) / t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(n_batches * t.epochs / t.grad_accum))
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    loss_fn, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    device = accelerator.device
    pad_id = tok.pad_token_id

    # --- state, resume ------------------------------------------------------------------------
    state = {"position": 0, "best_val": None, "first_val": None, "last_val": None, "bad_evals": 0, "tokens": 0}
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    rows: list[dict] = []
    if resume:
        saved, rng = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        step = saved.pop("step")
        state.update(saved)
        set_rng_state(rng)
        if metrics_path.exists():
            rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("step", 0) <= step]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(metrics_path, rows)
    metrics_file = open(metrics_path, "a", encoding="utf-8")

    orders: dict[int, list[list[int]]] = {}
    lengths = [len(e.input_ids) for e in train_ex]

    def next_batch():
        epoch, i = divmod(state["position"], n_batches)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(lengths, t.batch_size, t.seed + epoch, t.group_by_length)
        state["position"] += 1
        return {k: v.to(device) for k, v in collate([train_ex[j] for j in orders[epoch][i]], pad_id).items()}

    meta = {
        "base_model": cfg.model.name,
        "base_model_path": loaded.path,
        "method": t.method,
        "config": cfg.resolved(),
        "data": prepared.summary.get("outputs"),
        "data_inputs": prepared.summary.get("inputs"),
        "tokens": train_stats.summary(),
    }

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    def ckpt(at_step, at_state, at_rng):
        if accelerator.is_main_process:
            save_checkpoint(ckpt_root, at_step, model, optimizer, scheduler, at_state, at_rng, t.keep_checkpoints)

    # --- the loop -----------------------------------------------------------------------------
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not (progress and accelerator.is_main_process),
    )
    task = bar.add_task("train", total=total_steps, completed=step, loss="-", val="-", tps="-")
    stopped_early = interrupted = False
    last_loss = None
    run_tokens, run_time = 0, 0.0
    with bar, _StopFlag() as stop:
        while step < total_steps:
            if stop.requested:
                interrupted = True
                ckpt(step, dict(state), rng_state())
                break
            ts = time.time()
            micro = [next_batch() for _ in range(t.grad_accum)]
            loss_sum, n_loss = backward_accumulated(loss_fn, micro, accelerator)
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - ts
            n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            state["tokens"] += n_tokens
            run_tokens += n_tokens
            run_time += dt
            last_loss = loss_sum / max(n_loss, 1)
            row = {"step": step, "loss": round(last_loss, 6), "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                   "tokens_per_s": round(n_tokens / dt, 1), "epoch": round(state["position"] / n_batches, 4),
                   "padded_tokens": sum(b["input_ids"].numel() for b in micro), "rows": sum(len(b["input_ids"]) for b in micro)}
            if grad_norm is not None:
                row["grad_norm"] = round(float(grad_norm), 6)
            if val_ex and (step % t.eval_every == 0 or step == total_steps):
                val = validation_loss(loss_fn, val_ex, t.batch_size, pad_id, device)
                row["val_loss"] = round(val, 6)
                state["last_val"] = val
                if state["first_val"] is None:
                    state["first_val"] = val
                if state["best_val"] is None or val < state["best_val"]:
                    state["best_val"], state["bad_evals"] = val, 0
                    if accelerator.is_main_process:
                        _save_model(accelerator.unwrap_model(loss_fn).model, tok, out_dir / "model", {**meta, "step": step, "val_loss": val})
                else:
                    state["bad_evals"] += 1
                    if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                        stopped_early = True
                bar.update(task, val=f"{val:.4f}")
            log(row)
            bar.update(task, completed=step, loss=f"{last_loss:.4f}", tps=f"{run_tokens / run_time:.0f}")
            if step % t.save_every == 0 or step == total_steps or stopped_early:
                ckpt(step, dict(state), rng_state())
            if on_step:
                on_step(step, row, model)
            if stopped_early:
                break
    metrics_file.close()

    if not interrupted and state["best_val"] is None and accelerator.is_main_process:
        _save_model(accelerator.unwrap_model(loss_fn).model, tok, out_dir / "model", {**meta, "step": step})
    result = TrainResult(
        out_dir=str(out_dir), model_dir=str(out_dir / "model"), steps=step, total_steps=total_steps,
        train_loss=last_loss, first_val_loss=state["first_val"], best_val_loss=state["best_val"],
        last_val_loss=state["last_val"], stopped_early=stopped_early, interrupted=interrupted,
        tokens_per_s=run_tokens / run_time if run_time else 0.0, peak_memory_mb=_peak_memory_mb(loaded.device),
        trainable_params=n_trainable, total_params=n_total, wall_s=time.time() - t0,
    )
    if accelerator.is_main_process:
        atomic_write_json(out_dir / "train_summary.json", {**asdict(result), "adapter": is_adapter(t), "tokens": train_stats.summary()})
    return result
