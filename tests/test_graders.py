"""OpenAI's grader types as metrics and rewards: each against hand-computed values; python graders stopped when they
loop, allocate too much or open a socket (that item scores 0, is reported, the rest go on); bad definitions are errors
naming the key before any work; one grader file is both an evaluation metric and a GRPO reward that rises."""

import json
import math

import pytest
import yaml

from tunewise.eval.graders import GraderError, build, check_items, item_of, render, sample_of
from tunewise.data.records import Record

from .endpoint_server import FakeEndpoint


def _rec(answer="the cat sat", label=None, **meta):
    return Record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], source="t:1", label=label, meta=meta)


def _grade(spec, outputs, records, judge_for=None):
    g = build(spec, "evaluation.graders[0]", judge_for)
    g.errors = []
    return g.grade([sample_of(o) for o in outputs], [item_of(r) for r in records]), g.errors


def test_templates_read_sample_and_item_fields():
    s, i = sample_of('{"intent": "card_arrival", "n": [1, 2]}'), item_of(_rec(label="card_arrival", customer={"tier": "gold"}))
    assert render("{{sample.output_json.intent}}/{{ item.label }}/{{item.customer.tier}}/{{sample.output_json.n}}", s, i) == "card_arrival/card_arrival/gold/[1, 2]"


def test_string_check_operations():
    recs = [_rec(label="Card_Arrival")] * 3
    outs = ["Card_Arrival", "card_arrival", "it is card_arrival."]
    for op, want in [("eq", [1, 0, 0]), ("ne", [0, 1, 1]), ("like", [1, 0, 0]), ("ilike", [1, 1, 1])]:
        got, _ = _grade({"type": "string_check", "name": "m", "input": "{{sample.output_text}}", "reference": "{{item.label}}", "operation": op}, outs, recs)
        assert got == want, op


@pytest.mark.parametrize("metric,output,reference,want", [
    ("fuzzy_match", "kitten", "sitting", 8 / 13),  # Indel: LCS "ittn" (4): 1 - (6 + 7 - 2*4) / 13
    ("bleu", "the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("gleu", "the cat sat", "the cat ran", 3 / 6),  # 1-4-grams: 3 of the hypothesis' 6 match, 3 of the reference's 6
    ("meteor", "the cat sat", "the cat sat", 1 - 0.5 * (1 / 3) ** 3),  # F = 1, one chunk of 3 matches: penalty 0.5 (1/3)^3
    ("rouge_1", "the cat sat", "the cat ran", 2 / 3),
    ("rouge_2", "the cat sat", "the cat ran", 1 / 2),
    ("rouge_l", "the cat sat down", "the cat ran", 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),  # LCS 2: P 2/4, R 2/3
    ("cosine", "How do I top up my card?", "How do I top up my card?", 1.0),
])
def test_text_similarity_metrics(metric, output, reference, want):
    got, _ = _grade({"type": "text_similarity", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                     "evaluation_metric": metric}, [output], [_rec(reference)])
    assert got[0] == pytest.approx(want, abs=1e-5)  # cosine: float32 embeddings


def test_python_grader_scores_and_survives_loops_memory_and_sockets():
    source = '''
def grade(sample, item):
    text = sample["output_text"]
    if text == "loop":
        while True:
            pass
    if text == "alloc":
        x = bytearray(10 * 1024 ** 3)
    if text == "net":
        import socket
        socket.create_connection(("127.0.0.1", 9))
    return len(text) / 10 + (item["bonus"] if "bonus" in item else 0)
'''
    spec = {"type": "python", "name": "py", "source": source, "timeout_s": 2, "memory_mb": 512}
    outs = ["abcde", "loop", "alloc", "net", "abc"]
    got, errors = _grade(spec, outs, [_rec(bonus=1)] * 5)
    assert got == [1.5, 0.0, 0.0, 0.0, 1.3]  # len/10 + 1; the three that failed score 0 and the last is graded after them
    why = dict(errors)
    assert "timed out after 2 s" in why[1] and "MemoryError" in why[2] and "may not use the network" in why[3]


def test_score_model_through_an_endpoint_judge(tmp_path):
    from tunewise.config import ProjectConfig
    from tunewise.eval.graders import judges

    with FakeEndpoint(models=("judge",)) as server:
        server.answers = {"Rate: Paris": "Score: 9", "Rate: Lyon": "I cannot say"}
        cfg = ProjectConfig.model_validate({"data": {"format": "csv", "train": "x.csv"}, "output_dir": str(tmp_path)})
        spec = {"type": "score_model", "name": "judge", "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}], "range": [0, 5],
                "endpoint": {"base_url": server.url, "model": "judge", "api_key_env": None}}
        got, errors = _grade(spec, ["Paris", "Lyon"], [_rec()] * 2, judges(cfg))
        assert got == [5.0, 0.0]  # 9 clamped to the range; no number: the range's low end, reported
        assert "no number" in errors[0][1] and server.requests == 2


def test_multi_combines_named_graders_by_its_formula():
    spec = {"type": "multi", "name": "combined", "calculate_output": "0.25 * exact + 0.75 * max(sim, 0.5)",
            "graders": {"exact": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"},
                        "sim": {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "evaluation_metric": "rouge_1"}}}
    got, _ = _grade(spec, ["the cat sat", "the cat ran", "dogs"], [_rec("the cat sat")] * 3)
    assert got == pytest.approx([0.25 + 0.75 * 1.0, 0.75 * (2 / 3), 0.75 * 0.5])


@pytest.mark.parametrize("spec,message", [
    ({"type": "label_judge"}, r"evaluation\.graders\[0\]\.type: unknown grader type 'label_judge'"),
    ({"type": "string_check", "input": "x", "reference": "y"}, r"\.operation: missing"),
    ({"type": "string_check", "input": "x", "reference": "y", "operation": "regex"}, r"\.operation: 'regex' is not one of"),
    ({"type": "text_similarity", "input": "x", "reference": "y", "evaluation_metric": "bertscore"}, r"\.evaluation_metric: 'bertscore'"),
    ({"type": "python", "source": "def grade(sample, item)\n    return 1"}, r"\.source: does not compile: .* \(line 1\)"),
    ({"type": "python", "source": "x = 1"}, r"\.source: defines no grade"),
    ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y", "operation": "eq"}},
      "calculate_output": "a + b"}, r"calculate_output: 'b' is not one of the graders"),
    ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "y", "operation": "eq"}},
      "calculate_output": "__import__('os')"}, r"calculate_output: .* is not allowed"),
    ({"type": "string_check", "input": "{{sample.text}}", "reference": "y", "operation": "eq"}, r"sample\.text.*output_text and output_json"),
])
def test_bad_definitions_name_the_key(spec, message):
    with pytest.raises(GraderError, match=message):
        build(spec, "evaluation.graders[0]")


