"""`tunewise data convert`: tool-use datasets whose calls are written in their own text forms, to OpenAI chat JSONL with
`tools` and `tool_calls` (what `data.format: openai` reads, every call then checked against its schema).

- **api-bank** (API-Bank, Li et al. 2023; Alpaca JSON): the tools are the `{"apiCode": ...}` descriptions in `input`
  and every tool a `ToolSearcher` result describes (`->{'name': ..., 'input_parameters': ...}`); each earlier
  `API-Request: [Name(key='value')]->result` becomes an assistant call and its `tool` result; `output` is the last
  turn: an `API-Request: [...]` call, or an `AI: ...` reply. Parameters are typed by their API-Bank type (str, int,
  float, bool, list, dict; datetime and others as strings); none is marked required, as API-Bank does not say which are.
- **toolrl** (ToolRL's SFT split, Qian et al. 2025; Alpaca JSON): the tools are the numbered `Name:` / `Description:` /
  `Parameters:` entries of `instruction`; `input`'s `<user>`, `<tool_call>`, `<obs>` and `<response>` blocks are the
  history; `output` is `<think>...</think>`, then `<tool_call>` (one `{"name", "parameters"}` JSON per line, parallel
  calls) and/or `<response>...</response>`. The think block becomes `reasoning_content` (`data.reasoning` keeps or
  drops it). No parameter is marked required: ToolRL's `default` is empty on optional ones too.

A record that does not convert is written to OUT.bad.jsonl with its line and the reason; the rest go on.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ..errors import TunewiseError
from ..results import ConvertReport
from ..util import write_jsonl

SOURCES = ("api-bank", "toolrl")
TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number", "number": "number",
         "bool": "boolean", "boolean": "boolean", "list": "array", "array": "array", "dict": "object", "object": "object"}


class ConvertError(TunewiseError):
    pass


def json_type(name) -> dict:
    """A source's parameter type as JSON schema: List[int] -> array, Optional[str] -> string, datetime -> string;
    anything else unconstrained."""
    t = str(name or "").strip()
    base = re.sub(r"^Optional\[(.*)\]$", r"\1", t).split("[")[0].strip().lower()
    if base in TYPES:
        return {"type": TYPES[base]}
    if base in ("datetime", "date", "time"):
        return {"type": "string"}
    return {}


def _tool(name: str, description: str, params: dict, required: list[str]) -> dict:
    if not isinstance(params, dict):
        raise ConvertError(f"tool {name!r}: its parameters are a {type(params).__name__}, not an object of name -> description")
    props = {k: {**json_type(v.get("type")), **({"description": v["description"]} if v.get("description") else {})}
             for k, v in params.items() if isinstance(v, dict)}
    return {"type": "function", "function": {"name": name, "description": description or "",
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


# ---------------------------------------------------------------- API-Bank

API_REQUEST = re.compile(r"API-Request:\s*\[(.*?)\](?:->(.*))?$")


API_LOOSE = re.compile(r"^\s*([A-Za-z_]\w*)\((.*)\)\s*$", re.S)


def _api_call(text: str, field: str) -> tuple[str, dict]:
    """`Name(key='v', n=3)` -> (Name, {key: v, n: 3}), read as a Python call of literals; where a value is not a literal
    (`location=New York`, as API-Bank's own parser allows), the arguments are split at `, key=` and such a value is the text."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call with keyword arguments")
        return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
        m = API_LOOSE.match(text)
        parts = re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", m.group(2).strip()) if m and m.group(2).strip() else []
        if not m or not all(re.match(r"^[A-Za-z_]\w*\s*=", p) for p in parts):
            raise ConvertError(f"{field}: {text[:80]!r} is not an API call Name(key=value, ...) ({e})") from None
        args = {}
        for p in parts:
            k, v = (x.strip() for x in p.split("=", 1))
            try:
                args[k] = ast.literal_eval(v)
            except (SyntaxError, ValueError):
                args[k] = v
        return m.group(1), args


def from_api_bank(obj: dict) -> dict:
    tools: dict[str, dict] = {}
    msgs: list[dict] = []
    for line in str(obj.get("input", "")).splitlines():
        line = line.strip()
        if line.startswith("{") and '"apiCode"' in line:
            api = json.loads(line)
            tools[api["apiCode"]] = _tool(api["apiCode"], api.get("description", ""), api.get("parameters") or {}, [])
        elif line.startswith("User:"):
            msgs.append({"role": "user", "content": line[5:].strip()})
        elif line.startswith("AI:"):
            msgs.append({"role": "assistant", "content": line[3:].strip()})
        elif line.startswith("API-Request:"):
            m = API_REQUEST.match(line)
            if not m:
                raise ConvertError(f"input: {line[:80]!r} is not API-Request: [Name(...)]->result")
            name, args = _api_call(m.group(1), "input")
            cid = f"call_{len(msgs)}"
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]})
            result = (m.group(2) or "").strip()
            msgs.append({"role": "tool", "tool_call_id": cid, "content": result})
            try:
                found = ast.literal_eval(result) if result.startswith("{") else None
            except (SyntaxError, ValueError):
                found = None
            if isinstance(found, dict) and "input_parameters" in found and "name" in found:  # a ToolSearcher result: a new tool
                tools[found["name"]] = _tool(found["name"], found.get("description", ""), found["input_parameters"] or {}, [])
    out = str(obj.get("output", "")).strip()
    if out.startswith("API-Request:"):
        m = API_REQUEST.match(out)
        if not m:
            raise ConvertError(f"output: {out[:80]!r} is not API-Request: [Name(...)]")
        name, args = _api_call(m.group(1), "output")
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{len(msgs)}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]})
    elif out.startswith("AI:"):
        msgs.append({"role": "assistant", "content": out[3:].strip()})
    else:
        raise ConvertError(f"output: expected 'API-Request: [...]' or 'AI: ...', got {out[:60]!r}")
    if not msgs or msgs[0]["role"] != "user":
        raise ConvertError("input: no 'User:' turn before the calls")
    return {"tools": list(tools.values()), "messages": msgs}


