"""`tunewise retrain`: re-training as data changes, behind the gate, journaled in the registry.

One call decides, and acts only when there is something to act on:
- `--when data-changed` (the default): the data key (data/prepared.py `data_key`: the hashes of data.train,
  data.include (e.g. a harvest), the evaluation files, and the data config) differs from that of the last
  re-training, or, before any, from the data the production model was trained on;
- `--when drift`: `tunewise monitor` raises an alert on the production log;
- `--when always`.
Then: prepare -> train (`--start production`: from the production model, its adapter weights as the starting
point or its full weights as the base; `--start base`: fresh) -> the gate against production -> promote or keep.
Every decision is a row of the registry's `retrains` journal (skipped with the reason, or started -> trained ->
done with the gate's action), so a second call with nothing new says so and does nothing, and a call after a kill
(-9 included) finds its unfinished row with the same data key and goes on from the training checkpoint (or from
the gate when training had finished).
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ProjectConfig, replace
from .data.prepared import data_key, inputs_of
from .errors import TunewiseError
from .registry import Registry, registry_path
from .results import RetrainOutcome


class RetrainError(TunewiseError, RuntimeError):
    pass


def _reference_key(reg: Registry, name: str) -> tuple[str | None, str]:
    """The data key new data is compared with: the last re-training's, else the production model's training data."""
    done = [r for r in reg.retrains(name) if r["state"] in ("done", "trained", "started")]
    if done:
        return done[-1]["data_key"], f"the last re-training (#{done[-1]['id']})"
    prod = reg.production(name)
    meta_file = Path(prod.path) / "tunewise.json" if prod else None
    if meta_file and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("data_inputs") and meta.get("config"):
            return data_key(meta["data_inputs"], meta["config"]["data"]), f"the production model {prod.ref}"
    return None, "nothing (no re-training yet and no production model with a data record)"


def _start_config(cfg: ProjectConfig, reg: Registry, name: str, start: str) -> tuple[ProjectConfig, str]:
    prod = reg.production(name)
    if start == "base" or prod is None:
        return cfg, "fresh from the base model" + (" (no production model yet)" if prod is None and start != "base" else "")
    if prod.adapter:
        if cfg.training.method not in ("lora", "dora", "qlora"):
            raise RetrainError(f"--start production: the production model {prod.ref} is an adapter, but training.method is {cfg.training.method}")
        return replace(cfg, "training", init_from=Path(prod.path)), f"from the production adapter {prod.ref}"
    return replace(cfg, "model", name=prod.path), f"from the production model {prod.ref} (full weights)"


def retrain(cfg: ProjectConfig, when: str = "data-changed", start: str = "production", say=print) -> RetrainOutcome:
    from .gate import run_gate
    from .train.checkpoint import list_checkpoints
    from .train.loop import train

    if when not in ("data-changed", "drift", "always"):
        raise RetrainError(f"--when {when}: one of data-changed, drift, always")
    name = cfg.gate.name or cfg.project
    reg = Registry(registry_path(cfg))
    try:
        key = data_key(inputs_of(cfg), cfg.resolved()["data"])
        open_rows = [r for r in reg.retrains(name) if r["state"] in ("started", "trained")]
        row = open_rows[-1] if open_rows and open_rows[-1]["data_key"] == key else None
        if row is None:
            why, reason = _trigger(cfg, reg, name, key, when)
            if why is None:
                reg.journal(name, when, key, "skipped", "nothing to do", details={"reason": reason})
                say(reason)
                return RetrainOutcome(action="nothing to do", reason=reason, journal=reg.retrains(name)[-1])
            run_dir = cfg.run_dir / "retrain"
            rid = reg.journal(name, when, key, "started", details={"reason": why})
            run_dir = run_dir / f"{rid:04d}"
            with reg.tx():
                reg.db.execute("UPDATE retrains SET run_dir=? WHERE id=?", (str(run_dir), rid))
            row = {"id": rid, "state": "started", "run_dir": str(run_dir), "details": {"reason": why}}
            say(f"re-training #{rid}: {why}")
        else:
            say(f"re-training #{row['id']}: resuming ({row['state']}) in {row['run_dir']}")
        run_dir = Path(row["run_dir"])
        tcfg, how = _start_config(cfg, reg, name, start)
        if row["state"] == "started":
            out = run_dir / "train"
            resume = bool(list_checkpoints(out / "checkpoints"))
            say(f"training {how}" + (" (resuming from the last checkpoint)" if resume else ""))
            r = train(tcfg, out, resume=resume, defaults=True, say=say)
            if r.interrupted:
                raise RetrainError(f"training was interrupted; `tunewise retrain` again resumes re-training #{row['id']}")
            reg.journal_update(row["id"], "trained", details={"start": how, "steps": r.steps, "best_val_loss": r.best_val_loss})
        gate = run_gate(cfg, run_dir / "train" / "model")
        reg.journal_update(row["id"], "done", gate.action, {"candidate": gate.candidate, "production": gate.production,
                                                            "reasons": gate.reasons, "gate": str(cfg.run_dir / "gate" / "gate.json")})
        say(f"gate: {gate.action}" + (f" ({'; '.join(gate.reasons)})" if gate.reasons else "") + f"; production: {gate.production}")
        return RetrainOutcome(action=gate.action, gate=gate, journal=reg.retrains(name)[-1])
    finally:
        reg.close()


def _trigger(cfg: ProjectConfig, reg: Registry, name: str, key: str, when: str) -> tuple[str | None, str | None]:
    """(why to re-train now, None) or (None, why not)."""
    if when == "always":
        return "--when always", None
    if when == "drift":
        from .monitor import run_monitor

        m = run_monitor(cfg)
        return (f"the monitor's alerts: {'; '.join(m.alerts)}", None) if m.alerts else (None, "no drift alert from the monitor")
    ref_key, ref = _reference_key(reg, name)
    return (None, f"nothing new: the data is that of {ref}") if ref_key == key else (f"the data changed since {ref}", None)
