import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BANKING_TRAIN = EXAMPLES / "support-intents" / "data" / "train.csv"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer, hidden-64 model with SmolLM2's architecture and tokenizer."""
    from tunewise.models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny64(tiny_model):
    """The tiny model in float64, its norms too (models.norms_in_float64): exact comparisons, no float32 rounding."""
    from tunewise.models import load_model

    loaded = load_model(str(tiny_model), dtype="float64")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def smol_tokenizer():
    from tunewise.models import load_tokenizer

    return load_tokenizer("bundled:smollm2-135m-instruct")


def banking_rows(n: int, start: int = 0) -> str:
    lines = BANKING_TRAIN.read_text().splitlines()
    return "\n".join([lines[0]] + lines[1 + start : 1 + start + n]) + "\n"


@pytest.fixture
def tiny_project(tmp_path, tiny_model):
    """A project on 240 real BANKING77 rows and the tiny model; returns a function (overrides) -> config path."""
    (tmp_path / "train.csv").write_text(banking_rows(240))

    def make(**training) -> Path:
        cfg = {
            "project": "tiny",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name": str(tiny_model)},
            "data": {
                "format": "csv",
                "train": "train.csv",
                "columns": {"user": "text", "assistant": "category", "label": "category"},
                "system_prompt": "Classify the intent.",
                "split": {"validation": 0.1, "test": 0.1, "seed": 1},
                "max_length": 64,
            },
            "training": {"method": "lora", "batch_size": 4, "max_steps": 6, "eval_every": 3, "save_every": 3, "learning_rate": 1e-3,
                         "eval_samples": 16, "seed": 7, **training},
        }
        path = tmp_path / "tunewise.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make
