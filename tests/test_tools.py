"""Tool use in training data: OpenAI tools and tool_calls, legacy functions, glaive/ShareGPT function_call and
observation turns, Hermes <tool_call> text; every call validated against its tool's schema; a fuzz of malformed
records quarantined with line and field and no traceback, every good record kept; the loss mask trains the assistant's
calls and never a tool's result."""

import json
import random
from pathlib import Path

import pytest


from tunewise.data.formats import read_records
from tunewise.data.records import BadRecord
from tunewise.data.tokenize import IGNORE, tokenize_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
FREEZE = {"type": "function", "function": {"name": "freeze_card", "parameters": {
    "type": "object", "properties": {"card": {"type": "integer"}}, "required": ["card"], "additionalProperties": False}}}


def good(i: int) -> dict:
    return {"tools": [WEATHER, FREEZE], "messages": [
        {"role": "user", "content": f"Weather in Paris {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": f"It is 21 degrees in Paris ({i})."}]}


def _call(rec, **fn):
    rec["messages"][1]["tool_calls"][0]["function"].update(fn)
    return rec


BREAKERS = {
    "bad JSON arguments": (lambda r: _call(r, arguments="{city: Paris"), "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    "unknown tool": (lambda r: _call(r, name="launch_rocket"), "messages[1].tool_calls[0].function.name: 'launch_rocket' is not one of"),
    "missing required": (lambda r: _call(r, arguments=json.dumps({"unit": "c"})), "messages[1].tool_calls[0].function.arguments: 'city' is a required"),
    "wrong type": (lambda r: _call(r, arguments=json.dumps({"city": 7})), "messages[1].tool_calls[0].function.arguments.city: 7 is not of type 'string'"),
    "bad enum": (lambda r: _call(r, arguments=json.dumps({"city": "Oslo", "unit": "k"})), "arguments.unit: 'k' is not one of"),
    "arguments not an object": (lambda r: _call(r, arguments="[1, 2]"), "function.arguments: expected a JSON object"),
    "orphan tool message": (lambda r: {**r, "messages": [r["messages"][0], {"role": "assistant", "content": "Let me check."}, r["messages"][2],
                                                       r["messages"][3]]}, "messages[2]: a tool message with no call before it"),
    "call id mismatch": (lambda r: {**r, "messages": r["messages"][:2] + [{**r["messages"][2], "tool_call_id": "nope"}] + r["messages"][3:]},
                         "messages[2].tool_call_id: 'nope' answers no call"),
    "tools not a list": (lambda r: {**r, "tools": {"name": "x"}}, "tools: expected a list"),
    "parallel calls refused": (lambda r: {**r, "parallel_tool_calls": False, "messages": [r["messages"][0], {**r["messages"][1], "tool_calls":
                               r["messages"][1]["tool_calls"] * 2}] + r["messages"][2:]}, "2 calls, but parallel_tool_calls is false"),
}


def test_openai_tool_use_is_read_validated_and_rendered(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    (rec,) = read_records(path, "openai")
    assert not isinstance(rec, BadRecord), rec
    roles = [m["role"] for m in rec.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert "<tools>" in rec.messages[0]["content"] and '"name": "get_weather"' in rec.messages[0]["content"]
    assert rec.messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert rec.meta["tools"][0]["function"]["name"] == "get_weather"


def test_legacy_functions_and_hermes_text_read_as_tool_calls(tmp_path):
    legacy = {"functions": [WEATHER["function"]], "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny in Rome."}]}
    hermes = {"tools": [FREEZE], "messages": [{"role": "user", "content": "Freeze card 4"},
                                              {"role": "assistant", "content": "Freezing it.<tool_call>{\"name\": \"freeze_card\", \"arguments\": {\"card\": 4}}</tool_call>"}]}
    bad_hermes = {"tools": [FREEZE], "messages": [{"role": "user", "content": "Freeze card 4"},
                                                  {"role": "assistant", "content": "<tool_call>{\"name\": \"freeze_card\", \"arguments\": {\"card\": \"4\"}}</tool_call>"}]}
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in (legacy, hermes, bad_hermes)))
    a, b, c = read_records(path, "openai")
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert '"arguments": {"city": "Rome"}' in a.messages[2]["content"]
    assert b.messages[-1]["content"].startswith("Freezing it.\n<tool_call>\n{\"name\": \"freeze_card\"")
    assert isinstance(c, BadRecord) and "arguments.card: '4' is not of type 'integer'" in c.reason and c.where == "line 3"


