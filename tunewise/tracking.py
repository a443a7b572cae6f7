"""Experiment tracking: a stage's parameters, per-step metrics, summaries and artifacts sent to the trackers a
project names in `tracking: [mlflow, tensorboard, wandb]`.

- mlflow: the tracking server in MLFLOW_TRACKING_URI, else a local store in the project
  (`<run>/mlflow/mlflow.db`, artifacts beside it): works offline; `mlflow ui --backend-store-uri
  sqlite:///runs/<project>/mlflow/mlflow.db` browses it. One experiment per project, one run per stage.
- tensorboard: event files under `<run>/tensorboard/<stage>` (`tensorboard --logdir runs/<project>/tensorboard`).
- wandb: project = the project name, files under `<run>/wandb`; offline (sync later with `wandb sync`) unless
  WANDB_MODE or an API key says otherwise.

A training run keeps its tracker run ids in `<train dir>/tracking.json`, so `--resume` goes on in the same
MLflow/W&B run and the same TensorBoard directory. The libraries are optional extras: a tracker that is
configured but not installed is an error before any work starts, naming the extra to install.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .errors import TunewiseError

EXTRAS = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
MAX_PARAM_CHARS = 500  # MLflow refuses long values; a system prompt can be longer


class TrackingError(TunewiseError, RuntimeError):
    pass


def require(names) -> None:
    """A clear error for a configured tracker whose library is missing (checked before a stage starts)."""
    import importlib.util

    for name in names:
        module, package = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"tracking: {name} is configured but the {package} package is not installed; "
                                f"install it with: pip install 'tunewise[{name}]' (or remove {name} from tracking:)")


def flatten(d: dict, prefix: str = "") -> dict[str, str | float | int | bool]:
    """Nested config -> {"training.learning_rate": 0.001, ...}; lists and long strings as short text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float, bool)) or v is None:
            out[key] = v if v is not None else "null"
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
    return out


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(float(v))}


class _MLflow:
    def __init__(self, cfg, stage: str, run_id: str | None):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database migration notes are not ours to print
        self.mlflow = mlflow
        root = cfg.run_dir / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.project, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "artifacts").as_uri())
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=f"{stage} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                                 tags={"tunewise.stage": stage, "tunewise.project": cfg.project}).info.run_id
        self.uri = uri

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        have = {p for p in self.client.get_run(self.run_id).data.params}  # a resumed run keeps its params (MLflow forbids changing them)
        items = [Param(k, str(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifact(self, path: Path, where: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), where)
        else:
            self.client.log_artifact(self.run_id, str(path), where)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}[status])


class _TensorBoard:
    def __init__(self, cfg, stage: str, logdir: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = logdir or str(cfg.run_dir / "tensorboard" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.writer = SummaryWriter(self.run_id)
        self.stage = stage

    def params(self, params: dict) -> None:
        self.writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        self.writer.flush()

    def artifact(self, path: Path, where: str | None) -> None:  # TensorBoard keeps scalars and text, not files
        pass

    def close(self, status: str) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg, stage: str, run_id: str | None):
        import wandb

        self.wandb = wandb
        cfg.run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes <dir>/wandb/
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=cfg.project, name=stage, job_type=stage, dir=str(cfg.run_dir), mode=mode,
                              id=run_id, resume="allow" if run_id else None, reinit="create_new",
                              settings=wandb.Settings(silent=True))
        self.run_id = self.run.id

    def params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path, where: str | None) -> None:
        art = self.wandb.Artifact(name=(where or path.name).replace("/", "-"), type="model" if path.is_dir() else "file")
        (art.add_dir if path.is_dir() else art.add_file)(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


BACKENDS = {"mlflow": _MLflow, "tensorboard": _TensorBoard, "wandb": _WandB}


class Tracker:
    """Every configured tracker for one stage (none configured, or not the main process: does nothing).
    With `state_file`, the trackers' run ids are kept there and a later Tracker on the same file continues them."""

    def __init__(self, cfg, stage: str, state_file: Path | None = None, enabled: bool = True):
        names = list(cfg.tracking) if enabled else []
        require(names)
        self.state_file = state_file
        saved = json.loads(state_file.read_text()) if state_file and state_file.exists() else {}
        self.backends = {}
        for name in names:
            try:
                self.backends[name] = BACKENDS[name](cfg, stage, saved.get(name))
            except TrackingError:
                raise
            except Exception as e:  # a tracker that cannot start (a server that does not answer) names itself
                raise TrackingError(f"tracking: {name} could not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if state_file and self.backends:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({n: b.run_id for n, b in self.backends.items()}))

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, method: str, *args) -> None:
        for name, b in self.backends.items():
            try:
                getattr(b, method)(*args)
            except Exception as e:  # tracking must never end a training run: say so once and go on without it
                import warnings

                warnings.warn(f"tracking: {name}.{method} failed ({type(e).__name__}: {e}); {name} is off for the rest of this stage")
                self.backends = {n: x for n, x in self.backends.items() if n != name}

    def params(self, params: dict) -> None:
        if self.backends:
            self._each("params", flatten(params))

    def metrics(self, row: dict, step: int) -> None:
        values = numeric(row)
        if self.backends and values:
            self._each("metrics", values, step)

    def artifact(self, path: Path, where: str | None = None) -> None:
        if self.backends and Path(path).exists():
            self._each("artifact", Path(path), where)

    def close(self, status: str = "finished") -> None:
        self._each("close", status)
        self.backends = {}
