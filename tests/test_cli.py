"""The commands as a user runs them: init, data prepare, train, chat; errors are one clear line."""

import json

from typer.testing import CliRunner

from tunewise.cli import app

runner = CliRunner()


def test_init_writes_a_valid_starter(tmp_path):
    p = tmp_path / "tunewise.yaml"
    r = runner.invoke(app, ["init", str(p), "--data", "train.jsonl"])
    assert r.exit_code == 0 and p.exists()
    assert runner.invoke(app, ["init", str(p)]).exit_code == 2  # no silent overwrite


def test_init_tells_format_and_columns_from_the_file_and_sets_nothing_else(tmp_path):
    from tunewise.config import load_config

    (tmp_path / "tickets.csv").write_text("id,Text,intent\n1,where is my card,card_arrival\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
    r = runner.invoke(app, ["init", str(tmp_path / "a.yaml"), "--data", "tickets.csv"])
    assert r.exit_code == 0 and "data.format: csv" in r.output and "user=Text, assistant=intent, label=intent" in r.output
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.data.format, cfg.data.columns.user, cfg.data.columns.assistant, cfg.data.columns.label) == ("csv", "Text", "intent", "intent")
    # nothing but the data was chosen: training keys are defaults, so tunewise run's automatic choices apply
    assert cfg.training.model_fields_set == set() and "training" not in cfg.model_fields_set
    assert runner.invoke(app, ["init", str(tmp_path / "b.yaml"), "--data", "chat.jsonl"]).exit_code == 0
    assert load_config(tmp_path / "b.yaml").data.format == "sharegpt"
    r = runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--data", "odd.csv"])
    assert r.exit_code == 0 and "could not tell which column" in r.output
    r = runner.invoke(app, ["init", str(tmp_path / "d.yaml"), "--data", "notes.xml"])
    assert r.exit_code == 0 and "data.format: could not tell" in r.output
    r = runner.invoke(app, ["init", str(tmp_path / "e.yaml"), "--data", "notes.txt"])  # raw text: continued pre-training
    assert r.exit_code == 0 and "data.format: text" in r.output and "training.objective: pretrain" in r.output
    tool = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
            "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}
    (tmp_path / "tools.jsonl").write_text(json.dumps(tool) + "\n")
    r = runner.invoke(app, ["init", str(tmp_path / "t.yaml"), "--data", "tools.jsonl"])  # tool use: scored on the calls
    assert r.exit_code == 0 and "tool-call metrics" in r.output
    cfg = load_config(tmp_path / "t.yaml")
    assert (cfg.evaluation.metrics[0], cfg.goal.metric, cfg.data.max_length) == ("tool_calls_exact", "tool_calls_exact", 1024)
    assert [(v.name, v.kind, v.tool_choice) for v in cfg.evaluation.variants] == [
        ("base", "base", None), ("few-shot", "few-shot", None), ("fine-tuned", "fine-tuned", None), ("fine-tuned-held", "fine-tuned", "auto")]
    assert cfg.training.model_fields_set == set()