def test_glaive_sharegpt_function_call_and_observation_turns(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "Weather in Lima?"},
                             {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}"},
                             {"from": "observation", "value": "{\"temp\": 18}"}, {"from": "gpt", "value": "18 degrees."}],
           "tools": json.dumps([WEATHER["function"]])}
    path = tmp_path / "g.json"
    path.write_text(json.dumps([rec]))
    (r,) = read_records(path, "sharegpt")
    assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert r.messages[3]["content"] == "{\"temp\": 18}"


def test_a_fuzz_of_malformed_tool_records_is_quarantined_with_line_and_field(tmp_path):
    rng = random.Random(0)
    names = list(BREAKERS)
    rows, expected = [], {}
    for i in range(300):
        if i % 3 == 0:
            rows.append(good(i))
        else:
            kind = rng.choice(names)
            rows.append(BREAKERS[kind][0](good(i)))
            expected[i + 1] = BREAKERS[kind][1]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = list(read_records(path, "openai"))  # no exception: every record is a Record or a BadRecord
    assert len(out) == 300
    bad = {int(b.where.split()[1]): b.reason for b in out if isinstance(b, BadRecord)}
    assert len(expected) >= 200 and set(bad) == set(expected)
    for line, reason in bad.items():
        assert expected[line] in reason, (line, reason)
    assert sum(not isinstance(r, BadRecord) for r in out) == 100  # every good record kept


def test_the_mask_trains_calls_and_answers_never_tool_results(tmp_path, smol_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good(1)) + "\n")
    (rec,) = read_records(path, "openai")
    ids, labels = tokenize_messages(smol_tokenizer, rec.messages)
    trained = smol_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in trained
    assert "It is 21 degrees in Paris (1)." in trained
    assert "temp" not in trained and "Weather in Paris" not in trained and "<tools>" not in trained


