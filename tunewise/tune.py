"""`tunewise tune`: hyperparameter search over our own training loop, with Optuna.

A study over `tune.space` (config paths, as `--set` takes them, each a float/int range or a list of choices),
sampled by TPE. A trial loads the config with its values as overrides (so they count as the user's choices and
train/defaults.py fills only the rest), trains through the loop and its budget (`tune.trial_minutes` ->
`training.max_minutes`), and is scored by `goal.metric` on the validation split (`tune.eval_samples` items,
through the evaluation stage, with a bootstrap CI) or by its best validation loss. Each validation loss is
reported to the pruner (median or Hyperband), which stops a trial that falls behind the earlier trials at the
same step. The first trial is what train/defaults.py picks (`tune.start_from_defaults`), so the best can only match
or beat the defaults. The study lives in Optuna's storage: a SQLite file in `<run>/tune/` by default, so an interrupted
study resumes (a trial whose process died is retried once, by its heartbeat), or a PostgreSQL URL that workers
on several machines share. `--workers N` starts N-1 more processes on this machine, each with its share of the
CPU threads. Outputs: `best.yaml` (the best values as a config overlay, with the `--set` line that applies
them), `trials.json` and `report.html` (the optimisation history, parameter importances, the trials with CIs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .config import ProjectConfig, VariantConfig, load_config, replace
from .errors import TunewiseError
from .results import TuneResult

LOWER_IS_BETTER = ("loss", "perplexity", "hallucination", "nll")


class TuneError(TunewiseError, ValueError):
    pass


def _direction(cfg: ProjectConfig) -> str:
    if cfg.tune.objective == "val_loss" or any(w in cfg.goal.metric for w in LOWER_IS_BETTER):
        return "minimize"
    return "maximize"


def storage_url(cfg: ProjectConfig, storage: str | None = None) -> str:
    url = storage or cfg.tune.storage
    if url:  # SQLAlchemy's plain postgresql:// means psycopg2; we ship psycopg 3
        return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url
    (cfg.run_dir / "tune").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{cfg.run_dir / 'tune' / 'study.db'}"


def _study(cfg: ProjectConfig, url: str, rank: int = 0):
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
              "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}[cfg.tune.pruner]
    storage = RDBStorage(url, heartbeat_interval=30, grace_period=120, failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    return optuna.create_study(study_name=cfg.project, storage=storage, direction=_direction(cfg), load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed + rank), pruner=pruner)


def check_space(config_path: Path, overrides: list[str], cfg: ProjectConfig) -> None:
    """Every searched key is a config path whose values validate: a bad one is a TuneError naming tune.space.KEY."""
    from .config import ConfigError

    if not cfg.tune.space:
        raise TuneError("tune.space: empty; give at least one config path to search")
    for key, p in cfg.tune.space.items():
        for v in (p.choices or [p.low, p.high]):
            value = int(v) if p.type == "int" else v
            try:
                load_config(config_path, overrides + [f"{key}={json.dumps(value)}"])
            except ConfigError as e:
                raise TuneError(f"tune.space.{key}: {value!r} is not a valid value of {key}: {str(e).splitlines()[-1].strip()}") from None


def _suggest(trial, space) -> dict:
    out = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return out


def _train_and_score(cfg: ProjectConfig, out: Path, name: str, on_step=None) -> tuple[float, dict]:
    """Train through the loop (defaults fill what the config does not set) and score on validation: (value, attributes)."""
    from .eval.evaluate import evaluate
    from .train.loop import train

    t0 = time.time()
    r = train(cfg, out, defaults=True, progress=False, on_step=on_step)
    attrs = {"steps": r.steps, "best_val_loss": r.best_val_loss, "train_s": round(r.wall_s, 1), "defaults": r.defaults}
    if cfg.tune.objective == "val_loss":
        if r.best_val_loss is None:
            raise TuneError("tune.objective: val_loss, but the trial has no validation split")
        value = r.best_val_loss
    else:
        ev = replace(cfg, "evaluation", split="validation", max_samples=cfg.tune.eval_samples, perplexity=False)
        s = evaluate(ev, VariantConfig(name=name, kind="fine-tuned", adapter=out / "model"), out_root=cfg.run_dir / "tune" / "eval")
        m = s.metrics.get(cfg.goal.metric)
        if m is None:
            raise TuneError(f"goal.metric: {cfg.goal.metric} is not measured (evaluation.metrics has {', '.join(s.metrics)})")
        value = m.mean
        attrs["ci95"] = m.ci95
    attrs["wall_s"] = round(time.time() - t0, 1)
    return value, attrs


def _distribution(p):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.type == "categorical":
        return CategoricalDistribution(p.choices)
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log)
    return FloatDistribution(p.low, p.high, log=p.log)


def _trial_config(config_path: Path, overrides: list[str], params: dict) -> ProjectConfig:
    """A trial's config: the user's, the trial's values as overrides (so they count as set), tune.trial_minutes as
    the training budget."""
    minutes = load_config(config_path, overrides).tune.trial_minutes
    extra = [f"{k}={json.dumps(v)}" for k, v in params.items()] + ([f"training.max_minutes={minutes}"] if minutes else [])
    return load_config(config_path, overrides + extra)


def defaults_trial(config_path: Path, overrides: list[str], study, say) -> dict:
    """The settings train/defaults.py picks, trained and scored like a trial; added to the study as its first trial
    when every searched key's value lies in the space (so TPE starts from them and the best can only match or beat
    them), else recorded apart as the baseline. Returns what was found."""
    import optuna

    cfg = _trial_config(config_path, overrides, {})
    out = cfg.run_dir / "tune" / "defaults"
    if out.exists():
        shutil.rmtree(out)
    say("trial defaults: the settings train/defaults.py picks")
    value, attrs = _train_and_score(cfg, out, "defaults")
    used = json.loads((out / "model" / "tunewise.json").read_text())["config"]
    params, dists = {}, {}
    for key, p in cfg.tune.space.items():
        node = used
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        dist = _distribution(p)
        if node is not None and dist._contains(dist.to_internal_repr(node)):
            params[key], dists[key] = node, dist
    say(f"trial defaults: {cfg.tune.objective if cfg.tune.objective == 'val_loss' else cfg.goal.metric} = {value:.4f} "
        f"({attrs['steps']} steps; {', '.join(f'{k}={v}' for k, v in params.items())})")
    found = {"value": value, "params": params, **attrs}
    if len(params) == len(cfg.tune.space):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, user_attrs={**attrs, "is_defaults": True}))
    study.set_user_attr("defaults", found)
    return found


def _objective(config_path: Path, overrides: list[str], say):
    import optuna

    def objective(trial) -> float:
        params = _suggest(trial, load_config(config_path, overrides).tune.space)
        cfg = _trial_config(config_path, overrides, params)
        out = cfg.run_dir / "tune" / f"trial-{trial.number}"
        if out.exists():  # a retried trial starts over
            shutil.rmtree(out)
        sign = 1.0 if _direction(cfg) == "minimize" else -1.0
        trial.set_user_attr("pid", os.getpid())
        say(f"trial {trial.number}: {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())}")

        def on_step(step, row, model):
            if "val_loss" in row:  # the pruner compares intermediate values in the study's direction
                trial.report(sign * row["val_loss"], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation loss {row['val_loss']:.4f} at step {step}")

        value, attrs = _train_and_score(cfg, out, f"trial-{trial.number}", on_step)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        say(f"trial {trial.number}: {cfg.tune.objective if cfg.tune.objective == 'val_loss' else cfg.goal.metric} = {value:.4f} "
            f"({attrs['steps']} steps, {attrs['wall_s']:.0f} s)")
        return value

    return objective


class _EnoughTrials:
    """Stops this worker once the study's finished and running trials make `n`. Optuna's MaxTrialsCallback counts
    only finished ones, so a worker starts another trial while the last ones are still running elsewhere, and N
    workers overshoot by up to N - 1 whole trials (measured: 5 trials for 4 with two workers). Trials of workers
    that died (stale heartbeat) are failed first, so they are not counted as running (and are retried once)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, study, trial) -> None:
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        fail_stale_trials(study)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))) >= self.n:
            study.stop()