def test_bad_config_fails_before_work_naming_the_key(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    p = tmp_path / "c.yaml"
    p.write_text("data: {format: openai, train: t.jsonl}\ntraining: {learning_rat: 0.1}\n")
    r = runner.invoke(app, ["train", str(p)])
    assert r.exit_code == 2
    assert "training.learning_rat: unknown key under training" in r.output


def test_prepare_train_chat_on_tiny_model(tiny_project, tmp_path):
    cfg = tiny_project(max_steps=4, eval_every=2)
    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "cleaning: 240 valid records" in r.output and "near_dedup" in r.output and "train" in r.output  # BANKING77 has near-duplicates
    r = runner.invoke(app, ["train", str(cfg), "--set", "training.max_steps=3"])
    assert r.exit_code == 0, r.output
    model_dir = tmp_path / "runs" / "tiny" / "train" / "model"
    assert (model_dir / "adapter_model.safetensors").exists()
    rows = (tmp_path / "runs" / "tiny" / "train" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 3
    r = runner.invoke(app, ["train", str(cfg)])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["chat", str(cfg), "--adapter", str(model_dir), "-p", "I lost my card", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    from tunewise.config import load_config
    from tunewise.engine import Engine

    c = load_config(cfg)
    conv = [{"role": "system", "content": c.data.system_prompt}, {"role": "user", "content": "I lost my card"}]
    expected = Engine.load(c.model.name, str(model_dir)).generate([conv], max_new_tokens=5, adapter="default")[0].text
    assert r.output.strip() == expected  # the command answers with the adapter and the config's system prompt


def test_chat_interactive_loop(tiny_model):
    r = runner.invoke(app, ["chat", "--model", str(tiny_model), "--max-new-tokens", "3"], input="hello\n/reset\n/exit\n")
    assert r.exit_code == 0 and "model>" in r.output


def test_demo_fills_only_keys_the_user_did_not_set(tiny_project, monkeypatch):
    """`tunewise demo --set training.eval_every=7` trains with 7; the demo's own sizes fill what is not given, and the
    loaded config is only read (the demo works on a copy)."""
    import tunewise.pipeline as pipeline

    seen = {}

    def fake_run(cfg, progress=None, **kw):
        seen["cfg"], seen["kw"] = cfg, kw
        from tunewise.results import Decision

        return Decision(goal={"metric": "accuracy", "threshold": 0.5}, evidence=[], met=False, chosen="prompt", chosen_variant="base",
                        report="r.html")

    monkeypatch.setattr(pipeline, "run_workflow", fake_run)
    path = tiny_project(max_steps=None)
    r = CliRunner().invoke(app, ["demo", str(path), "--set", "training.eval_every=7", "--set", "evaluation.perplexity=true"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert cfg.training.eval_every == 7 and cfg.evaluation.perplexity is True  # what the user gave
    assert cfg.training.max_minutes == pipeline.DEMO["training"]["max_minutes"] and cfg.training.eval_samples == 16  # the file's 16 kept
    assert seen["kw"]["all_routes"] and seen["kw"]["test_samples"] == pipeline.DEMO["test_samples"]

    from tunewise.config import load_config

    loaded = load_config(path)
    pipeline.demo_config(loaded)
    assert loaded.training.max_minutes is None and loaded.evaluation.perplexity is True  # demo_config copied, did not change it


def test_models_list_starts_without_torch(tmp_path):
    """The registry commands read SQLite only: starting them must not import torch or transformers."""
    import subprocess
    import sys

    (tmp_path / "t.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    (tmp_path / "tunewise.yaml").write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{format: openai, train: t.jsonl}}\n")
    code = ("import sys; from tunewise.cli import app\n"
            "try: app(['models', 'list', sys.argv[1]])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tunewise.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_init_then_prepare_as_is_on_csv_jsonl_and_parquet(tmp_path):
    """The newcomer's path: `init --data FILE` on each kind of file, then `data prepare` with the config as written."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import banking_rows

    rows = list(csv.DictReader(io.StringIO(banking_rows(60))))
    (tmp_path / "tickets.csv").write_text(banking_rows(60))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["text"]},
                                                                          {"role": "assistant", "content": r["category"]}]}) + "\n"
                                                 for r in rows))
    pq.write_table(pa.table({"question": [r["text"] for r in rows], "intent": [r["category"] for r in rows]}), tmp_path / "t.parquet")
    for i, name in enumerate(("tickets.csv", "chat.jsonl", "t.parquet")):
        cfg = tmp_path / f"c{i}.yaml"
        r = runner.invoke(app, ["init", str(cfg), "--data", name])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["data", "prepare", str(cfg), "--set", "data.clean.near_dedup=false"])
        assert r.exit_code == 0, (name, r.output)
        summary = json.loads((tmp_path / "runs" / "tunewise-project" / "data" / "summary.json").read_text())
        assert summary["read"]["kept"] == 60 and summary["read"]["quarantined"] == 0, name


def test_prepare_that_keeps_nothing_fails_with_a_hint(tmp_path):
    """A CSV read as chat JSONL: every line is malformed JSON. The prepare writes its quarantine and exits non-zero,
    saying the file looks like CSV; a file that mostly parses goes on as before."""
    from tests.conftest import banking_rows

    (tmp_path / "tickets.csv").write_text(banking_rows(30))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{format: openai, train: tickets.csv}}\n")
    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "no record was kept" in out and "malformed JSON" in out and "Is data.format right?" in out, out
    assert "looks like CSV (data.format: csv)" in out, out
    quarantine = tmp_path / "runs" / "tunewise-project" / "data" / "quarantine.jsonl"
    assert len(quarantine.read_text().splitlines()) == 31  # the header too: nothing lost

    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{format: csv, train: tickets.csv, columns: {{user: txt, assistant: category}}}}\n")
    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "column(s) ['txt'] not found; the file has ['text', 'category']" in out, out  # told before reading

    good = tmp_path / "g.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i} about my card"}, {"role": "assistant", "content": "ok"}]})
             for i in range(20)]
    good.write_text("\n".join(lines[:18] + ["{not json", "{\"messages\": 3}"]) + "\n")
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{format: openai, train: g.jsonl, clean: {{near_dedup: false}}}}\n")
    r = runner.invoke(app, ["data", "prepare", str(cfg)])
    assert r.exit_code == 0, r.output  # 2 of 20 bad: reported and kept aside, the rest goes on
