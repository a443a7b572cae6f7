"""`tunewise data convert`: API-Bank and ToolRL records to OpenAI chat JSONL with tools and tool_calls, which the openai
reader then checks call by call. The records below are written here in each dataset's form (not copied from them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunewise.data.convert import convert, from_api_bank, from_toolrl
from tunewise.data.formats import read_records
from tunewise.data.records import BadRecord

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "toolcall" / "train" / "extra"

SEARCHER = json.dumps({"apiCode": "ToolSearcher", "description": "Searches for tools.", "parameters": {"keywords": {"type": "str", "description": "Keywords."}}})
API_BANK = {
    "instruction": "Generate an API request in the format of [ApiName(key1='value1', ...)]",
    "input": SEARCHER + "\nUser: Book a table for 2 in Rome.TIME: 2034-04-15 10:00:00\n"
    "API-Request: [ToolSearcher(keywords='restaurant booking')]->{'name': 'BookTable', 'description': 'Books a table.', "
    "'input_parameters': {'city': {'type': 'str', 'description': 'City.'}, 'people': {'type': 'int', 'description': 'Guests.'}}, "
    "'output_parameters': {}}\nGenerate API Request: ",
    "output": "API-Request: [BookTable(city='Rome', people=2)]",
}
TOOLRL = {
    "instruction": "You are a helpful assistant.\n\n**Available Tools**\nIn your response, you can use the following tools:\n"
    "1. Name: get_weather\nDescription: Current weather in a city.\nParameters: {\"city\": {\"description\": \"City name\", \"type\": \"string\", \"default\": \"\"}}\n"
    "2. Name: add\nDescription: Adds two numbers.\nParameters: {\"a\": {\"description\": \"first\", \"type\": \"int\", \"default\": \"\"}, "
    "\"b\": {\"description\": \"second\", \"type\": \"float\", \"default\": \"0\"}}\n\n**Steps for Each Turn**\n...",
    "input": "**Dialogue Records History**\n<user> Weather in Oslo and Rome, and 2+3? </user>",
    "output": "<think> Two weather calls and one sum. </think>\n<tool_call>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}\n"
    "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}\n{\"name\": \"add\", \"parameters\": {\"a\": 2, \"b\": 3}}\n</tool_call>",
}


def test_api_bank_calls_results_and_the_tools_a_search_found():
    r = from_api_bank(API_BANK)
    assert [t["function"]["name"] for t in r["tools"]] == ["ToolSearcher", "BookTable"]
    assert r["tools"][1]["function"]["parameters"]["properties"] == {"city": {"type": "string", "description": "City."},
                                                                    "people": {"type": "integer", "description": "Guests."}}
    roles = [m["role"] for m in r["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert r["messages"][0]["content"].startswith("Book a table for 2 in Rome.")
    last = r["messages"][-1]["tool_calls"][0]["function"]
    assert last["name"] == "BookTable" and json.loads(last["arguments"]) == {"city": "Rome", "people": 2}
    loose = from_api_bank({**API_BANK, "output": "API-Request: [BookTable(city=New York, people=2)]"})  # unquoted, as API-Bank allows
    assert json.loads(loose["messages"][-1]["tool_calls"][0]["function"]["arguments"]) == {"city": "New York", "people": 2}
    reply = from_api_bank({**API_BANK, "output": "AI: Your table is booked."})
    assert reply["messages"][-1] == {"role": "assistant", "content": "Your table is booked."}


def test_toolrl_parallel_calls_reasoning_and_a_reply():
    r = from_toolrl(TOOLRL)
    assert [t["function"]["name"] for t in r["tools"]] == ["get_weather", "add"]
    assert r["tools"][1]["function"]["parameters"]["properties"]["b"]["type"] == "number"
    turn = r["messages"][-1]
    assert [json.loads(c["function"]["arguments"]) for c in turn["tool_calls"]] == [{"city": "Oslo"}, {"city": "Rome"}, {"a": 2, "b": 3}]
    assert turn["reasoning_content"] == "Two weather calls and one sum." and turn["content"] is None
    refuse = from_toolrl({**TOOLRL, "output": "<think> No tool fits. </think>\n<response> I cannot do that. </response>"})
    assert refuse["messages"][-1]["content"] == "I cannot do that." and "tool_calls" not in refuse["messages"][-1]


def test_convert_keeps_bad_records_aside_and_the_reader_checks_every_call(tmp_path):
    """A file with good and bad records: the bad ones go to OUT.bad.jsonl with their number and reason; the written file
    reads back through data.format openai with its calls checked (a mistyped argument is quarantined there, named)."""
    rows = [TOOLRL, {**TOOLRL, "output": "<think> hm </think>"}, "not an object",
            {**TOOLRL, "output": "<tool_call>\n{\"name\": \"add\", \"parameters\": {\"a\": \"two\"}}\n</tool_call>"},
            {**TOOLRL, "output": "<tool_call>\n{name: add}\n</tool_call>"}]
    src = tmp_path / "toolrl.json"
    src.write_text(json.dumps(rows))
    r = convert(src, "toolrl", tmp_path / "out.jsonl")
    assert (r.records, r.written, r.bad, r.calls) == (5, 2, 3, 4)
    bad = [json.loads(x) for x in (tmp_path / "out.bad.jsonl").read_text().splitlines()]
    assert [b["record"] for b in bad] == [2, 3, 5]
    assert bad[0]["error"] == "output: neither <tool_call> nor <response>" and "not valid JSON" in bad[2]["error"]
    items = list(read_records(tmp_path / "out.jsonl", "openai", reasoning="drop"))
    good = [i for i in items if not isinstance(i, BadRecord)]
    quarantined = [i for i in items if isinstance(i, BadRecord)]
    assert len(good) == 1 and "<tool_call>" in good[0].messages[-1]["content"] and "<think>" not in good[0].messages[-1]["content"]
    assert len(quarantined) == 1 and quarantined[0].where.endswith("line 2")
    assert quarantined[0].reason == "messages[1].tool_calls[0].function.arguments.a: 'two' is not of type 'integer'"


def test_data_convert_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from tunewise.cli import app

    src = tmp_path / "api.json"
    src.write_text(json.dumps([API_BANK, {**API_BANK, "output": "Sure."}]))
    r = CliRunner().invoke(app, ["data", "convert", str(src), "--from", "api-bank", "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    assert "2 api-bank records -> 1 conversations with 2 calls" in r.output and "did not convert: 1" in r.output
    r = CliRunner().invoke(app, ["data", "convert", str(src), "--from", "xlam", "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "--from 'xlam': one of api-bank, toolrl" in r.output


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared tool-calling training sets (../shared/data/toolcall) are not beside this checkout")
def test_the_real_api_bank_and_toolrl_files_convert(tmp_path):
    a = convert(SHARED / "api_bank_lv3" / "lv3-train.json", "api-bank", tmp_path / "a.jsonl")
    t = convert(SHARED / "toolrl_rlla_sft" / "rlla_sft.json", "toolrl", tmp_path / "t.jsonl")
    assert (a.records, a.written, t.records, t.written) == (1245, 1235, 400, 400)
    assert sum(not isinstance(i, BadRecord) for i in read_records(tmp_path / "t.jsonl", "openai")) == 327