def run_tune(config_path: Path, overrides: list[str] | None = None, trials: int | None = None, storage: str | None = None,
             workers: int = 1, worker_rank: int = 0, say=print) -> TuneResult | None:
    """Run (or resume) the study until `trials` trials are finished; the main process writes the outputs."""
    import optuna
    from optuna.trial import TrialState

    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    check_space(config_path, overrides, cfg)
    n = trials or cfg.tune.trials
    url = storage_url(cfg, storage)
    study = _study(cfg, url, worker_rank)
    procs = []
    if workers > 1 and worker_rank == 0:
        threads = max(1, (os.cpu_count() or 2) // workers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for rank in range(1, workers):
            cmd = [sys.executable, "-m", "tunewise", "tune", str(config_path), "--trials", str(n), "--storage", url, "--worker-rank", str(rank)]
            cmd += [x for o in overrides for x in ("--set", o)]
            procs.append(subprocess.Popen(cmd, env=env))
        import torch

        torch.set_num_threads(threads)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    if worker_rank == 0 and cfg.tune.start_from_defaults and "defaults" not in study.user_attrs:
        defaults_trial(config_path, overrides, study, say)
    finished = len(study.get_trials(deepcopy=False, states=done))
    if finished < n:
        say(f"study {cfg.project} ({url}): {finished} of {n} trials finished; running")
        study.optimize(_objective(config_path, overrides, say), callbacks=[_EnoughTrials(n)], gc_after_trial=True)
    for p in procs:
        if p.wait() != 0:
            raise TuneError(f"tune worker (pid {p.pid}) exited with {p.returncode}")
    if worker_rank:
        return None
    return write_outputs(cfg, optuna.load_study(study_name=cfg.project, storage=url))


def write_outputs(cfg: ProjectConfig, study) -> TuneResult:
    """best.yaml, trials.json and report.html in <run>/tune."""
    from optuna.trial import TrialState

    out = cfg.run_dir / "tune"
    out.mkdir(parents=True, exist_ok=True)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params, **t.user_attrs,
               "duration_s": t.duration.total_seconds() if t.duration else None} for t in study.trials]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"no trial of study {cfg.project} completed ({len(study.trials)} pruned or failed): see {out}")
    best = study.best_trial
    metric = "validation loss" if cfg.tune.objective == "val_loss" else f"{cfg.goal.metric} on validation"
    ci = best.user_attrs.get("ci95")
    overlay: dict = {}
    for key, value in best.params.items():
        node = overlay
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    sets = " ".join(f"--set {k}={v}" for k, v in best.params.items())
    if best.user_attrs.get("is_defaults"):
        sets = "(nothing: the settings train/defaults.py picks won)"
    header = (f"# tunewise tune: the best of {len(complete)} completed trials ({len(study.trials)} in all): "
              f"{'the defaults (trial ' + str(best.number) + ')' if best.user_attrs.get('is_defaults') else 'trial ' + str(best.number)}, "
              f"{metric} {best.value:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "") + ".\n"
              f"# Apply: merge these keys into your tunewise.yaml, or add to a command: {sets}\n")
    (out / "best.yaml").write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    try:
        import optuna

        importances = optuna.importance.get_param_importances(study) if len(complete) >= 2 else {}
    except (RuntimeError, ValueError, ImportError):
        importances = {}
    result = TuneResult(study=cfg.project, direction=study.direction.name.lower(), objective=metric,
                        best={"number": best.number, "value": best.value, "ci95": ci, "params": best.params,
                              "is_defaults": bool(best.user_attrs.get("is_defaults"))},
                        defaults=study.user_attrs.get("defaults"), importances=importances, trials=trials, best_yaml=str(out / "best.yaml"),
                        set=sets)
    (out / "trials.json").write_text(json.dumps({k: v for k, v in result.to_json().items() if k != "report"}, indent=1, default=str))
    from .report.html import tune_report

    result.report = str(tune_report(result, out / "report.html"))
    return result
