"""Structured output a request asks for, as the closed answer set the engine decodes into.

The shapes clients send:
- vLLM: `structured_outputs: {"choice": [...]}` and its older `guided_choice: [...]`;
- OpenAI: `response_format: {"type": "json_schema", "json_schema": {"schema": ...}}` where the schema
  has finitely many values: a string/number/boolean `enum` or `const`, a `boolean`, or an object whose
  properties are all such (all required, no extra properties). The answer is then the JSON text of one
  of those values (`"card_arrival"`, `{"intent": "card_arrival"}`), exactly as json.dumps writes it.

What cannot be enforced this way (free-form strings, numbers, arrays, regexes, grammars, json_object
mode) is a 400 that names the field, never silently ignored.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..engine import MAX_CHOICES, ChoiceError, check_choices

def request_choices(extra: dict[str, Any]) -> list[str] | None:
    """The answers a request restricts decoding to (None: free decoding). Raises ChoiceError naming the field."""
    found: list[tuple[str, list[str]]] = []
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ChoiceError("structured_outputs: expected an object such as {\"choice\": [...]}")
        for key in so:
            if key != "choice" and so[key] not in (None, False):
                raise ChoiceError(f"structured_outputs.{key}: not supported by this server (only structured_outputs.choice)")
        if so.get("choice") is not None:
            found.append(("structured_outputs.choice", check_choices(so["choice"], "structured_outputs.choice")))
    for key in ("guided_json", "guided_regex", "guided_grammar", "guided_decoding_backend"):
        if extra.get(key) is not None:
            raise ChoiceError(f"{key}: not supported by this server (only guided_choice and structured_outputs.choice)")
    if extra.get("guided_choice") is not None:
        found.append(("guided_choice", check_choices(extra["guided_choice"], "guided_choice")))
    rf = extra.get("response_format")
    if rf is not None:
        choices = _response_format(rf)
        if choices is not None:
            found.append(("response_format", choices))
    if len(found) > 1:
        raise ChoiceError(f"{found[0][0]} and {found[1][0]}: give one constraint per request")
    return found[0][1] if found else None


def _response_format(rf: Any) -> list[str] | None:
    if not isinstance(rf, dict) or "type" not in rf:
        raise ChoiceError("response_format: expected an object with a type (text or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        raise ChoiceError("response_format.type: json_object cannot be enforced by this server; send a json_schema "
                          "with an enum (or use structured_outputs.choice)")
    if kind != "json_schema":
        raise ChoiceError(f"response_format.type: {kind!r} is not one of text, json_schema")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ChoiceError("response_format.json_schema.schema: expected a JSON schema object")
    values = _values(spec["schema"], "response_format.json_schema.schema")
    return check_choices([json.dumps(v, ensure_ascii=False) for v in values], "response_format.json_schema.schema")


def _values(schema: dict, where: str) -> list:
    """Every value the schema allows, when there are finitely many (at most MAX_CHOICES)."""
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ChoiceError(f"{where}.enum: expected a non-empty list")
        bad = [v for v in values if isinstance(v, (dict, list)) or v is None]
        if bad:
            raise ChoiceError(f"{where}.enum: only string, number and boolean values can be enforced (got {bad[0]!r})")
        return list(values)
    kind = schema.get("type")
    if kind == "boolean":
        return [True, False]
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            raise ChoiceError(f"{where}.properties: an object schema needs properties with enum or const values")
        required = schema.get("required", [])
        missing = [k for k in props if k not in required]
        if missing:
            raise ChoiceError(f"{where}.required: optional properties cannot be enforced; list {missing[0]!r} in required")
        per = [(k, _values(v if isinstance(v, dict) else {}, f"{where}.properties.{k}")) for k, v in props.items()]
        total = 1
        for _, vals in per:
            total *= len(vals)
        if total > MAX_CHOICES:
            raise ChoiceError(f"{where}: {total} possible objects; at most {MAX_CHOICES} can be enforced")
        return [dict(zip([k for k, _ in per], combo)) for combo in itertools.product(*[vals for _, vals in per])]
    raise ChoiceError(f"{where}: type {kind!r} without enum or const cannot be enforced by this server "
                      "(only finite schemas: enum, const, boolean, objects of those)")
