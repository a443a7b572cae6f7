"""Every reader on good and bad input: bad records are reported with file, line and field, and nothing is lost."""

import json

import pytest

from tunewise.config import ColumnMap
from tunewise.data.formats import FormatError, read_records
from tunewise.data.records import BadRecord, Record


def run(path, fmt, **kw):
    items = list(read_records(path, fmt, **kw))
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, BadRecord)]


def test_openai_jsonl_good_and_bad(tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        '{"messages": [{"role": "user", "content": "broken"',
        {"prompt": "no messages"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "label": "x"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "late"}]},
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    good, bad = run(p, "openai")
    assert len(good) + len(bad) == len(lines)
    assert [r.source for r in good] == ["chat.jsonl:line 1", "chat.jsonl:line 6"]
    assert good[1].label == "x" and good[1].messages[1]["weight"] == 0
    reasons = {b.where: b.reason for b in bad}
    assert reasons["line 2"].startswith("malformed JSON")
    assert reasons["line 3"] == "missing field 'messages'"
    assert reasons["line 4"] == "messages[1].content: empty assistant turn"
    assert "messages[0].role: expected user" in reasons["line 5"]
    assert "last turn must be the assistant's" in reasons["line 7"]
    assert "system message only allowed first" in reasons["line 8"]
    assert all(b.file == str(p) for b in bad)


def test_alpaca_array_and_jsonl(tmp_path):
    arr = [
        {"instruction": "Translate", "input": "hello", "output": "bonjour"},
        {"instruction": "Say hi", "output": "hi", "system": "Be brief."},
        {"instruction": "No output"},
        {"instruction": "x", "output": ""},
    ]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(arr))
    good, bad = run(p, "alpaca")
    assert good[0].messages == [{"role": "user", "content": "Translate\n\nhello"}, {"role": "assistant", "content": "bonjour"}]
    assert good[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert [(b.where, b.reason) for b in bad] == [("item 2", "missing field 'output'"), ("item 3", "messages[1].content: empty assistant turn")]
    q = tmp_path / "a.jsonl"
    q.write_text("\n".join(json.dumps(x) for x in arr))
    good2, bad2 = run(q, "alpaca")
    assert len(good2) == 2 and [b.where for b in bad2] == ["line 3", "line 4"]


def test_sharegpt(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
        {"conversations": "not a list"},
        {"system": "sys", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in rows))
    good, bad = run(p, "sharegpt")
    assert [m["role"] for m in good[0].messages] == ["system", "user", "assistant"]
    assert good[1].messages[0] == {"role": "system", "content": "sys"}
    assert "conversations[1].from: 'robot'" in bad[0].reason and bad[0].where == "line 2"
    assert bad[1].reason == "missing field 'conversations' (a list)"


def test_csv_column_mapping_line_numbers_and_bad_rows(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,category\nhello,greet\n"multi\nline",lab\n,empty_user\nno label,\ntoo,many,cells\n')
    cols = ColumnMap(user="text", assistant="category", label="category")
    good, bad = run(p, "csv", columns=cols, system_prompt="Classify.")
    assert [r.source for r in good] == ["d.csv:line 2", "d.csv:line 3"]
    assert good[1].messages == [{"role": "system", "content": "Classify."}, {"role": "user", "content": "multi\nline"}, {"role": "assistant", "content": "lab"}]
    assert good[0].label == "greet"
    assert [(b.where, b.reason) for b in bad] == [
        ("line 5", "column 'text': empty user text"),
        ("line 6", "column 'category': empty assistant text"),
        ("line 7", "3 cells but the header has 2"),
    ]


def test_csv_wrong_columns_fail_whole_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question,answer\nq,a\n")
    with pytest.raises(FormatError, match=r"column\(s\) \['text'\] not found; the file has \['question', 'answer'\]"):
        run(p, "csv", columns=ColumnMap(user="text", assistant="answer"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a", None, "c"], "a": ["x", "y", "z"]}), p)
    good, bad = run(p, "parquet", columns=ColumnMap(user="q", assistant="a"))
    assert [r.source for r in good] == ["d.parquet:row 0", "d.parquet:row 2"]
    assert bad[0].where == "row 1" and "empty user text" in bad[0].reason


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FormatError, match="unknown format"):
        read_records(tmp_path, "xml")
    with pytest.raises(FormatError, match="file not found"):
        read_records(tmp_path / "nope.jsonl", "openai")


def test_json_readers_reject_non_objects(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('[1, 2]\n"text"\n')
    for fmt in ("openai", "alpaca", "sharegpt"):
        good, bad = run(p, fmt)
        assert not good and [(b.where, b.reason) for b in bad] == [("line 1", "expected a JSON object, got list"), ("line 2", "expected a JSON object, got str")]


def test_non_utf8_line_is_quarantined_not_mangled(tmp_path):
    p = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "ok"}]}).encode()
    p.write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    recs, bad = run(p, "openai")
    assert len(recs) == 2 and recs[0].messages[0]["content"] == "café"
    assert [(b.where, b.reason) for b in bad] == [("line 2", "not valid UTF-8 (byte 17)")]


def test_non_utf8_csv_row_is_quarantined(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,category\nhello,greet\ncaf\xe9 au lait,order\nbye,farewell\n")
    good, bad = run(p, "csv", columns=ColumnMap(user="text", assistant="category"))
    assert [r.source for r in good] == ["d.csv:line 2", "d.csv:line 4"]
    assert [(b.where, b.reason) for b in bad] == [("line 3", "column 'text': not valid UTF-8")]
    assert bad[0].raw["text"] == "caf\\xe9 au lait"
