"""End to end on the real bundled model (SmolLM2-135M-Instruct) and real BANKING77 data."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.engine import Engine

from .conftest import EXAMPLES, banking_rows

pytestmark = pytest.mark.integration
runner = CliRunner()
LABELS = set(json.loads((EXAMPLES / "support-intents" / "data" / "categories.json").read_text()))


def test_bundled_model_is_a_real_instruct_model():
    eng = Engine.load("bundled:smollm2-135m-instruct")
    out = eng.generate([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_train_real_model_on_banking77_from_the_cli(tmp_path):
    """The example config with a small budget: validation loss falls, the adapter is saved, chat answers a label."""
    example = yaml.safe_load((EXAMPLES / "support-intents" / "tunewise.yaml").read_text())
    (tmp_path / "train.csv").write_text(banking_rows(2000))
    example["data"].update(train="train.csv", test=None, limit=None)
    example["data"]["split"].update(validation=0.02, test=0.0)
    example["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tunewise.yaml"
    path.write_text(yaml.safe_dump(example))
    r = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=24", "--set", "training.eval_every=12",
                            "--set", "training.eval_samples=40"])
    assert r.exit_code == 0, r.output
    assert "training settings: method=freeze" in r.output  # the example leaves the method to the defaults
    run = tmp_path / "runs" / "support-intents" / "train"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [x["val_loss"] for x in rows if "val_loss" in x]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert (run / "model" / "model.safetensors").exists() and json.loads((run / "model" / "tunewise.json").read_text())["method"] == "freeze"
    r = runner.invoke(app, ["chat", str(path), "--adapter", str(run / "model"), "--max-new-tokens", "16",
                            "-p", "I still have not received my new card, I ordered it over a week ago."])
    assert r.exit_code == 0, r.output
    answer = r.output.strip()
    # 24 steps on CPU teach the label format (a longer run, see README, answers with valid labels);
    # the base model answers the same prompt in prose, so this checks the adapter changed behaviour.
    assert re.fullmatch(r"[a-z]+(_[a-z]+)+", answer), answer
    base = runner.invoke(app, ["chat", str(path), "--max-new-tokens", "16", "-p", "I still have not received my new card, I ordered it over a week ago."])
    assert not re.fullmatch(r"[a-z]+(_[a-z]+)+", base.output.strip()), base.output
