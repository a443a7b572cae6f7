"""The readers' registry and what every reader shares: reading JSONL or a JSON array one object at a time, turning
parsed messages into a Record or a BadRecord. formats.py, preference.py and text.py register their readers here, so
none of them imports another (formats.read_records loads the other two for their registrations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from ..errors import TunewiseError
from .records import BadRecord, Record, validate_messages


class FormatError(TunewiseError, ValueError):
    pass


Item = Record | BadRecord
READERS: dict[str, Callable[..., Iterator[Item]]] = {}


def reader(name: str):
    def register(fn):
        READERS[name] = fn
        return fn

    return register


def json_items(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, parsed object | BadRecord) from JSONL, or from a JSON array file (.json starting with '[')."""
    head = ""
    if path.suffix.lower() != ".jsonl":  # .jsonl is line-delimited, whatever its first line holds
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        for i, obj in enumerate(items):
            yield f"item {i}", obj
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # never guess an encoding: the record is kept aside as it was
                yield where, BadRecord(str(path), where, f"not valid UTF-8 (byte {e.start})", raw.decode("utf-8", "backslashreplace")[:2000])
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecord(str(path), where, f"malformed JSON: {e.msg} (column {e.colno})", line.rstrip("\n")[:2000])


def finish(path: Path, where: str, messages, label, meta, raw, system_prompt: str | None) -> Item:
    if system_prompt and isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    why = validate_messages(messages)
    if why:
        return BadRecord(str(path), where, why, raw)
    return Record(messages=messages, source=f"{path.name}:{where}", label=label, meta=meta)


def json_reader(parse: Callable[[Path, str, dict, str | None], Item]):
    """Turn a per-object parser into a streaming reader of JSONL or a JSON array (the loop is shared)."""

    def read(path: Path, system_prompt: str | None = None, **_) -> Iterator[Item]:
        for where, obj in json_items(path):
            if isinstance(obj, BadRecord):
                yield obj
            elif not isinstance(obj, dict):
                yield BadRecord(str(path), where, f"expected a JSON object, got {type(obj).__name__}", obj)
            else:
                yield parse(path, where, obj, system_prompt)

    read.__doc__ = parse.__doc__
    return read
