"""Continued pre-training: the text reader on good and bad files, blocks of max_length with EOS between documents,
the pretrain loss against a direct computation, and `tunewise init` + `train` on a folder of Markdown."""

import json
import math

import pytest
import torch
import yaml

from tunewise.data.formats import read_records
from tunewise.data.records import BadRecord, Record

SQUAD_LIKE = ("The Amazon rainforest covers most of the Amazon basin of South America. The basin spans seven million square "
              "kilometres, of which five and a half million are covered by the rainforest. ")


def test_text_reader_reads_files_folders_and_json_lines_and_sets_bad_ones_aside(tmp_path):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.md").write_text("# Amazon\n\nThe Amazon is a river.\n")
    (tmp_path / "kb" / "b.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (tmp_path / "kb" / "c.txt").write_text("   \n")
    (tmp_path / "kb" / "d.jsonl").write_text('{"text": "One document."}\n{"title": "no text"}\n{"text": ""}\n{broken\n')
    (tmp_path / "kb" / "ignored.csv").write_text("a,b\n")
    got = list(read_records(tmp_path / "kb", "text"))
    good = [g for g in got if isinstance(g, Record)]
    bad = {(b.file.rsplit("/", 1)[-1], b.where): b.reason for b in got if isinstance(b, BadRecord)}
    assert [g.messages[0]["content"] for g in good] == ["# Amazon\n\nThe Amazon is a river.\n", "One document."]
    assert good[0].source == "a.md:line 1" and good[1].source == "d.jsonl:line 1" and good[0].prompt_key.startswith("# amazon the amazon")
    assert bad == {("b.txt", "byte 3"): "not valid UTF-8", ("c.txt", "line 1"): "empty document",
                   ("d.jsonl", "line 2"): "missing field 'text' (a string)", ("d.jsonl", "line 3"): "text: empty document",
                   ("d.jsonl", "line 4"): bad[("d.jsonl", "line 4")]}
    assert bad[("d.jsonl", "line 4")].startswith("malformed JSON")


def test_a_long_file_is_cut_at_paragraphs_into_sections_with_their_line(tmp_path):
    from tunewise.data import text

    paras = [f"Paragraph {i}. " + "word " * 300 for i in range(7)]
    (tmp_path / "long.txt").write_text("\n\n".join(paras))
    got = list(read_records(tmp_path / "long.txt", "text"))
    assert len(got) == 2 and all(len(g.answer.split()) >= text.SECTION_WORDS or g is got[-1] for g in got)
    assert got[0].source == "long.txt:line 1" and got[1].source == "long.txt:line 9"  # paragraph 4 starts on line 9
    assert got[1].answer.startswith("Paragraph 4.") and "".join(g.answer for g in got).count("Paragraph") == 7


def test_blocks_lay_documents_end_to_end_with_eos_and_train_every_token(smol_tokenizer):
    from tunewise.data.text import text_blocks

    tok = smol_tokenizer
    docs = [Record([{"role": "assistant", "content": SQUAD_LIKE * k}], f"p:{k}") for k in (1, 2, 3)]
    blocks, stats = text_blocks(tok, docs, 32)
    stream = sum((tok(d.answer)["input_ids"] + [tok.eos_token_id] for d in docs), [])
    assert [x for b in blocks for x in b.input_ids] == stream  # nothing lost, nothing added but EOS
    assert all(len(b.input_ids) == 32 for b in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 32
    assert all(b.labels == b.input_ids for b in blocks) and stats.examples == len(blocks)
    assert blocks[0].source == "p:1" and blocks[-1].source == "p:3"


def test_pretrain_loss_is_the_next_token_loss_on_every_token(tiny_model):
    from tunewise.data.text import text_blocks
    from tunewise.data.tokenize import collate
    from tunewise.models import load_model
    from tunewise.train.loop import TokenLoss

    loaded = load_model(str(tiny_model))
    model, tok = loaded.model.double(), loaded.tokenizer
    model.eval()
    blocks, _ = text_blocks(tok, [Record([{"role": "assistant", "content": SQUAD_LIKE}], "p:0")], 16)
    got = TokenLoss(model)(**collate(blocks, tok.pad_token_id)).item()
    want = 0.0
    for b in blocks:
        logits = model(input_ids=torch.tensor([b.input_ids])).logits[0]
        want -= sum(torch.log_softmax(logits[t - 1], -1)[b.input_ids[t]].item() for t in range(1, len(b.input_ids)))
    assert got == pytest.approx(want, rel=1e-9)


def test_objective_and_format_must_agree(tmp_path):
    from tunewise.config import ConfigError, load_config

    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"data": {"format": "text", "train": "kb"}}))
    with pytest.raises(ConfigError, match="training.objective: sft cannot train on data.format: text"):
        load_config(tmp_path / "t.yaml")


def test_tunewise_init_and_train_pretrain_on_a_folder(tiny_model, tmp_path):
    from .test_train import init_and_train

    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"doc{i:02d}.md").write_text(f"# Note {i}\n\n" + SQUAD_LIKE * (1 + i % 3) + f"Fact number {i} is {i * 7}.\n")
    written, r, metrics = init_and_train(tmp_path, "docs", tiny_model, {"split": {"validation": 0.2, "test": 0.0}, "max_length": 48},
                                         {"method": "full", "max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2, "learning_rate": 1e-3})
    assert written["data"] == {"format": "text", "train": "docs"} and written["training"] == {"objective": "pretrain"}
    assert metrics[0]["step"] == 0 and metrics[0]["val_perplexity"] == pytest.approx(math.exp(r.base_val_loss), rel=1e-3)
    assert metrics[-1]["val_perplexity"] < metrics[0]["val_perplexity"]  # a random model learns these repeated sentences fast
    assert json.loads((tmp_path / "t" / "model" / "tunewise.json").read_text())["objective"] == "pretrain"


def test_compare_on_held_out_text_reports_perplexity_with_cis(tiny_model, tmp_path):
    """`tunewise compare` on a text project: each variant's held-out perplexity (with a CI) and the paired test on
    the per-token NLL, no generation; equal to exp of the direct NLL."""
    from typer.testing import CliRunner

    from tunewise.cli import app

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": SQUAD_LIKE + f"Fact {i}."}) + "\n" for i in range(20)))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "text", "train": "docs.jsonl", "split": {"validation": 0.2, "test": 0.2}, "max_length": 32,
                 "clean": {"near_dedup": False}},
        "training": {"objective": "pretrain", "method": "full", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "evaluation": {"variants": [{"name": "base", "kind": "base"}, {"name": "fine-tuned", "kind": "fine-tuned"}]}}))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tmp_path / "t.yaml")]).exit_code == 0
    out = runner.invoke(app, ["compare", str(tmp_path / "t.yaml")])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "runs" / "tunewise-project" / "eval" / "compare.json").read_text())
    base, ft = result["variants"]["base"], result["variants"]["fine-tuned"]
    assert base["documents"] >= 1 and base["reference_perplexity"]["ci95"][0] <= base["reference_perplexity"]["mean"]
    assert "nll_per_token" in result["paired_vs_reference"]["fine-tuned"]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tunewise-project" / "eval" / "base" / "items.jsonl").read_text().splitlines()]
    assert base["reference_perplexity"]["mean"] == pytest.approx(math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)))
    assert "nll_per_token" in out.output and ft["reference_perplexity"]["mean"] != base["reference_perplexity"]["mean"]
