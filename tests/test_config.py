from pathlib import Path

import pytest
import yaml

from tunewise.config import ConfigError, ProjectConfig, load_config, starter_yaml

from .conftest import EXAMPLES


def write(tmp_path, cfg) -> Path:
    (tmp_path / "train.jsonl").write_text("")
    p = tmp_path / "tunewise.yaml"
    p.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    return p


BASE = {"data": {"format": "openai", "train": "train.jsonl"}}


def test_minimal_config_fills_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.name == "bundled:smollm2-135m-instruct"
    assert cfg.training.method == "lora" and cfg.training.lora.r == 16
    assert cfg.path(cfg.data.train) == (tmp_path / "train.jsonl").resolve()


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**BASE, "training": {"lora": {"rank": 8}}}))
    assert "training.lora.rank: unknown key under training.lora" in str(e.value)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**BASE, "training": {"method": "qlorra", "lora": {"r": 0}}}))
    msg = str(e.value)
    assert "training.method" in msg and "'lora'" in msg and "qlorra" in msg
    assert "training.lora.r" in msg and "greater than 0" in msg


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.format: Field required"):
        load_config(write(tmp_path, {"data": {"train": "train.jsonl"}}))
    with pytest.raises(ConfigError, match=r"data.train: file not found"):
        load_config(write(tmp_path, {"data": {"format": "openai", "train": "nope.jsonl"}}))


def test_yaml_syntax_error_gives_line(tmp_path):
    with pytest.raises(ConfigError, match=r"tunewise.yaml:2:"):
        load_config(write(tmp_path, "data:\n  format: openai: x\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["training.max_steps=20", "training.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.training.max_steps == 20 and cfg.training.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="training.max_steps"):
        load_config(p, ["training.max_steps=-1"])


def test_starter_yaml_is_valid_and_documented(tmp_path):
    text = starter_yaml("train.jsonl", "openai")
    assert "# LoRA rank." in text
    cfg = load_config(write(tmp_path, text))
    assert cfg == ProjectConfig.model_validate({**BASE, "base_dir": cfg.base_dir})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*/tunewise.yaml")), ids=lambda p: p.parent.name)
def test_every_example_config_parses(path):
    cfg = load_config(path)
    assert cfg.path(cfg.data.train).exists()
