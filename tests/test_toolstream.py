"""Tool calls streamed as they decode (serve/toolstream.py): fed an answer one character at a time, CallStream sends
OpenAI's deltas (the call's id and name once the name is written, then its arguments piece by piece), and what they
join to equals the finished message ToolRequest.shape builds from the whole answer: content, names, arguments as the
model wrote them, the call cut off by max_tokens included."""

import json

import pytest

from tunewise.serve.toolstream import CallStream, calls_of, read_block, split_answer


def _call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _joined(deltas):
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for t in d.get("tool_calls", []):
            if "id" in t:
                assert t["index"] not in calls and t["function"]["arguments"] == ""
                calls[t["index"]] = [t["id"], t["function"]["name"], ""]
            else:
                calls[t["index"]][2] += t["function"]["arguments"]
    return content, calls


ANSWERS = {
    "one call": _call("get_weather", {"city": "Paris"}),
    "text, then two calls": "Let me check both.\n" + _call("get_weather", {"city": "Oslo", "opts": {"unit": "c"}}) + "\n" + _call("freeze_card", {"card": 4}),
    "braces inside a string": _call("search", {"q": "a}b {c} }", "n": [1, {"k": "}"}]}),
    "text only": "I cannot do that <toolbox> here.",
    "cut off in the arguments": _call("get_weather", {"city": "Paris", "unit": "c"})[:-25],
    "cut off in the name": "<tool_call>\n{\"name\": \"get_wea",
}


@pytest.mark.parametrize("case", ANSWERS)
def test_streaming_an_answer_a_character_at_a_time_joins_to_the_finished_message(case):
    text = ANSWERS[case]
    stream, deltas, sent_before = CallStream(), [], []
    for i in range(1, len(text) + 1):
        deltas += stream.feed(text[:i])
        sent_before.append(len(deltas))
    calls, content, cut = calls_of(text, lambda name, args: True)
    message = {"role": "assistant", "content": content, "tool_calls": calls} if calls else {"role": "assistant", "content": text}
    deltas += stream.finish(message)
    got_content, got_calls = _joined(deltas)
    assert got_content == (message["content"] or "")
    assert [(n, a) for _, n, a in got_calls.values()] == [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    assert [i for i, _, _ in got_calls.values()] == [c["id"] for c in message.get("tool_calls", [])]  # the message carries the ids sent
    if case == "text, then two calls":
        assert content == "Let me check both." and cut is None and json.loads(calls[1]["function"]["arguments"]) == {"card": 4}
        pieces = sum(1 for d in deltas for t in d.get("tool_calls", []) if "id" not in t)
        assert pieces > 10  # the arguments arrived as they were written, not whole at the end
        assert stream.calls[0][1] == calls[0]["function"]["arguments"]  # sent in full before the end
    if case == "cut off in the arguments":
        assert cut == 0 and calls[0]["function"]["arguments"] == '{"city": "Paris", "'
    if case == "cut off in the name":
        assert not calls and got_content == text


def test_the_closing_brace_is_held_until_what_follows_it_is_known():
    body = '\n{"name": "f", "arguments": {"a": {"b": 1}'
    assert read_block(body, False) == ("f", '{"a": {"b": 1')  # this } may close the call: held
    assert read_block(body + ', "c": 2', False) == ("f", '{"a": {"b": 1}, "c": 2')
    assert read_block(body + "}\n</tool", False) == ("f", '{"a": {"b": 1}')
    assert read_block(body + "}}\n", True) == ("f", '{"a": {"b": 1}}')
    assert read_block(body + "}\n", True) == (None, None)  # closed with its arguments unfinished: not a call
    assert read_block('{"arguments": {}, "name": "f"}', True) == ("f", "{}")  # another key order: read as JSON
    assert read_block("{not json}", True) == (None, None)


def test_a_tail_that_may_open_a_call_waits():
    assert split_answer("Hi <tool_c", partial=True) == [("text", "Hi ", True)]
    assert split_answer("Hi <tool_c") == [("text", "Hi <tool_c", True)]
    assert split_answer("a<tool_call>x</tool_call>b<tool_call>y") == [("text", "a", True), ("call", "x", True), ("text", "b", True), ("call", "y", False)]


def test_a_block_that_is_not_a_valid_call_stays_in_the_text():
    text = "See: <tool_call>{oops}</tool_call> " + _call("f", {"x": 1})
    calls, content, _ = calls_of(text, lambda name, args: True)
    assert [c["function"]["name"] for c in calls] == ["f"] and content == "See: <tool_call>{oops}</tool_call>"
    calls, content, _ = calls_of(text, lambda name, args: name != "f")
    assert not calls
