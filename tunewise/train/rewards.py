"""Reward functions for GRPO (`training.grpo.rewards`): built-ins by name, or a user's `module:function`.

Every function takes (completion: str, record: Record, **args) and returns a float; `args` come from the
config entry. The built-ins:

- `exact_label`: 1 when the completion is the record's label (or its answer when it has none) as the accuracy
  metric compares them (case, surrounding punctuation, spaces/underscores), and nothing else (one line), else 0;
- `exact_match`: 1 when the normalised completion (case, punctuation, articles, spaces: SQuAD's rule) equals
  the normalised reference answer or any of `meta["answers"]`, else 0;
- `regex`: 1 when `pattern` is found in the completion (`full: true`: the whole completion matches), else 0;
- `json_valid`: 1 when the completion parses as JSON (`object: true`: a JSON object), else 0;
- `length_penalty`: 0 up to `max_words` words (default 50), then falling linearly to -1 at twice that;
- `tool_calls`: the completion's calls (tunewise's `<tool_call>` text form) against the reference answer's: the mean of
  exact (the same calls, parallel ones in any order; no call where the reference makes none) and the F1 over (function,
  argument, value) triples, so a call with the right function and some right values earns part; 0 when a call names a
  function that is not among the record's tools or breaks its schema.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Callable

from ..errors import TunewiseError
from ..metrics import normalize_answer, normalize_label

Reward = Callable[..., float]


class RewardError(TunewiseError, ValueError):
    pass


def exact_label(completion: str, record, **_) -> float:
    want = record.label if record.label is not None else record.answer
    return float("\n" not in completion.strip() and normalize_label(completion) == normalize_label(str(want)))


def exact_match(completion: str, record, **_) -> float:
    refs = [record.answer] + list((record.meta or {}).get("answers") or [])
    got = normalize_answer(completion)
    return float(any(got == normalize_answer(str(r)) for r in refs))


def regex(completion: str, record, pattern: str = "", full: bool = False, **_) -> float:
    if not pattern:
        raise RewardError("regex reward: give a pattern (training.grpo.rewards: {name: regex, pattern: ...})")
    return float(bool((re.fullmatch if full else re.search)(pattern, completion.strip() if full else completion)))


def json_valid(completion: str, record, object: bool = False, **_) -> float:  # noqa: A002 - the config's word
    try:
        value = json.loads(completion)
    except ValueError:
        return 0.0
    return float(isinstance(value, dict) or not object)


def length_penalty(completion: str, record, max_words: int = 50, **_) -> float:
    over = len(completion.split()) - max_words
    return -min(1.0, over / max_words) if over > 0 else 0.0


def tool_calls(completion: str, record, **_) -> float:
    from ..data.tools import ToolError, check_call
    from ..metrics import parse_calls, tool_args_f1, tool_calls_exact

    tools = (record.meta or {}).get("tools") or []
    for c in parse_calls(completion):
        try:
            check_call(c["name"], c["arguments"], tools, "call")
        except (ToolError, TypeError):
            return 0.0
    return (tool_calls_exact([completion], [record.answer])[0] + tool_args_f1([completion], [record.answer])[0]) / 2


BUILT_IN: dict[str, Reward] = {f.__name__: f for f in (exact_label, exact_match, regex, json_valid, length_penalty, tool_calls)}


def resolve(name: str, where: str = "training.grpo.rewards") -> Reward:
    """The reward function a config names: a built-in or `module:function` (importable from the project)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise RewardError(f"{where}: unknown reward {name!r}; one of {', '.join(BUILT_IN)}, or module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"{where}: cannot load {name!r}: {e}") from None
    if not callable(fn):
        raise RewardError(f"{where}: {name!r} is not a function")
    return fn


class Rewards:
    """The configured rewards, weighted and summed; `parts` keeps each one's mean of the last call. An entry named
    `grader` is an OpenAI grader definition (args: file, or grader inline), the same one `evaluation.graders` scores with."""

    def __init__(self, entries, cfg=None):
        self.entries = []
        for i, e in enumerate(entries):
            where = f"training.grpo.rewards[{i}]"
            if e.name == "grader":
                from ..eval.graders import grader_reward

                fn = grader_reward(cfg, dict(e.args), where)
                self.entries.append((fn.grader.name, fn, e.weight, {}))
            else:
                self.entries.append((e.name, resolve(e.name, where), e.weight, dict(e.args)))
        self.parts: dict[str, float] = {}

    def __call__(self, completions: list[str], records: list) -> list[float]:
        total = [0.0] * len(completions)
        for name, fn, weight, args in self.entries:
            if hasattr(fn, "batch"):  # a grader scores a batch at once (a python grader's process serves them all)
                got = [float(x) for x in fn.batch(completions, records)]
            else:
                got = [float(fn(c, r, **args)) for c, r in zip(completions, records)]
            self.parts[name] = sum(got) / max(len(got), 1)
            total = [t + weight * g for t, g in zip(total, got)]
        return total
