"""`tunewise data harvest`: the production log and its feedback into SFT, preference and KTO data, with
provenance, cleaned, deduplicated within the harvest and against the training data; each output readable by its format."""

import json
from types import SimpleNamespace

import yaml
from typer.testing import CliRunner

from tunewise.cli import app
from tunewise.data.formats import read_records
from tunewise.data.prodlog import RequestLog
from tunewise.data.records import Record


def _out(text):
    return [SimpleNamespace(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=2)]


def test_harvest_turns_feedback_into_three_datasets(tmp_path):
    (tmp_path / "train.csv").write_text("text,category\nWhere is my card?,card_arrival\nI lost my card,lost_or_stolen_card\n")
    cfg_path = tmp_path / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({"project": "p", "output_dir": str(tmp_path / "runs"),
                                        "data": {"format": "csv", "train": "train.csv", "system_prompt": "Classify.",
                                                 "columns": {"user": "text", "assistant": "category", "label": "category"}}}))
    plog = RequestLog(tmp_path / "runs" / "p" / "serve-log", fsync=False)
    ask = lambda i, q, a, model="p:3": plog.log_request(f"id{i}", "production", model, "chat.completion",  # noqa: E731
                                                        [{"role": "user", "content": q}], _out(a), 0.1)
    ask(1, "How do I top up by card?", "card_arrival")                 # corrected
    ask(2, "Can I get a virtual card?", "getting_virtual_card")       # rated good
    ask(3, "Why was I charged twice?", "card_arrival")                # rated bad, no correction
    ask(4, "Is there an ATM fee?", "atm_support")                     # neutral
    ask(5, "Where is my card?", "card_delivery_estimate")             # corrected, but already in the training data
    ask(6, "Call me at +44 20 7946 0958 about my top up", "x")        # corrected; PII
    ask(7, "Can I get a virtual card?", "getting_virtual_card")       # the same good answer again, later
    ask(8, "no feedback on this one", "card_arrival")
    plog.log_request("cmpl-9", "base", "base", "text_completion", "raw prompt", _out("x"), 0.1)
    plog.log_feedback("id1", 1, None)
    plog.log_feedback("id1", -1, "topping_up_by_card")                # the last word counts
    for i, rating, corr in ((2, 1, None), (3, -1, None), (4, 0, None), (5, -1, "card_arrival"), (6, -1, "top_up_failed"), (7, 1, None)):
        plog.log_feedback(f"id{i}", rating, corr)
    plog.log_feedback("cmpl-9", 1, None)

    out = CliRunner().invoke(app, ["data", "harvest", str(cfg_path)])
    assert out.exit_code == 0, out.output
    h = tmp_path / "runs" / "p" / "harvest"
    report = json.loads((h / "report.json").read_text())
    assert report["requests"] == 9 and report["with_feedback"] == 8 and report["neutral"] == 1 and report["raw_prompt_skipped"] == 1
    sft = [r for r in read_records(h / "sft.jsonl", "openai") if isinstance(r, Record)]
    assert [(r.messages[1]["content"], r.answer, r.label) for r in sft] == [
        ("How do I top up by card?", "topping_up_by_card", "topping_up_by_card"),
        ("Can I get a virtual card?", "getting_virtual_card", "getting_virtual_card"),
        ("Call me at <PHONE> about my top up", "top_up_failed", "top_up_failed")]
    assert sft[1].meta["request_id"] == "id7" and sft[0].meta == {**sft[0].meta, "request_id": "id1", "model_version": "p:3", "rating": -1}
    assert sft[0].messages[0] == {"role": "system", "content": "Classify."}
    pairs = [r for r in read_records(h / "preference.jsonl", "openai-preference") if isinstance(r, Record)]
    assert [(r.answer, r.meta["rejected"]) for r in pairs] == [("topping_up_by_card", "card_arrival"), ("top_up_failed", "x")]
    kto = [r for r in read_records(h / "kto.jsonl", "trl-kto") if isinstance(r, Record)]
    assert sorted((r.answer, r.meta["desirable"]) for r in kto) == sorted([
        ("topping_up_by_card", True), ("card_arrival", False), ("getting_virtual_card", True), ("card_arrival", False),
        ("top_up_failed", True), ("x", False)])
    assert report["reasons"]["already in the training data (the same prompt)"] >= 3  # id5 in all three outputs
    assert "a later response with the same prompt and answer was harvested" in report["reasons"]
    assert "+44 20 7946 0958" not in "".join(p.read_text() for p in h.iterdir())
    assert "sft: 3 records" in " ".join(out.output.split())


def test_data_include_adds_a_harvest_to_the_training_records(tmp_path, smol_tokenizer):
    """data.include: more training files in their own format, read after data.train, cleaned, deduplicated and split
    with it; a change to an included file makes the prepared data stale."""
    from tunewise.config import load_config
    from tunewise.data.prepare import prepare_data
    from tunewise.data.prepared import load_prepared, prepared_is_current

    rows = [f"question number {i} about cards,label_{i % 3}" for i in range(30)]
    (tmp_path / "train.csv").write_text("text,category\n" + "\n".join(rows) + "\n")
    extra = [{"messages": [{"role": "user", "content": f"harvested question {i} about a transfer"},
                           {"role": "assistant", "content": "label_1"}], "label": "label_1", "request_id": f"r{i}"} for i in range(5)]
    extra.append({"messages": [{"role": "user", "content": "question number 3 about cards"}, {"role": "assistant", "content": "label_0"}]})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"),
        "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "category", "label": "category"},
                 "split": {"validation": 0.2}, "include": [{"format": "openai", "path": "sft.jsonl"}],
                 "clean": {"near_dedup": False}}}))
    cfg = load_config(tmp_path / "t.yaml")
    p = prepare_data(cfg, tmp_path / "out", smol_tokenizer)
    everything = [r for split in p.splits.values() for r in split]
    harvested = [r for r in everything if r.source.startswith("sft.jsonl")]
    assert len(harvested) == 5 and all(r.meta["request_id"].startswith("r") for r in harvested)
    assert p.summary["read"]["valid"] == 36 and "include-0" in p.summary["inputs"]
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and q[0]["file"].endswith("sft.jsonl")  # the duplicate of a data.train record
    assert prepared_is_current(cfg, load_prepared(tmp_path / "out"))
    (tmp_path / "sft.jsonl").write_text((tmp_path / "sft.jsonl").read_text() + json.dumps(extra[0] | {"request_id": "new"}) + "\n")
    assert not prepared_is_current(cfg, load_prepared(tmp_path / "out"))