def test_a_template_field_missing_from_an_item_is_an_error_before_any_work():
    g = build({"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.reference_intent}}", "operation": "eq"}, "evaluation.graders[0]")
    with pytest.raises(GraderError, match=r"evaluation\.graders\[0\]: the template refers to \{\{item\.reference_intent\}\}, which item 1 does not have"):
        check_items([g], [item_of(_rec(reference_intent="a")), item_of(_rec())])


GRADER = {"type": "python", "name": "short", "source": "def grade(sample, item):\n    return 1.0 - min(len(sample['output_text']), 200) / 200\n"}


def test_one_grader_file_is_an_eval_metric_and_a_grpo_reward_that_rises(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.config import load_config

    from .test_train import assert_trained_exactly, initial_state, run_and_capture

    (tmp_path / "short.json").write_text(json.dumps(GRADER))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}"},
                                                                           {"role": "assistant", "content": f"number {i}"}]}) + "\n" for i in range(40)))
    path = tmp_path / "tunewise.yaml"
    path.write_text(yaml.safe_dump({
        "project": "rl", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.2, "test": 0.2}, "max_length": 64, "clean": {"near_dedup": False}},
        "training": {"objective": "grpo", "method": "lora", "max_steps": 32, "batch_size": 4, "eval_every": 8, "save_every": 100, "learning_rate": 5e-2,
                     "warmup_ratio": 0.0, "grpo": {"group_size": 8, "max_new_tokens": 12, "rewards": [{"name": "grader", "args": {"file": "short.json"}}]}},
        "evaluation": {"max_new_tokens": 12, "perplexity": False, "graders": ["short.json"], "metrics": ["exact_match"],
                       "variants": [{"name": "base", "kind": "base"}, {"name": "fine-tuned", "kind": "fine-tuned"}]}}))
    cfg = load_config(path)
    before = initial_state(cfg)
    r, after = run_and_capture(cfg, cfg.train_dir)
    assert_trained_exactly(before, after)
    metrics = [json.loads(x) for x in (cfg.train_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_reward"] for m in metrics if "val_reward" in m]
    # the grader is the reward, and it rises (0.60 -> 0.94 on validation here: the model learns to stop early)
    assert "reward_short" in metrics[1] and val[-1] > val[0] + 0.1, val
    out = CliRunner().invoke(app, ["compare", str(path)])
    assert out.exit_code == 0, out.output
    result = json.loads((cfg.run_dir / "eval" / "compare.json").read_text())
    base, tuned = (result["variants"][v]["metrics"]["short"]["mean"] for v in ("base", "fine-tuned"))
    assert tuned > base and "short" in result["paired_vs_reference"]["fine-tuned"] and "short" in out.output
    assert math.isclose(result["variants"]["fine-tuned"]["metrics"]["reward"]["mean"], tuned)  # the same definition, the same numbers
