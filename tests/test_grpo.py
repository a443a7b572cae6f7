"""GRPO: reward functions on edge cases, group-normalised advantages, the loss and its gradient against a direct
computation, and `tunewise train` with objective grpo end to end (rollouts through the engine)."""

import json

import pytest
import torch
import yaml

from tunewise.data.records import Record
from tunewise.train.rewards import RewardError, Rewards, exact_label, exact_match, json_valid, length_penalty, regex, resolve


def _rec(answer="card_arrival", label=None, **meta):
    return Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], "r:1", label, meta)


def word_count(completion, record, **_):  # a user reward, loaded as tests.test_grpo:word_count
    return float(len(completion.split()))


def test_reward_functions_on_edge_cases():
    r = _rec(label="card_arrival")
    assert exact_label("card_arrival", r) == exact_label(" Card arrival. ", r) == 1.0
    assert exact_label("card_arrival\nand more", r) == 0.0 and exact_label("", r) == 0.0 and exact_label("card", r) == 0.0
    assert exact_label("Paris", _rec("Paris")) == 1.0  # no label: the answer
    assert exact_match("The Denver Broncos!", _rec("Denver Broncos")) == 1.0
    assert exact_match("Broncos", _rec("Denver Broncos", answers=["Broncos"])) == 1.0 and exact_match("", _rec("x")) == 0.0
    assert regex("id: 42", r, pattern=r"\d+") == 1.0 and regex("id: 42", r, pattern=r"\d+", full=True) == 0.0
    with pytest.raises(RewardError, match="give a pattern"):
        regex("x", r)
    assert json_valid('{"a": 1}', r) == 1.0 and json_valid("[1]", r) == 1.0 and json_valid("[1]", r, object=True) == 0.0
    assert json_valid("{'a': 1}", r) == 0.0 and json_valid("", r) == 0.0
    assert length_penalty("a " * 50, r) == 0.0 and length_penalty("a " * 75, r) == -0.5 and length_penalty("a " * 500, r) == -1.0
    assert resolve("tests.test_grpo:word_count") is word_count
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        resolve("nope")
    with pytest.raises(RewardError, match="cannot load 'no_such_module:f'"):
        resolve("no_such_module:f")
    from tunewise.config import RewardEntry

    total = Rewards([RewardEntry(name="exact_label"), RewardEntry(name="length_penalty", weight=2.0, args={"max_words": 1})])
    assert total(["card_arrival", "card arrival now"], [r, r]) == [1.0, -2.0] and total.parts == {"exact_label": 0.5, "length_penalty": -0.5}


def test_advantages_are_normalised_within_each_group():
    from tunewise.train.objectives.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    a = group_advantages(rewards, 4).view(3, 4)
    assert torch.allclose(a.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert a[0].std().item() == pytest.approx(1.0, rel=1e-3) and a[2].std().item() == pytest.approx(1.0, rel=1e-3)
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64))  # a group of equal rewards teaches nothing
    g = rewards[8:]
    assert a[2, 3].item() == pytest.approx(((g[3] - g.mean()) / (g.std() + 1e-4)).item())


def test_grpo_loss_and_gradient_equal_a_direct_computation(tiny_model):
    from tunewise.data.tokenize import IGNORE, Tokenized, collate
    from tunewise.models import load_model
    from tunewise.train.objectives.grpo import GRPOLoss

    loaded = load_model(str(tiny_model))
    model, tok = loaded.model.double(), loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say a word"}], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    comps = [tok("hello there")["input_ids"], tok("no")["input_ids"], tok("a longer answer here")["input_ids"]]
    rows = [Tokenized(prompt + c, [IGNORE] * len(prompt) + c) for c in comps]
    b = collate(rows, tok.pad_token_id)
    adv = torch.tensor([1.2, -0.3, -0.9], dtype=torch.float64)
    n_tok = sum(len(c) for c in comps)
    ref = torch.linspace(-8, -2, n_tok, dtype=torch.float64)
    beta = 0.1
    loss = GRPOLoss(model, beta, 0.2)(**b, advantages=adv, ref_logps=ref)
    loss.backward()
    got_grad = model.lm_head.weight.grad.clone() if model.lm_head.weight.grad is not None else model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    # direct: per token -A * logp (surrogate with ratio 1) + beta * k3(ref, logp), from full logits one row at a time
    want, k = 0.0, 0
    for row, c, a in zip(rows, comps, adv):
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0]
        for t in range(len(prompt), len(row.input_ids)):
            lp = torch.log_softmax(logits[t - 1], -1)[row.input_ids[t]]
            d = ref[k] - lp
            want = want + (-a * torch.exp(lp - lp.detach())) + beta * (torch.exp(d) - d - 1)
            k += 1
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    want.backward()
    direct_grad = model.lm_head.weight.grad if model.lm_head.weight.grad is not None else model.model.embed_tokens.weight.grad
    assert torch.allclose(got_grad, direct_grad, rtol=1e-7, atol=1e-10)



