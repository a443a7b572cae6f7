"""Preference pairs: the three readers on good and bad records, DPO and ORPO against a direct computation, the
reference equal to the base with the adapter disabled, and `tunewise train` with objective dpo end to end."""

import json
import math

import pytest
import torch
import yaml

from tunewise.data.formats import read_records
from tunewise.data.records import BadRecord


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_readers_keep_good_pairs_and_say_why_bad_ones_are_set_aside(tmp_path):
    oa = _write(tmp_path / "oa.jsonl", [
        {"input": {"messages": [{"role": "user", "content": "Hi?"}]}, "preferred_output": [{"role": "assistant", "content": "Hello!"}],
         "non_preferred_output": [{"role": "assistant", "content": "Go away."}]},
        {"input": {"messages": [{"role": "user", "content": "Hi?"}]}, "preferred_output": [{"role": "assistant", "content": "Same"}],
         "non_preferred_output": [{"role": "assistant", "content": "Same"}]},
        {"preferred_output": []},
    ])
    got = list(read_records(oa, "openai-preference"))
    assert got[0].messages[-1]["content"] == "Hello!" and got[0].meta["rejected"] == "Go away."
    assert isinstance(got[1], BadRecord) and "same answer" in got[1].reason and got[1].where == "line 2"
    assert isinstance(got[2], BadRecord) and got[2].reason == "missing field 'input'"

    trl = _write(tmp_path / "trl.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Name?"}], "chosen": [{"role": "assistant", "content": "Bot"}],
         "rejected": [{"role": "assistant", "content": "No"}]},
        {"prompt": "x", "chosen": "", "rejected": "y"},
        "{broken",
    ])
    got = list(read_records(trl, "trl-preference"))
    assert [m["content"] for m in got[0].messages] == ["2+2?", "4"] and got[1].meta["rejected"] == "No"
    assert got[2].reason == "chosen: empty answer" and got[3].reason.startswith("malformed JSON")

    hh = _write(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
         "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench."},
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e"},
        {"chosen": "no transcript", "rejected": "here"},
    ])
    got = list(read_records(hh, "hh-rlhf"))
    assert got[0].messages == [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "I can't help with that."}]
    assert got[0].meta["rejected"] == "Use a tension wrench."
    assert "differ before the last Assistant turn" in got[1].reason and "not an HH-RLHF transcript" in got[2].reason


def test_the_shared_hh_rlhf_file_reads_with_few_rejects():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_test" / "harmless-base_test.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not on this machine")
    items = list(read_records(path, "hh-rlhf"))
    bad = [i for i in items if isinstance(i, BadRecord)]
    assert len(items) == 2312 and len(bad) < 30  # the few bad ones (empty answers, diverging transcripts) are kept aside


def _pairs(tok):
    from tunewise.data.records import Record
    from tunewise.train.objectives.preference import tokenize_pairs

    recs = [Record([{"role": "user", "content": q}, {"role": "assistant", "content": c}], f"t:{i}", meta={"rejected": r})
            for i, (q, c, r) in enumerate([("Is the sky blue?", "Yes, on a clear day.", "No."),
                                           ("Say hi", "Hi there, how can I help?", "Whatever"),
                                           ("Two plus two?", "Four.", "Five, obviously, as everyone knows.")])]
    return tokenize_pairs(tok, recs, 64)[0]


