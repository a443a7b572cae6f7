"""Experiment tracking: a training run (interrupted and resumed) lands in MLflow (parameters, the loss history,
the adapter) and in TensorBoard event files as one run each; compare logs each variant's summary; a configured
tracker that is not installed is a clear error naming the extra."""

import importlib.util
import os
import signal

import pytest
import yaml

from tunewise.config import load_config
from tunewise.tracking import TrackingError, Tracker

from .test_train import assert_trained_exactly, initial_state, run_and_capture

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _with_tracking(path, trackers):
    raw = yaml.safe_load(path.read_text())
    raw["tracking"] = trackers
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _tb_scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_interrupted_then_resumed_training_is_one_run_in_mlflow_and_tensorboard(tiny_project, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _with_tracking(tiny_project(max_steps=6, eval_every=2, save_every=2), ["mlflow", "tensorboard"])
    out = tmp_path / "train"

    def interrupt(step, row, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the loop checkpoints at the step boundary

    from tunewise.train.loop import train

    assert train(cfg, out, on_step=interrupt, progress=False).interrupted
    before = initial_state(cfg)
    result, after = run_and_capture(cfg, out, resume=True)
    assert_trained_exactly(before, after)
    assert result.steps == 6 and not result.interrupted

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cfg.run_dir / 'mlflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1, "the resumed training went on in the run it started"
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.tunewise.stage"] == "train"
    assert run["params.training.learning_rate"] == "0.001" and run["params.training.method"] == "lora"
    assert run["params.model.name"] == str(cfg.model.name)
    client = mlflow.MlflowClient()
    history = {m.step: m.value for m in client.get_metric_history(run["run_id"], "loss")}
    logged = [r for r in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert history == {r["step"]: pytest.approx(r["loss"]) for r in logged} and sorted(history) == [1, 2, 3, 4, 5, 6]
    assert {m.step for m in client.get_metric_history(run["run_id"], "val_loss")} == {2, 4, 6}
    assert run["metrics.final_best_val_loss"] == pytest.approx(result.best_val_loss)
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])} | {a.path for a in client.list_artifacts(run["run_id"], "adapter")}
    assert {"train_summary.json", "metrics.jsonl", "adapter/adapter_model.safetensors"} <= artifacts

    tb = list((cfg.run_dir / "tensorboard").iterdir())
    assert len(tb) == 1, "one TensorBoard directory for the whole run"
    assert sorted(_tb_scalars(tb[0], "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert _tb_scalars(tb[0], "train/loss")[6] == pytest.approx(logged[-1]["loss"])


def test_compare_logs_each_variants_summary(tiny_project, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"max_samples": 8, "max_new_tokens": 4, "variants": [{"name": "base", "kind": "base"},
                                                                              {"name": "two-shot", "kind": "few-shot", "k": 2}]}
    path.write_text(yaml.safe_dump(raw))
    cfg = _with_tracking(path, ["mlflow"])
    from tunewise.eval.evaluate import compare

    result = compare(cfg)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cfg.run_dir / 'mlflow' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tiny"]).iloc[0]
    assert run["tags.tunewise.stage"] == "compare"
    for name in ("base", "two-shot"):
        acc = result.variants[name].metrics["accuracy"]
        assert run[f"metrics.{name}.accuracy"] == pytest.approx(acc.mean)
        assert run[f"metrics.{name}.accuracy.ci_high"] == pytest.approx(acc.ci95[1])
    assert "metrics.two-shot.accuracy.p_vs_reference" in run
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])} >= {"compare.json", "report.html"}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_an_error_naming_the_extra(tiny_project):
    cfg = _with_tracking(tiny_project(), ["wandb"])
    with pytest.raises(TrackingError, match=r"pip install 'tunewise\[wandb\]'"):
        Tracker(cfg, "train")
    from typer.testing import CliRunner

    from tunewise.cli import app

    r = CliRunner().invoke(app, ["train", str(cfg.base_dir / "tunewise.yaml")])
    assert r.exit_code != 0 and "tunewise[wandb]" in r.output and "Traceback" not in r.output


def test_an_unknown_tracker_is_a_config_error(tiny_project):
    from tunewise.config import ConfigError

    path = tiny_project()
    raw = yaml.safe_load(path.read_text())
    raw["tracking"] = ["neptune"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="tracking"):
        load_config(path)
