"""The one record type that flows through data preparation, and its validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result, after the assistant turn that called it


@dataclass
class Record:
    """One training conversation. `source` is "file:line" (or "file:row N") for error messages and lineage."""

    messages: list[dict[str, Any]]
    source: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        row: dict[str, Any] = {"messages": self.messages}
        if self.label is not None:
            row["label"] = self.label
        row["source"] = self.source
        if self.meta:
            row["meta"] = self.meta
        return row

    @classmethod
    def from_json(cls, row: dict) -> "Record":
        return cls(messages=row["messages"], source=row.get("source", ""), label=row.get("label"), meta=row.get("meta", {}))

    @cached_property
    def prompt_key(self) -> str:
        """Normalised user turns (a raw document's text): two records with the same key ask the same thing (leakage, grouping).
        Computed once per record (records are not changed in place: cleaning makes new ones)."""
        text = "\n".join(m["content"] for m in self.messages if m["role"] == "user") or self.answer  # a raw document: its text
        return re.sub(r"\s+", " ", text).strip().lower()

    @cached_property
    def shingle_salt(self) -> int:
        """0 for a record without tools; else a number from its tools' names (minhash.prompt_shingles): near-duplicate
        prompts are compared within one tool set only."""
        names = sorted(t.get("function", {}).get("name", "") for t in (self.meta or {}).get("tools") or [] if isinstance(t, dict))
        if not names:
            return 0
        import hashlib

        return int.from_bytes(hashlib.blake2b("\x00".join(names).encode(), digest_size=8).digest(), "big") | 1

    @property
    def answer(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


@dataclass
class BadRecord:
    """A record that was kept aside, with where it came from and why."""

    file: str
    where: str  # "line 12", "row 7", "item 3"
    reason: str
    raw: Any = None

    @classmethod
    def of(cls, r: "Record", reason: str) -> "BadRecord":
        """A parsed record set aside later (a filter, a duplicate, a leak), placed by its source "file:where"."""
        file, _, where = r.source.rpartition(":")
        return cls(file or r.source, where, reason, r.to_json())

    def to_json(self) -> dict:
        raw = self.raw if isinstance(self.raw, (str, dict, list)) or self.raw is None else repr(self.raw)
        return {"file": self.file, "where": self.where, "reason": self.reason, "raw": raw}

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.reason}"


def validate_messages(messages: Any) -> str | None:
    """Return why a message list cannot be trained on, or None when it is fine."""
    if not isinstance(messages, list) or not messages:
        return "messages: expected a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}]: expected an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"messages[{i}].content: expected a string, got {type(content).__name__}"
        if not content.strip():
            return f"messages[{i}].content: empty {role} turn"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"messages[{i}].weight: must be 0 or 1"
        if role == "system" and i != 0:
            return f"messages[{i}].role: system message only allowed first"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        return "messages: only a system message"
    after = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}
    previous = None
    for i, m in enumerate(turns):
        if m["role"] not in after[previous]:
            offset = len(messages) - len(turns)
            return (f"messages[{i + offset}].role: expected {' or '.join(after[previous])} (turns alternate user/assistant; tool "
                    f"results follow the assistant turn that called), got {m['role']}")
        previous = m["role"]
    if turns[-1]["role"] != "assistant":
        return "messages: last turn must be the assistant's (nothing to learn from)"
    if not any(m.get("weight", 1) for m in turns if m["role"] == "assistant"):
        return "messages: every assistant turn has weight 0 (nothing to learn from)"
    return None