def _direct_logp(model, ids, labels):
    """The log-prob of the labelled tokens, one token at a time from the full logits (no batching, no masking)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100), \
        sum(1 for t in range(1, len(ids)) if labels[t] != -100)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_dpo_and_orpo_losses_equal_a_direct_computation(tiny_model, objective):
    from tunewise.models import load_model
    from tunewise.train.objectives.preference import PreferenceLoss, pair_batch

    loaded = load_model(str(tiny_model))
    model, tok = loaded.model.double(), loaded.tokenizer
    model.eval()
    pairs = _pairs(tok)
    refs = [(-3.0, -1.5), (-10.0, -2.0), (-0.5, -7.0)]  # a reference that differs from the model
    for p, r in zip(pairs, refs):
        p.ref = r
    beta, smooth, sft = 0.3, 0.1, 0.5
    loss_fn = PreferenceLoss(model, objective, beta, smooth if objective == "dpo" else 0.0, sft if objective == "dpo" else 0.0)
    got = loss_fn(**pair_batch(pairs, tok.pad_token_id, "cpu")).item()
    want, correct = 0.0, 0
    for p, (rc, rr) in zip(pairs, refs):
        pc, nc = _direct_logp(model, p.chosen.input_ids, p.chosen.labels)
        pr, nr = _direct_logp(model, p.rejected.input_ids, p.rejected.labels)
        if objective == "dpo":
            m = beta * ((pc - rc) - (pr - rr))
            ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731 - log sigmoid
            want += -(1 - smooth) * ls(m) - smooth * ls(-m) - sft * pc / nc
        else:
            mc, mr = pc / nc, pr / nr
            m = (mc - mr) - (math.log1p(-math.exp(mc)) - math.log1p(-math.exp(mr)))
            want += -mc - beta * -math.log1p(math.exp(-m))
        correct += m > 0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert loss_fn.stats["pairs"] == 3 and loss_fn.stats["correct"] == correct


def test_dpo_reference_is_the_base_with_the_adapter_disabled(tiny_model):
    """The precomputed reference equals the base with the LoRA adapter disabled, exactly; after training steps the
    policy has moved but the disabled-adapter base still gives the stored reference."""
    from tunewise.config import TrainConfig
    from tunewise.models import load_model
    from tunewise.train.methods import apply_method
    from tunewise.train.objectives.preference import PreferenceLoss, pair_batch, reference_logps, sequence_logps

    loaded = load_model(str(tiny_model))
    tok = loaded.tokenizer
    model = apply_method(loaded.model, TrainConfig(method="lora"))
    pairs = _pairs(tok)
    reference_logps(model, pairs, tok.pad_token_id, "cpu")
    b = pair_batch(pairs, tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = PreferenceLoss(model, "dpo", 0.1)
    for _ in range(3):
        loss_fn(**b).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        moved, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        with model.disable_adapter():
            base, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    assert torch.equal(base.double(), b["ref"])  # exact: the same computation on the same weights
    assert not torch.allclose(moved.double(), b["ref"])  # and training did move the policy


def test_tunewise_train_with_objective_dpo(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.config import load_config

    from .test_train import assert_trained_exactly, initial_state, run_and_capture

    rows = [{"prompt": f"Question {i}: is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "no" if i % 2 == 0 else "yes"}
            for i in range(40)]
    _write(tmp_path / "pairs.jsonl", rows)
    cfg_path = tmp_path / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "project": "pref", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "trl-preference", "train": "pairs.jsonl", "split": {"validation": 0.2, "test": 0.0}, "max_length": 64,
                 "clean": {"near_dedup": False}},
        "training": {"objective": "dpo", "method": "lora", "max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2,
                     "learning_rate": 1e-2},
    }))
    cfg = load_config(cfg_path)
    before = initial_state(cfg)
    r, after = run_and_capture(cfg, tmp_path / "t")
    assert_trained_exactly(before, after)
    metrics = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_margin" in m and "pref_accuracy" in m for m in metrics)
    assert "val_pref_accuracy" in metrics[-1] and r.best_val_loss is not None
    assert json.loads((tmp_path / "t" / "model" / "tunewise.json").read_text())["objective"] == "dpo"

    # from the CLI, on data that has no pairs: a clear error naming the key and the format
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs2"), "model": {"name": str(tiny_model)},
                                   "data": {"format": "openai", "train": "sft.jsonl"}, "training": {"objective": "dpo", "max_steps": 1}}))
    out = CliRunner().invoke(app, ["train", str(bad)])
    assert out.exit_code == 2 and "training.objective: dpo needs preference pairs" in " ".join(out.output.split()), out.output


def test_cleaning_redacts_and_normalises_the_rejected_answer_too():
    from tunewise.config import CleanConfig
    from tunewise.data.clean import Cleaner
    from tunewise.data.records import Record

    c = Cleaner(CleanConfig())
    r = Record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "x:1", meta={"rejected": "mail bob@example.com"})
    out = c.transform([r])[0]
    assert out.meta["rejected"] == "mail <EMAIL>" and out.messages == r.messages
    assert c.report()["steps"]["pii"]["changed"] == 1


def test_init_tells_each_preference_format_from_the_file(tmp_path):
    from tunewise.config import detect_format

    shapes = {"openai-preference": {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []},
              "trl-preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
              "hh-rlhf": {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}}
    for fmt, row in shapes.items():
        assert detect_format(_write(tmp_path / f"{fmt}.jsonl", [row]))[0] == fmt


def test_openai_preference_outputs_with_earlier_messages_are_not_dropped(tmp_path):
    """A preferred/non-preferred output of several messages: the ones before the answer join the prompt when both
    sides agree on them, and the pair is set aside when they do not (nothing is silently dropped)."""
    base = {"input": {"messages": [{"role": "user", "content": "Hi?"}]}}
    agree = {**base, "preferred_output": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"},
                                          {"role": "assistant", "content": "Bot."}],
             "non_preferred_output": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"},
                                      {"role": "assistant", "content": "No."}]}
    differ = {**agree, "non_preferred_output": [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Name?"},
                                                {"role": "assistant", "content": "No."}]}
    got = list(read_records(_write(tmp_path / "o.jsonl", [agree, differ]), "openai-preference"))
    assert [m["content"] for m in got[0].messages] == ["Hi?", "Hello", "Name?", "Bot."] and got[0].meta["rejected"] == "No."
    assert got[1].reason == "preferred_output and non_preferred_output differ before their last message"


def test_trl_kto_reader_keeps_labelled_completions_and_says_why_bad_ones_are_set_aside(tmp_path):
    path = _write(tmp_path / "kto.jsonl", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": [{"role": "user", "content": "Name?"}], "completion": [{"role": "assistant", "content": "No"}], "label": False},
        {"prompt": "x", "completion": "y", "label": "yes"},
        {"prompt": "x", "completion": " ", "label": True},
        {"prompt": "x", "label": True},
    ])
    got = list(read_records(path, "trl-kto"))
    assert [m["content"] for m in got[0].messages] == ["2+2?", "4"] and got[0].meta == {"desirable": True}
    assert got[1].meta == {"desirable": False} and got[1].messages[-1]["content"] == "No"
    assert got[2].reason == "label: expected true or false, got 'yes'" and got[2].where == "line 3"
    assert got[3].reason == "completion: empty answer" and got[4].reason == "missing field 'completion'"


def test_kto_loss_equals_a_direct_computation(tiny_model):
    from tunewise.data.records import Record
    from tunewise.models import load_model
    from tunewise.train.objectives.preference import PreferenceLoss, pair_batch, tokenize_unpaired

    loaded = load_model(str(tiny_model))
    model, tok = loaded.model.double(), loaded.tokenizer
    model.eval()
    recs = [Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"k:{i}", meta={"desirable": d})
            for i, (q, a, d) in enumerate([("Is the sky blue?", "Yes, on a clear day.", True), ("Say hi", "Whatever", False),
                                           ("Two plus two?", "Four.", True)])]
    recs.append(Record([{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}], "k:3",
                       meta={"rejected": "Rome."}))  # a pair counts as one desirable and one undesirable example
    ex = tokenize_unpaired(tok, recs, 64)[0]
    assert [e.desirable for e in ex] == [True, False, True, True, False]
    refs = [(-3.0, -20.0), (-10.0, -2.0), (-0.5, -7.0), (-4.0, -9.0), (-6.0, -30.0)]
    for e, r in zip(ex, refs):
        e.ref = r
    beta, wd, wu = 0.2, 1.0, 1.5
    loss_fn = PreferenceLoss(model, "kto", beta, desirable_weight=wd, undesirable_weight=wu)
    got = loss_fn(**pair_batch(ex, tok.pad_token_id, "cpu")).item()
    logr = [_direct_logp(model, e.chosen.input_ids, e.chosen.labels)[0] - r[0] for e, r in zip(ex, refs)]
    kl = [_direct_logp(model, e.rejected.input_ids, e.rejected.labels)[0] - r[1] for e, r in zip(ex, refs)]
    z = max(0.0, sum(kl) / len(kl))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = sum(wd * (1 - sig(beta * (r - z))) if e.desirable else wu * (1 - sig(beta * (z - r))) for e, r in zip(ex, logr))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert loss_fn.stats["kl"] == pytest.approx(z) and loss_fn.stats["correct"] == sum((r > 0) == e.desirable for e, r in zip(ex, logr))
    # each example's KL row is its own prompt with the next example's completion
    assert ex[0].rejected.input_ids != ex[0].chosen.input_ids and tok.decode(ex[0].rejected.input_ids).endswith(tok.decode(ex[1].chosen.input_ids[-4:]))


def test_tunewise_init_and_train_with_unpaired_feedback(tiny_model, tmp_path):
    from .test_train import init_and_train

    rows = [{"prompt": f"Question {i}: is {i} even?", "completion": "yes" if (i % 2 == 0) == (i % 3 != 0) else "no", "label": i % 3 != 0}
            for i in range(40)]
    _write(tmp_path / "feedback.jsonl", rows)
    written, r, metrics = init_and_train(tmp_path, "feedback.jsonl", tiny_model,
                                         {"split": {"validation": 0.2, "test": 0.0}, "max_length": 64, "clean": {"near_dedup": False}},
                                         {"method": "lora", "max_steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2, "learning_rate": 1e-2})
    assert written["data"]["format"] == "trl-kto" and written["training"] == {"objective": "kto"}
    assert all("kl" in m and "pref_accuracy" in m for m in metrics) and "val_pref_accuracy" in metrics[-1]
    assert json.loads((tmp_path / "t" / "model" / "tunewise.json").read_text())["objective"] == "kto"
