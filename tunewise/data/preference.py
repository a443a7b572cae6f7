"""Readers of preference data: pairs (DPO, ORPO) and unpaired feedback (KTO).

A pair is a prompt, the answer preferred and the answer rejected.

Each pair becomes one Record: `messages` is the prompt and the chosen answer (so cleaning, dedup, splitting
and leakage work on it as on any conversation), `meta["rejected"]` the rejected answer's text. Three shapes,
each its own data.format:

- `openai-preference`: OpenAI's preference fine-tuning JSONL, {"input": {"messages": [...]},
  "preferred_output": [{"role": "assistant", "content"}], "non_preferred_output": [...]};
- `trl-preference`: TRL's {"prompt", "chosen", "rejected"}, each a string or a list of messages;
- `hh-rlhf`: Anthropic HH-RLHF, {"chosen", "rejected"} full transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")
  whose shared turns are the prompt.

A pair whose chosen equals its rejected, with an empty side, or whose two transcripts differ before the last
answer is quarantined with the reason.

Unpaired feedback (`trl-kto`, TRL's unpaired preference format): {"prompt", "completion", "label"}, the prompt and
completion strings or message lists, the label a boolean (true: a desirable answer, a thumbs-up). The record is the
prompt and the completion, `meta["desirable"]` the label."""

from __future__ import annotations

import re
from pathlib import Path

from .readers import Item, finish, json_reader, reader
from .records import BadRecord, Record

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _pair(path: Path, where: str, prompt: list[dict], chosen: str, rejected: str, obj, system_prompt, meta=None) -> Item:
    """The Record of a pair, or the reason it is set aside."""
    if not isinstance(chosen, str) or not chosen.strip():
        return BadRecord(str(path), where, "chosen: empty answer", obj)
    if not isinstance(rejected, str) or not rejected.strip():
        return BadRecord(str(path), where, "rejected: empty answer", obj)
    if chosen.strip() == rejected.strip():
        return BadRecord(str(path), where, "chosen and rejected are the same answer (nothing to prefer)", obj)
    item = finish(path, where, prompt + [{"role": "assistant", "content": chosen}], None, {**(meta or {}), "rejected": rejected}, obj,
                   system_prompt)
    return item


def _answer(side, name: str) -> tuple[list[dict], str] | str:
    """(messages before the answer, the answer's text) of a side given as a string or a message list; or why not."""
    if isinstance(side, str):
        return [], side
    if isinstance(side, list) and side and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in side):
        if side[-1].get("role") != "assistant":
            return f"{name}: the last message must be the assistant's"
        return [{"role": m["role"], "content": m["content"]} for m in side[:-1]], side[-1]["content"]
    return f"{name}: expected a string or a list of messages with role and content"


def _pair_of_sides(path: Path, where: str, obj: dict, prompt: list[dict], good: str, bad: str, system_prompt) -> Item:
    """The pair from two sides given as strings or message lists: messages before each side's answer must be the
    same (they join the prompt); otherwise, or if a side is malformed, the reason."""
    chosen, rejected = _answer(obj[good], good), _answer(obj[bad], bad)
    for got in (chosen, rejected):
        if isinstance(got, str):
            return BadRecord(str(path), where, got, obj)
    if chosen[0] != rejected[0]:
        return BadRecord(str(path), where, f"{good} and {bad} differ before their last message", obj)
    return _pair(path, where, prompt + chosen[0], chosen[1], rejected[1], obj, system_prompt)


def _prompt(p) -> list[dict] | None:
    """TRL's prompt, a string (one user turn) or a list of messages, as messages; None when it is neither."""
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, list) and all(isinstance(m, dict) for m in p):
        return [{"role": m.get("role"), "content": m.get("content")} for m in p]
    return None


def _missing(path: Path, where: str, obj: dict, keys: tuple[str, ...]) -> BadRecord | None:
    key = next((k for k in keys if k not in obj), None)
    return None if key is None else BadRecord(str(path), where, f"missing field '{key}'", obj)