def test_data_prepare_keeps_good_tool_records_and_quarantines_bad_ones(tmp_path, tiny_model):
    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app

    rows = [good(i) for i in range(30)] + [_call(good(100 + i), name="nope") for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"project": "tools", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
                                                     "data": {"format": "openai", "train": "train.jsonl", "max_length": 512,
                                                              "clean": {"near_dedup": False, "pii": False}}}))
    r = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "t.yaml")])
    assert r.exit_code == 0, r.output
    q = [json.loads(x) for x in (tmp_path / "runs" / "tools" / "data" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 5 and all("'nope' is not one of the record's tools" in x["reason"] and x["where"].startswith("line 3") for x in q)
    kept = sum(json.loads((tmp_path / "runs" / "tools" / "data" / "summary.json").read_text())["outputs"][s]["records"] for s in ("train", "validation", "test"))
    assert kept == 30


def test_tool_call_metrics_against_hand_computed_values():
    from tunewise.metrics import score

    def call(name, **args):
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"

    ref = call("get_weather", city="Paris", unit="c") + call("freeze_card", card=4)
    preds = [call("freeze_card", card=4) + call("get_weather", unit="c", city="Paris"),  # both calls, other order: exact
             call("get_weather", city="Paris", unit="f") + call("freeze_card", card=4),  # one argument wrong
             call("get_weather", city="Paris", unit="c"),  # one call missing
             "It is sunny.",  # no call at all
             "<tool_call>{not json}</tool_call>"]  # a malformed call counts as a wrong call
    assert score("tool_calls_exact", preds, [ref] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score("tool_call_names", preds, [ref] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # triples: ref has 3 (city, unit, card); pred 2 shares 2 of its 3 -> 2*2/6; pred 3 shares 2 of its 2 -> 2*2/5
    assert score("tool_args_f1", preds, [ref] * 5) == pytest.approx([1.0, 4 / 6, 4 / 5, 0.0, 0.0])
    # irrelevance: no call expected, none made
    assert score("tool_calls_exact", ["No tool fits that.", call("freeze_card", card=1)], ["I cannot help with that."] * 2) == [1.0, 0.0]
    assert score("tool_args_f1", ["No tool fits that."], ["Nothing to call."]) == [1.0]


def test_training_evaluation_and_serving_render_a_tool_conversation_to_the_same_ids(tmp_path, smol_tokenizer):
    """One record with tools and a call: the prompt training sees before the last answer, the one evaluation builds
    (build_prompt) and the one serve builds from the same request (ToolRequest) are the same token ids."""
    from tunewise.eval.evaluate import build_prompt
    from tunewise.serve.app import ChatRequest, ToolRequest

    raw = good(3)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    (rec,) = read_records(path, "openai")
    ids = lambda msgs: smol_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]  # noqa: E731
    train = ids([{"role": m["role"], "content": m["content"]} for m in rec.messages[:-1]])
    evaluation = ids(build_prompt(rec, None, None))
    req = ChatRequest(model="base", messages=raw["messages"][:-1], tools=raw["tools"])
    serving = ids(ToolRequest(req.model_extra).turns(req))
    assert train == evaluation == serving
    # a configured system prompt keeps the tools in evaluation
    with_system = build_prompt(rec, "You route tickets.", None)[0]["content"]
    assert with_system.startswith("You route tickets.") and "<tools>" in with_system


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from tunewise.engine import Engine

    return Engine.load(str(tiny_model), device="cpu", dtype="float32")


def _accepts(engine, grammar, text: str, end: bool = False) -> bool:
    """Whether the grammar's matcher takes `text` token by token (and then the end of turn, with end)."""
    m = grammar.matcher()
    ids = engine.tok(text, add_special_tokens=False)["input_ids"] + ([engine.tok.convert_tokens_to_ids("<|im_end|>")] if end else [])
    return all(m.accept_token(t) for t in ids)


def test_the_call_grammar_admits_exactly_the_calls_training_writes(tiny_engine):
    """call_grammar holds decoding to render_text's call form: a valid call as training writes it passes; an unknown
    tool, a missing required or mistyped argument, or the argument JSON spaced otherwise does not; auto admits plain
    text and ends there, required does not; parallel=False ends after one call."""
    from tunewise.data.tools import call_grammar, render_text

    tools = [WEATHER, FREEZE]
    call = render_text([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]}], [])[0]["content"]
    assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    auto, required = (tiny_engine.grammar("structural_tag", call_grammar(tools, c)) for c in ("auto", "required"))
    one = tiny_engine.grammar("structural_tag", call_grammar(tools, "required", parallel=False))
    named = tiny_engine.grammar("structural_tag", call_grammar(tools, "freeze_card"))
    assert _accepts(tiny_engine, auto, "It is sunny.", end=True) and not _accepts(tiny_engine, required, "It is sunny.")
    for g in (auto, required, one):
        assert _accepts(tiny_engine, g, call, end=True)
        assert _accepts(tiny_engine, g, call + "\n" + call, end=True) == (g is not one)
        for bad in ('{"name": "launch", "arguments": {}}', '{"name": "get_weather", "arguments": {"unit": "c"}}',
                    '{"name": "get_weather", "arguments": {"city": 7}}', '{"name": "get_weather", "arguments": {"city":"Paris"}}'):
            assert not _accepts(tiny_engine, g, f"<tool_call>\n{bad}\n</tool_call>", end=True), bad
    assert not _accepts(tiny_engine, named, call) and _accepts(tiny_engine, auto, "Let me check. " + call, end=True)
    with pytest.raises(ValueError, match="'launch' is not one of the tools"):
        call_grammar(tools, "launch")


def test_the_engine_holds_each_conversations_calls_to_its_own_tools(tiny_engine):
    """generate(tools=...): a random model's calls under required all parse and validate against that conversation's
    tools (the weights play no part); a conversation without tools in the same batch decodes as it does alone."""
    import jsonschema

    from tunewise.data.tools import call_grammar, render_text
    from tunewise.metrics import TOOL_CALL, parse_calls

    convs = [render_text([{"role": "user", "content": f"Weather in city {i}?"}], [WEATHER] if i % 2 else [FREEZE]) for i in range(6)]
    plain = [{"role": "user", "content": "Hello"}]
    tools = [[WEATHER] if i % 2 else [FREEZE] for i in range(6)]
    seen = 0
    for parallel in (False, True):
        outs = tiny_engine.generate(convs + [plain], max_new_tokens=96, temperature=1.0, seed=3, tools=tools + [None], tool_choice="required",
                                    parallel_tool_calls=parallel)
        for o, ts in zip(outs, tools):
            # every row is in the grammar's language, or a prefix of it where the length limit cut a random string short
            assert _accepts(tiny_engine, tiny_engine.grammar("structural_tag", call_grammar(ts, "required", parallel)), o.text,
                            end=o.finish_reason == "stop"), o.text
            calls = parse_calls(o.text)
            assert len(calls) == len(TOOL_CALL.findall(o.text)) and (calls or o.finish_reason == "length"), o.text
            assert parallel or o.finish_reason == "length" or len(calls) == 1  # one call, and the grammar ends the turn
            for c in calls:
                assert c["name"] == ts[0]["function"]["name"]
                jsonschema.validate(c["arguments"], ts[0]["function"]["parameters"])
        seen += sum(len(parse_calls(o.text)) for o in outs[:6])
    assert seen >= 3  # not every row was cut short: the checks above saw whole calls
    alone = tiny_engine.generate([plain], max_new_tokens=96, temperature=0.0)[0].text
    assert tiny_engine.generate(convs[:2] + [plain], max_new_tokens=96, temperature=0.0, tools=tools[:2] + [None],
                                tool_choice="required")[2].text == alone


def test_one_template_training_evaluation_serve_runtimes_and_gguf_render_a_tool_conversation_alike(tmp_path, tiny_model):
    """Train on tool-use data; the saved chat template carries the text form (with_tool_form), so the same conversation
    gives the same token ids as training saw it (text form, base template), as evaluation and serve build it, as a runtime
    sends it (structured tools and tool_calls to the saved template: vLLM, llama.cpp --jinja) and as the GGUF's metadata
    template renders it. A template that differs in one place ("args" for "arguments") does not."""
    import yaml

    from tunewise.config import load_config
    from tunewise.data.tools import TEMPLATE_MARK, with_tool_form
    from tunewise.engine import Engine
    from tunewise.eval.evaluate import build_prompt
    from tunewise.models import load_tokenizer
    from tunewise.serve.app import ChatRequest, ToolRequest
    from tunewise.serve.export import export_gguf
    from tunewise.train.loop import train

    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(good(i)) + "\n" for i in range(40)))
    (tmp_path / "tunewise.yaml").write_text(yaml.safe_dump({
        "project": "tools", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "tools.jsonl", "max_length": 256, "split": {"validation": 0.1, "test": 0.1},
                 "clean": {"near_dedup": False, "pii": False}},
        "training": {"method": "lora", "max_steps": 2, "batch_size": 4, "eval_every": 100, "save_every": 100}}))
    cfg = load_config(tmp_path / "tunewise.yaml")
    r = train(cfg, cfg.train_dir, progress=False)
    assert json.loads((Path(r.model_dir) / "tunewise.json").read_text())["tools_format"] == "hermes"
    base, trained = load_tokenizer(str(tiny_model)), load_tokenizer(r.model_dir)
    assert trained.chat_template.startswith(TEMPLATE_MARK) and trained.chat_template.endswith(base.chat_template)

    raw = good(3)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    (rec,) = read_records(path, "openai")
    ids = lambda tok, msgs, **kw: tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)["input_ids"]  # noqa: E731
    training = ids(base, [{"role": m["role"], "content": m["content"]} for m in rec.messages[:-1]])
    evaluation = Engine.load(cfg.model.name, r.model_dir)._prompts([build_prompt(rec, None, None)])[0]
    req = ChatRequest(model="fine-tuned", messages=raw["messages"][:-1], tools=raw["tools"])
    serving = ids(trained, ToolRequest(req.model_extra).turns(req))
    runtime = ids(trained, raw["messages"][:-1], tools=raw["tools"])
    done = export_gguf(Path(r.model_dir), tmp_path / "gguf", "tools:1", quant="f32", pre="smollm")
    from transformers import AutoTokenizer

    gpath = Path(done.gguf.path)
    from_gguf = AutoTokenizer.from_pretrained(str(gpath.parent), gguf_file=gpath.name)
    assert training == evaluation == serving == runtime == ids(from_gguf, raw["messages"][:-1], tools=raw["tools"])
    changed = with_tool_form(base.chat_template).replace('\', "arguments": \'', '\', "args": \'')
    assert changed != with_tool_form(base.chat_template)
    assert ids(base, raw["messages"][:-1], tools=raw["tools"], chat_template=changed) != training


