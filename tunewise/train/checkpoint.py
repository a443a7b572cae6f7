"""Atomic checkpoints: written to a temp directory, fsynced, then renamed into place.

A checkpoint holds only what resuming needs: the trainable parameters, the optimizer and scheduler
state, the stream position, early-stopping state and the RNG states snapshotted at the step boundary.
A kill -9 mid-write leaves a `.tmp-*` directory that is ignored and cleaned up next time.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..util import fsync_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, rng: dict, keep: int,
                    tensors: dict | None = None, optim_state: dict | None = None) -> Path:
    """tensors/optim_state: the full trainable tensors and optimizer state when the model is sharded (gathered
    by every process before the main one calls this); else read from the model and optimizer."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    trainable = tensors if tensors is not None else {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optim_state if optim_state is not None else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "sharded": optim_state is not None}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    fsync_dir(tmp)
    final = ckpt_root / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.exists():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def clean_partial(ckpt_root: Path) -> None:
    if ckpt_root.exists():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, sharded: bool = False) -> tuple[dict, dict]:
    """Restore parameters, optimizer and scheduler in place; return (state, rng). sharded: the model is FSDP-sharded
    (every process loads the full tensors into its shards)."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"{path}: checkpoint does not match this model/method (missing {missing[:3]}...)")
    blob = torch.load(path / "optim.pt", weights_only=False)
    if sharded or blob.get("sharded"):  # full tensors keyed by name: they load into shards, or into a plain model
        from .sharded import load_full_state

        load_full_state(model, tensors, optimizer, blob["optimizer"])
    else:
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return json.loads((path / "state.json").read_text()), blob["rng"]
