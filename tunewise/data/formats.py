"""Readers: one function per input format, each yielding Record or BadRecord, streaming.

Formats are named explicitly in the config; nothing is guessed. A reader never raises on a bad record:
it yields a BadRecord naming the file, the line (or row) and the field, and goes on. It raises
FormatError only when the whole file is unusable (missing, wrong column names).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

from .readers import READERS, FormatError, Item, finish, json_reader, reader
from .records import BadRecord, Record
from .tools import ToolError, has_tool_use, normalize_openai, normalize_sharegpt, render_text

_SURROGATES = re.compile("[\udc80-\udcff]")


@reader("openai")
@json_reader
def read_openai(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """OpenAI fine-tuning chat JSONL: {"messages": [{"role", "content", "weight"?}], ...}."""
    if "messages" not in obj:
        return BadRecord(str(path), where, "missing field 'messages'", obj)
    messages = obj["messages"]
    meta = {k: v for k, v in obj.items() if k not in ("messages", "label", "tools", "functions", "parallel_tool_calls")}
    if isinstance(messages, list) and has_tool_use(obj):  # tools and calls checked, then rendered as text (data/tools.py)
        try:
            messages, meta["tools"] = normalize_openai(obj)
        except ToolError as e:
            return BadRecord(str(path), where, str(e), obj)
        messages = render_text(messages, meta["tools"])
    elif isinstance(messages, list):  # keep only the keys we understand
        messages = [{k: v for k, v in m.items() if k in ("role", "content", "weight", "reasoning_content")} if isinstance(m, dict) else m
                    for m in messages]
    label = obj.get("label")
    return finish(path, where, messages, None if label is None else str(label), meta, obj, system_prompt)


@reader("openai-rft")
@json_reader
def read_openai_rft(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """OpenAI reinforcement fine-tuning JSONL: {"messages": [... ending with the user's turn], "reference_answer"?, any fields
    the grader reads}. The record's answer (what SFT-style views and exact rewards see) is reference_answer (as JSON when it
    is not a string), else the extra fields as JSON; every extra field is the grader's {{item.X}}."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return BadRecord(str(path), where, "missing field 'messages' (a non-empty list)", obj)
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        return BadRecord(str(path), where, f"messages[{len(messages) - 1}].role: the last turn of a reinforcement prompt is the user's", obj)
    meta = {k: v for k, v in obj.items() if k not in ("messages", "label")}
    ref = meta.get("reference_answer", meta)
    answer = ref if isinstance(ref, str) and ref.strip() else json.dumps(ref, sort_keys=True)
    messages = [{k: v for k, v in m.items() if k in ("role", "content")} if isinstance(m, dict) else m for m in messages]
    label = obj.get("label")
    return finish(path, where, messages + [{"role": "assistant", "content": answer}], None if label is None else str(label), meta, obj,
                   system_prompt)


@reader("alpaca")
@json_reader
def read_alpaca(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """Alpaca: {"instruction", "input"?, "output", "system"?}, as a JSON array or JSONL."""
    missing = [k for k in ("instruction", "output") if k not in obj]
    if missing:
        return BadRecord(str(path), where, f"missing field '{missing[0]}'", obj)
    if not all(isinstance(obj.get(k, ""), str) for k in ("instruction", "input", "output", "system")):
        return BadRecord(str(path), where, "instruction/input/output/system must be strings", obj)
    user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input", "").strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    if obj.get("system", "").strip():
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return finish(path, where, messages, None, {}, obj, system_prompt)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "function_call", "observation": "observation", "tool": "observation"}