def test_the_same_question_with_other_tools_is_not_a_near_duplicate(tmp_path, tiny_model):
    """A question asked with the tool that answers it and again without it (Hammer's irrelevance augmentation: the answer
    is then no call) are two tasks: near-duplicate removal compares prompts within one tool set only, so both are kept;
    a question repeated with the same tools and one word changed is still dropped."""
    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app

    questions = ["What is the weather like in Paris this morning, in celsius please?", "Tell me whether it is raining in Lisbon right now.",
                 "How cold does Oslo get tonight? I am packing for a trip.", "Is it sunny in Madrid today or should I take an umbrella?"]
    rows = []
    for i, q in enumerate(questions):
        rec = good(i)
        rec["messages"][0]["content"] = q
        rows.append(rec)
        rows.append({"tools": [FREEZE], "messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "None of my functions can do that: I can only use freeze_card."}]})
    twin = good(9)
    twin["messages"][0]["content"] = questions[0].replace("morning", "evening")
    rows.append(twin)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"project": "tools", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
                                                     "data": {"format": "openai", "train": "train.jsonl", "max_length": 512,
                                                              "clean": {"pii": False, "near_dup_threshold": 0.7}}}))
    r = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "t.yaml")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "runs" / "tools" / "data" / "summary.json").read_text())
    assert summary["cleaning"]["steps"]["near_dedup"]["dropped"] == 1  # the twin, not the questions asked without their tool
    assert sum(summary["outputs"][s]["records"] for s in ("train", "validation", "test")) == 8
