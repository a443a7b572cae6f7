"""The BFCL suite: BFCL's questions and its own AST checker (from the bfcl-eval package) on our text form; the checker
against hand-made answers, the function schemas converted, and `tunewise eval --suite bfcl` end to end on a tiny model."""

import json

import pytest

from tunewise.eval import bfcl


def _call(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_bfcl_functions_become_json_schema_tools():
    tools = bfcl.tools_of([{"name": "math.hypot", "description": "d", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "pts": {"type": "tuple", "items": {"type": "integer"}}, "opts": {"type": "dict", "properties": {"a": {"type": "any"}}}},
        "required": ["x"]}}])
    p = tools[0]["function"]["parameters"]
    assert tools[0]["function"]["name"] == "math.hypot" and p["type"] == "object" and p["required"] == ["x"]
    assert p["properties"]["x"] == {"type": "number"} and p["properties"]["pts"] == {"type": "array", "items": {"type": "integer"}}
    assert p["properties"]["opts"]["properties"]["a"] == {}


def test_bfcls_checker_judges_our_parsed_calls():
    simple = bfcl.load("simple_python")[0]  # calculate_triangle_area(base=10, height=5)
    assert bfcl.judge(simple, "simple_python", _call("calculate_triangle_area", base=10, height=5))[0]
    assert bfcl.judge(simple, "simple_python", "Sure! " + _call("calculate_triangle_area", base=10, height=5, unit="units"))[0]
    ok, _, error = bfcl.judge(simple, "simple_python", _call("calculate_triangle_area", base=10, height=6))
    assert not ok and "height" in error
    assert not bfcl.judge(simple, "simple_python", "The area is 25.")[0]
    assert not bfcl.judge(simple, "simple_python", "<tool_call>{not json}</tool_call>")[0]
    parallel = bfcl.load("parallel")[0]  # spotify.play twice, any order; strings compared as BFCL does (case, spaces)
    assert bfcl.judge(parallel, "parallel", _call("spotify.play", artist="maroon 5", duration=15) + _call("spotify.play", artist="Taylor Swift", duration=20))[0]
    assert not bfcl.judge(parallel, "parallel", _call("spotify.play", artist="Taylor Swift", duration=20))[0]
    irrelevant = bfcl.load("irrelevance")[0]
    assert bfcl.judge(irrelevant, "irrelevance", "None of the functions fits.")[0]
    assert not bfcl.judge(irrelevant, "irrelevance", _call(irrelevant["function"][0]["name"]))[0]


def test_the_prompt_puts_the_functions_in_the_system_turn():
    item = bfcl.load("multiple")[0]
    conv = bfcl.prompt_of(item, "You are a helpful assistant.")
    assert conv[0]["role"] == "system" and conv[0]["content"].startswith("You are a helpful assistant.") and "<tools>" in conv[0]["content"]
    assert all(f["name"] in conv[0]["content"] for f in item["function"]) and conv[-1]["role"] == "user"


def test_eval_suite_bfcl_from_the_cli(tiny_project, tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    path = tiny_project()
    r = CliRunner().invoke(app, ["eval", str(path), "-v", "base", "--set", "evaluation.variants=[{name: base, kind: base}]",
                                 "--suite", "bfcl", "--samples", "3", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "runs" / "tiny" / "eval" / "bfcl" / "base" / "summary.json").read_text())
    assert list(s["categories"]) == list(bfcl.CATEGORIES) and all(m["n"] == 3 for m in s["categories"].values())
    assert s["non_live_ast_mean"] is not None and "non-live AST mean" in r.output
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "eval" / "bfcl" / "base" / "parallel.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"id", "output", "calls", "correct", "error"} <= set(x) for x in rows)
    bad = CliRunner().invoke(app, ["eval", str(path), "-v", "base", "--set", "evaluation.variants=[{name: base, kind: base}]",
                                   "--suite", "bfcl", "--categories", "live_simple"])
    assert bad.exit_code == 2 and "--categories: 'live_simple' is not one of" in bad.output


def test_bfcl_with_a_variants_tool_choice_holds_every_call_to_the_items_functions(tiny_project, tmp_path):
    """tool_choice: required on a random tiny model: each answer's complete calls name one of that item's functions with
    arguments its schema admits (the weights play no part), and the rows say they were constrained."""
    import jsonschema
    from typer.testing import CliRunner

    from tunewise.cli import app

    path = tiny_project()
    r = CliRunner().invoke(app, ["eval", str(path), "-v", "held", "--set", "evaluation.variants=[{name: held, kind: base, tool_choice: required}]",
                                 "--suite", "bfcl", "--categories", "simple_python,multiple", "--samples", "6", "--max-new-tokens", "160"])
    assert r.exit_code == 0, r.output
    assert "calls held to the functions' schemas (tool_choice required)" in " ".join(r.output.split())
    seen = 0
    for cat in ("simple_python", "multiple"):
        items = {it["id"]: it for it in bfcl.load(cat, 6)}
        for row in map(json.loads, (tmp_path / "runs" / "tiny" / "eval" / "bfcl" / "held" / f"{cat}.jsonl").read_text().splitlines()):
            assert row["constrained"] and row["error"] != "a <tool_call> block that is not a JSON call"
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in bfcl.tools_of(items[row["id"]]["function"])}
            for call in row["calls"]:
                (name, args), = call.items()
                jsonschema.validate(args, schemas[name])
                seen += 1
    assert seen >= 2, seen


def test_a_few_shot_variant_puts_training_exchanges_before_the_question_and_keeps_the_functions_its_own(tmp_path, tiny_model):
    """kind few-shot: k training conversations' first question and the calls that answered it (text form) come before
    the BFCL question; the system turn lists the question's functions only. A project whose data has no tools is refused."""
    import yaml
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.config import load_config

    from tests.test_tools import good

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(good(i)) + "\n" for i in range(30)))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "project": "tools", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model)},
        "data": {"format": "openai", "train": "train.jsonl", "max_length": 512, "clean": {"near_dedup": False, "pii": False}},
        "evaluation": {"variants": [{"name": "fs", "kind": "few-shot", "k": 2, "selection": "random"}]}}))
    cfg = load_config(tmp_path / "t.yaml")
    item = bfcl.load("simple_python", 1)[0]
    shots = bfcl.shots_for(bfcl.shot_pool(cfg, cfg.evaluation.variants[0]), cfg.evaluation.variants[0], [item])[0]
    conv = bfcl.prompt_of(item, None, shots)
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert conv[1]["content"].startswith("Weather in Paris") and conv[2]["content"].startswith('<tool_call>\n{"name": "get_weather"')
    assert item["function"][0]["name"] in conv[0]["content"] and "get_weather" not in conv[0]["content"]
    assert conv[-1]["content"] == item["question"][0][-1]["content"]
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "t.yaml"), "-v", "fs", "--suite", "bfcl", "--categories", "simple_python",
                                 "--samples", "2", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs" / "tools" / "eval" / "bfcl" / "fs" / "summary.json").read_text())["categories"]["simple_python"]["n"] == 2


def test_a_few_shot_variant_on_data_without_tools_is_refused(tiny_project):
    from tunewise.config import load_config

    cfg = load_config(tiny_project(), ["evaluation.variants=[{name: fs, kind: few-shot, selection: random}]"])
    with pytest.raises(bfcl.BfclError, match="few-shot draws its examples from the training split, and none of it calls tools"):
        bfcl.shot_pool(cfg, cfg.evaluation.variants[0])
