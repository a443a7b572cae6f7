"""Structured output a request asks for: a closed answer set (decoded through the label trie) or a grammar
(decoded through xgrammar: engine.Grammar).

The shapes clients send:
- vLLM: `structured_outputs: {"choice": [...]}` and its older `guided_choice: [...]`;
- OpenAI: `response_format: {"type": "json_schema", "json_schema": {"schema": ...}}` where the schema
  has finitely many values: a string/number/boolean `enum` or `const`, a `boolean`, or an object whose
  properties are all such (all required, no extra properties). The answer is then the JSON text of one
  of those values (`"card_arrival"`, `{"intent": "card_arrival"}`), exactly as json.dumps writes it.

Everything else goes to a grammar: a JSON schema with free-form values (`response_format` json_schema,
`structured_outputs.json`, `guided_json`), any JSON (`response_format: {"type": "json_object"}`), a regex
(`structured_outputs.regex`, `guided_regex`) or an EBNF grammar (`structured_outputs.grammar`, `guided_grammar`).
A constraint that is malformed or cannot be compiled is a 400 that names the field, never silently ignored.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..engine import MAX_CHOICES, ChoiceError, check_choices

Constraint = tuple[str, Any]  # ("choices", [answers]) or ("json" | "json_schema" | "regex" | "ebnf", source)
SO_KEYS = {"choice": "choices", "json": "json_schema", "regex": "regex", "grammar": "ebnf"}
GUIDED_KEYS = {"guided_choice": "choices", "guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "ebnf"}


def request_constraint(extra: dict[str, Any]) -> tuple[str, Constraint] | None:
    """(the field it came from, the constraint) a request restricts decoding to; None: free decoding. A JSON schema
    with finitely many values becomes a choice list (the trie is exact and faster). Raises ChoiceError naming the field."""
    found: list[tuple[str, Constraint]] = []
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ChoiceError("structured_outputs: expected an object such as {\"choice\": [...]} or {\"json\": {schema}}")
        for key, value in so.items():
            if value in (None, False):
                continue
            if key not in SO_KEYS:
                raise ChoiceError(f"structured_outputs.{key}: not supported by this server (choice, json, regex, grammar)")
            found.append((f"structured_outputs.{key}", _constraint(SO_KEYS[key], value, f"structured_outputs.{key}")))
    for key, kind in GUIDED_KEYS.items():
        if extra.get(key) is not None:
            found.append((key, _constraint(kind, extra[key], key)))
    rf = extra.get("response_format")
    if rf is not None:
        c = _response_format(rf)
        if c is not None:
            found.append(("response_format", c))
    if len(found) > 1:
        raise ChoiceError(f"{found[0][0]} and {found[1][0]}: give one constraint per request")
    return found[0] if found else None


def request_choices(extra: dict[str, Any]) -> list[str] | None:
    """The closed answer set a request asks for (None: free decoding or a grammar)."""
    got = request_constraint(extra)
    return got[1][1] if got and got[1][0] == "choices" else None


def _constraint(kind: str, value: Any, where: str) -> Constraint:
    if kind == "choices":
        return ("choices", check_choices(value, where))
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ChoiceError(f"{where}: not valid JSON") from None
        if not isinstance(value, dict):
            raise ChoiceError(f"{where}: expected a JSON schema object")
        return _schema(value, where)
    if not isinstance(value, str) or not value.strip():
        raise ChoiceError(f"{where}: expected a non-empty string ({'a regular expression' if kind == 'regex' else 'an EBNF grammar'})")
    return (kind, value)


def _schema(schema: dict, where: str) -> Constraint:
    """Finitely many values: a choice list; otherwise the schema as a grammar."""
    try:
        values = _values(schema, where)
    except ChoiceError:
        return ("json_schema", json.dumps(schema))
    return ("choices", check_choices([json.dumps(v, ensure_ascii=False) for v in values], where))


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict) or "type" not in rf:
        raise ChoiceError("response_format: expected an object with a type (text, json_object or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json", "")
    if kind != "json_schema":
        raise ChoiceError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ChoiceError("response_format.json_schema.schema: expected a JSON schema object")
    return _schema(spec["schema"], "response_format.json_schema.schema")


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