def test_grouped_layouts_give_the_padded_loss_and_gradient(tiny64):
    """beta 0: one Layout per prompt (the prompt run once as the prefix row, its samples' completions as rows) gives the
    padded rows' loss and gradients on every parameter (float64)."""
    from tunewise.data.tokenize import IGNORE, Tokenized, collate
    from tunewise.train.objectives.grpo import GRPOLoss
    from tunewise.train.layout import make_layout

    model, tok = tiny64
    prompts = [tok.apply_chat_template([{"role": "system", "content": "Classify the intent."}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for q in ("Where is my card?", "My top-up failed again, why?")]
    comps = [[tok("card_arrival")["input_ids"], tok("card")["input_ids"], tok("lost_or_stolen_card")["input_ids"]],
             [tok("top_up_failed")["input_ids"], tok("top_up_failed")["input_ids"], tok("pending_top_up")["input_ids"]]]
    rows = [Tokenized(p + c, [IGNORE] * len(p) + c) for p, cs in zip(prompts, comps) for c in cs]
    adv = torch.tensor([1.2, -0.3, -0.9, 0.5, 0.5, -1.0], dtype=torch.float64)
    loss_fn = GRPOLoss(model, 0.0, 0.2)
    assert loss_fn.groups
    padded = loss_fn(**collate(rows, tok.pad_token_id), advantages=adv, ref_logps=None)
    padded.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    groups = [(make_layout(rows[k : k + 3], tok.pad_token_id, share_prefix=True), adv[k : k + 3]) for k in (0, 3)]
    assert all(lay.prefix_len == len(prompts[i]) - 1 for i, (lay, _) in enumerate(groups))  # the prompt is the prefix row
    grouped = loss_fn(groups=groups)
    grouped.backward()
    assert grouped.item() == pytest.approx(padded.item(), rel=1e-10)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_tunewise_train_with_objective_grpo(tiny_model, tmp_path, method):
    from tunewise.config import load_config

    from .test_train import assert_trained_exactly, initial_state, run_and_capture

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {i}"},
                                                                           {"role": "assistant", "content": f"number {i}"}]}) + "\n"
                                                  for i in range(30)))
    cfg_path = tmp_path / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "project": "rl", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.2, "test": 0.0}, "max_length": 64,
                 "clean": {"near_dedup": False}},
        "training": {"objective": "grpo", "method": method, "trainable_layers": 1, "max_steps": 3, "batch_size": 2, "eval_every": 2,
                     "save_every": 2, "learning_rate": 1e-2,
                     "grpo": {"group_size": 4, "max_new_tokens": 6, "beta": 0.05,
                              "rewards": [{"name": "tests.test_grpo:word_count"}, {"name": "exact_match", "weight": 0.5}]}},
    }))
    cfg = load_config(cfg_path)
    before = initial_state(cfg)
    r, after = run_and_capture(cfg, tmp_path / "t")
    assert_trained_exactly(before, after)
    metrics = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["val_reward"] == pytest.approx(-r.base_val_loss)  # the model before training
    assert all({"reward", "reward_std", "kl", "flat_groups", "reward_tests.test_grpo:word_count", "reward_exact_match"} <= set(m) for m in metrics[1:])
    assert "val_reward" in metrics[-1] and r.best_val_loss == pytest.approx(-max(m["val_reward"] for m in metrics[1:] if "val_reward" in m))
    assert json.loads((tmp_path / "t" / "model" / "tunewise.json").read_text())["objective"] == "grpo"


SEEN: list[str] = []


def seen_label(completion, record, **_):  # a user reward that keeps every rollout it scores
    SEEN.append(completion)
    return float(completion == record.label)