@reader("sharegpt")
@json_reader
def read_sharegpt(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """ShareGPT: {"conversations": [{"from": human|gpt|system, "value"}], "system"?}."""
    if not isinstance(obj.get("conversations"), list):
        return BadRecord(str(path), where, "missing field 'conversations' (a list)", obj)
    messages = []
    for i, turn in enumerate(obj["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return BadRecord(str(path), where, f"conversations[{i}]: expected an object with 'from' and 'value'", obj)
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            return BadRecord(str(path), where, f"conversations[{i}].from: {turn['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}", obj)
        messages.append({"role": role, "content": turn["value"]})
    if isinstance(obj.get("system"), str) and obj["system"].strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": obj["system"]})
    meta = {}
    if obj.get("tools") or any(m["role"] in ("function_call", "observation") for m in messages):  # glaive / LLaMA-Factory tool use
        try:
            tool_msgs, meta["tools"] = normalize_sharegpt([{"from": m["role"], "value": m["content"]} if m["role"] in ("function_call", "observation")
                                                          else m for m in messages], obj.get("tools"))
        except ToolError as e:
            return BadRecord(str(path), where, str(e), obj)
        messages = render_text(tool_msgs, meta["tools"])
    return finish(path, where, messages, None, meta, obj, system_prompt)


def _row_record(path: Path, where: str, row: dict, columns, system_prompt: str | None) -> Item:
    def cell(name):
        v = row.get(name)
        if v is None or (isinstance(v, float) and v != v):  # None or NaN
            return ""
        return str(v)

    user, assistant = cell(columns.user), cell(columns.assistant)
    if not user.strip():
        return BadRecord(str(path), where, f"column '{columns.user}': empty user text", row)
    if not assistant.strip():
        return BadRecord(str(path), where, f"column '{columns.assistant}': empty assistant text", row)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if columns.system and cell(columns.system).strip():
        messages.insert(0, {"role": "system", "content": cell(columns.system)})
    label = cell(columns.label) if columns.label else None
    return finish(path, where, messages, label or None, {}, row, system_prompt)


def _check_columns(path: Path, header: list[str], columns) -> None:
    wanted = [c for c in (columns.user, columns.assistant, columns.system, columns.label) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise FormatError(f"{path}: column(s) {missing} not found; the file has {header} (set data.columns)")


@reader("csv")
def read_csv(path: Path, columns=None, system_prompt: str | None = None, **_) -> Iterator[Item]:
    """CSV with a header; data.columns maps columns to user/assistant/system/label."""
    # surrogateescape keeps undecodable bytes visible, so a row holding them is quarantined, not altered
    with open(path, encoding="utf-8", newline="", errors="surrogateescape") as f:
        rows = csv.DictReader(f)
        _check_columns(path, rows.fieldnames or [], columns)
        start = 2
        for row in rows:
            where = f"line {start}"
            start = rows.line_num + 1
            if None in row:  # more cells than header columns
                yield BadRecord(str(path), where, f"{len(row) - 1 + len(row[None])} cells but the header has {len(row) - 1}", row)
                continue
            if any(v is None for v in row.values()):
                yield BadRecord(str(path), where, "fewer cells than the header", row)
                continue
            broken = next((k for k, v in row.items() if _SURROGATES.search(v)), None)
            if broken is not None:
                safe = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for k, v in row.items()}
                yield BadRecord(str(path), where, f"column '{broken}': not valid UTF-8", safe)
                continue
            yield _row_record(path, where, row, columns, system_prompt)


@reader("parquet")
def read_parquet(path: Path, columns=None, system_prompt: str | None = None, **_) -> Iterator[Item]:
    """Parquet, read in batches; data.columns maps columns to user/assistant/system/label."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise FormatError(f"{path}: not a readable Parquet file: {e}") from None
    _check_columns(path, pf.schema_arrow.names, columns)
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield _row_record(path, f"row {n}", row, columns, system_prompt)
            n += 1


def read_records(path: Path, fmt: str, columns=None, system_prompt: str | None = None, reasoning: str = "keep") -> Iterator[Item]:
    """The records of a file in a format, each assistant turn's reasoning kept inline or dropped (data/reasoning.py)."""
    from . import preference, text  # noqa: F401 - register the preference and raw-text readers
    if fmt not in READERS:
        raise FormatError(f"unknown format {fmt!r}; one of {', '.join(READERS)}")
    if not (Path(path).is_file() or (fmt == "text" and Path(path).is_dir())):
        raise FormatError(f"{path}: file not found")
    return _with_reasoning(READERS[fmt](Path(path), columns=columns, system_prompt=system_prompt), reasoning)


def _with_reasoning(items: Iterator[Item], mode: str) -> Iterator[Item]:
    """Each record's reasoning inline or dropped; a record whose reasoning_content is not text is set aside, named."""
    from .reasoning import apply

    for item in items:
        if isinstance(item, Record):
            bad = next((i for i, m in enumerate(item.messages) if m.get("reasoning_content") is not None
                        and not isinstance(m["reasoning_content"], str)), None)
            if bad is not None:
                item = BadRecord.of(item, f"messages[{bad}].reasoning_content: expected a string, "
                                          f"got {type(item.messages[bad]['reasoning_content']).__name__}")
            else:
                item.messages = apply(item.messages, mode)
        yield item