# ---------------------------------------------------------------- ToolRL

TOOLRL_TOOL = re.compile(r"^\d+\.\s*Name:\s*(.+?)\s*\nDescription:\s*(.*?)\s*\nParameters:\s*(\{.*?\})\s*$", re.M | re.S)
TOOLRL_BLOCK = re.compile(r"<(user|tool_call|obs|response)>(.*?)</\1>", re.S)
THINK = re.compile(r"^\s*<think>(.*?)</think>", re.S)


def _toolrl_calls(block: str, field: str, k: int) -> list[dict]:
    calls = []
    for j, line in enumerate(x for x in block.strip().splitlines() if x.strip()):
        try:
            c = json.loads(line)
        except ValueError as e:
            raise ConvertError(f"{field} <tool_call> line {j + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ConvertError(f"{field} <tool_call> line {j + 1}: expected {{\"name\": ..., \"parameters\": {{...}}}}")
        calls.append({"id": f"call_{k}_{j}", "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c.get("parameters", c.get("arguments", {})), ensure_ascii=False)}})
    return calls


def from_toolrl(obj: dict) -> dict:
    tools = []
    for name, desc, params in TOOLRL_TOOL.findall(str(obj.get("instruction", ""))):
        try:
            p = json.loads(params)
        except ValueError as e:
            raise ConvertError(f"instruction: the parameters of {name!r} are not valid JSON ({e.msg})") from None
        tools.append(_tool(name, desc, p, []))
    msgs: list[dict] = []
    for kind, text in TOOLRL_BLOCK.findall(str(obj.get("input", ""))):
        if kind == "user":
            msgs.append({"role": "user", "content": text.strip()})
        elif kind == "tool_call":
            msgs.append({"role": "assistant", "content": None, "tool_calls": _toolrl_calls(text, "input", len(msgs))})
        elif kind == "obs":
            calls = next((m["tool_calls"] for m in reversed(msgs) if m.get("tool_calls")), [])
            for c in calls:  # one observation answers the turn's calls
                msgs.append({"role": "tool", "tool_call_id": c["id"], "content": text.strip()})
        else:
            msgs.append({"role": "assistant", "content": text.strip()})
    out = str(obj.get("output", ""))
    think = THINK.match(out)
    rest = out[think.end():] if think else out
    blocks = dict((k, v) for k, v in TOOLRL_BLOCK.findall(rest) if k in ("tool_call", "response"))
    if not blocks:
        raise ConvertError("output: neither <tool_call> nor <response>")
    turn = {"role": "assistant", "content": blocks["response"].strip() if "response" in blocks else None}
    if "tool_call" in blocks:
        turn["tool_calls"] = _toolrl_calls(blocks["tool_call"], "output", len(msgs))
    if think and think.group(1).strip():
        turn["reasoning_content"] = think.group(1).strip()
    if not msgs or msgs[0]["role"] != "user":
        raise ConvertError("input: no <user> turn")
    return {"tools": tools, "messages": [*msgs, turn]}


CONVERTERS = {"api-bank": from_api_bank, "toolrl": from_toolrl}


def convert(path: Path, source: str, out: Path) -> ConvertReport:
    """Every record of `path` (a JSON array or JSONL) converted to OUT (chat JSONL); the ones that fail to OUT.bad.jsonl."""
    if source not in CONVERTERS:
        raise ConvertError(f"--from {source!r}: one of {', '.join(SOURCES)}")
    path, out = Path(path), Path(out)
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except ValueError as e:
        raise ConvertError(f"{path}: not a JSON array or JSON lines ({e})") from None
    good, bad = [], []
    for i, obj in enumerate(rows, 1):
        try:
            if not isinstance(obj, dict):
                raise ConvertError(f"expected an object, got {type(obj).__name__}")
            good.append(CONVERTERS[source](obj))
        except (ConvertError, KeyError, TypeError, ValueError) as e:
            bad.append({"file": str(path), "record": i, "error": str(e), "source": obj})
    write_jsonl(out, good)
    bad_path = out.with_name(out.stem + ".bad.jsonl")
    if bad:
        write_jsonl(bad_path, bad)
    elif bad_path.exists():
        bad_path.unlink()
    return ConvertReport(source=source, input=str(path), out=str(out), records=len(rows), written=len(good),
                         bad=len(bad), bad_file=str(bad_path) if bad else None,
                         calls=sum(len(m.get("tool_calls") or []) for r in good for m in r["messages"]),
                         reasons=_reasons(bad))


def _reasons(bad: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in bad:
        key = b["error"].split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out