@pytest.mark.parametrize("constrain", ["auto", "none"])
def test_rollouts_decode_into_the_label_set_as_evaluation_does(tiny_model, tmp_path, constrain):
    from tunewise.config import load_config

    from .test_train import run_and_capture

    labels = ["card_arrival", "exchange_rate", "top_up_failed"]
    (tmp_path / "train.csv").write_text("text,intent\n" + "".join(f"where is my thing number {i},{labels[i % 3]}\n" for i in range(30)))
    cfg_path = tmp_path / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "project": "rl", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "csv", "train": "train.csv", "columns": {"user": "text", "assistant": "intent", "label": "intent"},
                 "split": {"validation": 0.2, "test": 0.0}, "max_length": 64, "clean": {"near_dedup": False}},
        "use_case": {"task": "classification"},
        "training": {"objective": "grpo", "method": "freeze", "trainable_layers": 1, "max_steps": 2, "batch_size": 2, "eval_every": 2,
                     "save_every": 2, "learning_rate": 1e-3,
                     "grpo": {"group_size": 4, "max_new_tokens": 6, "constrain": constrain, "rewards": [{"name": "tests.test_grpo:seen_label"}]}},
    }))
    SEEN.clear()
    run_and_capture(load_config(cfg_path), tmp_path / "t")
    assert len(SEEN) >= 2 * 2 * 4
    if constrain == "auto":  # rollouts and greedy validation answers are all labels
        assert set(SEEN) <= set(labels) and len(set(SEEN)) > 1
    else:  # a random model decoding freely writes anything
        assert not set(SEEN) <= set(labels)


def test_flat_groups_are_left_out_of_the_loss_pass_and_carry_no_gradient(tiny64):
    """A group whose rewards are all equal has zero advantages: leaving it out of the grouped loss changes neither
    the summed loss nor any gradient (float64); only the step's token count, which skip_flat makes the teaching tokens'."""
    from tunewise.data.tokenize import IGNORE, Tokenized
    from tunewise.train.objectives.grpo import GRPOLoss, group_advantages, informative_groups
    from tunewise.train.layout import make_layout

    assert informative_groups(group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]), 2), 2) == [2, 4]
    assert informative_groups(group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2), 2) == [0]  # all flat: one, no gradient
    model, tok = tiny64
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in ("Where is my card?", "My top-up failed")]
    comps = [["card_arrival", "card_arrival"], ["top_up_failed", "pending_top_up"]]
    rows = [Tokenized(p + tok(c)["input_ids"], [IGNORE] * len(p) + tok(c)["input_ids"]) for p, cs in zip(prompts, comps) for c in cs]
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), 2)
    loss_fn = GRPOLoss(model, 0.0, 0.2)

    def grads(starts):
        model.zero_grad()
        loss = loss_fn(groups=[(make_layout(rows[k : k + 2], tok.pad_token_id, share_prefix=True), adv[k : k + 2]) for k in starts])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, kept = grads([0, 2]), grads(informative_groups(adv, 2))
    assert informative_groups(adv, 2) == [2] and kept[0] == pytest.approx(full[0], rel=1e-12)
    assert all(torch.allclose(kept[1][n], g, rtol=1e-12, atol=1e-15) for n, g in full[1].items())


def test_constrain_labels_on_data_without_labels_names_the_key(tiny_model, tmp_path):
    from tunewise.config import load_config
    from tunewise.train.loop import TrainError, train

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"},
                                                                           {"role": "assistant", "content": f"a {i}"}]}) + "\n" for i in range(20)))
    cfg_path = tmp_path / "tunewise.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "project": "rl", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.2, "test": 0.0}, "max_length": 64},
        "training": {"objective": "grpo", "method": "lora", "max_steps": 1, "batch_size": 2, "grpo": {"group_size": 2, "constrain": "labels"}},
    }))
    with pytest.raises(TrainError, match=r"training.grpo.constrain: labels, but the data has no labels"):
        train(load_config(cfg_path), tmp_path / "t", progress=False)


def test_the_tool_calls_reward_scores_calls_against_the_reference():
    """Exact calls 1; the right function with one of two values right: (0 + F1 1/2) / 2; no call where none is
    wanted 1; a call where none is wanted 0; a function not among the record's tools, or arguments its schema
    refuses, 0."""
    from tunewise.train.rewards import tool_calls

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]

    def call(**args):
        return "<tool_call>\n" + json.dumps({"name": "add", "arguments": args}) + "\n</tool_call>"

    r = _rec(call(a=2, b=3), tools=tools)
    assert tool_calls(call(a=2, b=3), r) == 1.0 and tool_calls(call(b=3, a=2), r) == 1.0
    assert tool_calls(call(a=2, b=4), r) == pytest.approx(0.25)  # F1: 1 of 2 triples right on each side -> 0.5
    assert tool_calls("It is 5.", r) == 0.0
    none = _rec("No function fits.", tools=tools)
    assert tool_calls("I cannot help with that.", none) == 1.0 and tool_calls(call(a=1, b=1), none) == 0.0
    assert tool_calls(call(a="2", b=3), r) == 0.0
    assert tool_calls("<tool_call>\n" + json.dumps({"name": "sub", "arguments": {"a": 2, "b": 3}}) + "\n</tool_call>", r) == 0.0