@reader("openai-preference")
@json_reader
def read_openai_preference(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """OpenAI preference fine-tuning: {"input": {"messages"}, "preferred_output", "non_preferred_output"}."""
    missing = _missing(path, where, obj, ("input", "preferred_output", "non_preferred_output"))
    if missing:
        return missing
    msgs = obj["input"].get("messages") if isinstance(obj["input"], dict) else None
    if not isinstance(msgs, list):
        return BadRecord(str(path), where, "input.messages: expected a list of messages", obj)
    prompt = [{k: v for k, v in m.items() if k in ("role", "content")} if isinstance(m, dict) else m for m in msgs]
    return _pair_of_sides(path, where, obj, prompt, "preferred_output", "non_preferred_output", system_prompt)


@reader("trl-preference")
@json_reader
def read_trl_preference(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """TRL: {"prompt", "chosen", "rejected"}, strings or message lists (conversational)."""
    missing = _missing(path, where, obj, ("prompt", "chosen", "rejected"))
    if missing:
        return missing
    prompt = _prompt(obj["prompt"])
    if prompt is None:
        return BadRecord(str(path), where, "prompt: expected a string or a list of messages", obj)
    return _pair_of_sides(path, where, obj, prompt, "chosen", "rejected", system_prompt)


def _hh_turns(text: str) -> list[dict] | None:
    """An HH-RLHF transcript as messages (None if it does not start with a Human turn)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]


@reader("hh-rlhf")
@json_reader
def read_hh_rlhf(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """Anthropic HH-RLHF: {"chosen", "rejected"} transcripts sharing every turn but the last Assistant one."""
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            return BadRecord(str(path), where, f"missing field '{key}' (a transcript string)", obj)
    chosen, rejected = _hh_turns(obj["chosen"]), _hh_turns(obj["rejected"])
    if not chosen or not rejected:
        return BadRecord(str(path), where, "not an HH-RLHF transcript (\\n\\nHuman: ... \\n\\nAssistant: ...)", obj)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return BadRecord(str(path), where, "the transcript does not end with an Assistant turn", obj)
    if chosen[:-1] != rejected[:-1]:
        return BadRecord(str(path), where, "chosen and rejected differ before the last Assistant turn", obj)
    return _pair(path, where, chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], obj, system_prompt)


@reader("trl-kto")
@json_reader
def read_trl_kto(path: Path, where: str, obj: dict, system_prompt: str | None) -> Item:
    """TRL unpaired preference (KTO): {"prompt", "completion", "label": true|false}."""
    missing = _missing(path, where, obj, ("prompt", "completion", "label"))
    if missing:
        return missing
    if not isinstance(obj["label"], bool):
        return BadRecord(str(path), where, f"label: expected true or false, got {obj['label']!r}", obj)
    prompt = _prompt(obj["prompt"])
    if prompt is None:
        return BadRecord(str(path), where, "prompt: expected a string or a list of messages", obj)
    got = _answer(obj["completion"], "completion")
    if isinstance(got, str):
        return BadRecord(str(path), where, got, obj)
    if not got[1].strip():
        return BadRecord(str(path), where, "completion: empty answer", obj)
    return finish(path, where, prompt + got[0] + [{"role": "assistant", "content": got[1]}], None, {"desirable": obj["label"]}, obj,
                   system_prompt)


def is_unpaired(r: Record) -> bool:
    return isinstance(r.meta, dict) and isinstance(r.meta.get("desirable"), bool)


def rejected_messages(r: Record) -> list[dict]:
    """The pair's rejected conversation: the prompt and the rejected answer."""
    return r.messages[:-1] + [{"role": "assistant", "content": r.meta["rejected"]}]


def is_pair(r: Record) -> bool:
    return isinstance(r.meta, dict) and isinstance(r.meta.get("rejected"), str)


PREFERENCE_FORMATS = ("openai-preference", "trl-preference", "hh-rlhf")
