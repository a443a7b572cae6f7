"""Tool use in training data: the shapes users have, each call validated, and one documented text form for templates.

Read (each into the same structure: `tools`, a list of OpenAI function tools, and messages where an assistant turn may
carry `tool_calls` and `tool` turns answer them by `tool_call_id`):
- OpenAI chat JSONL: per-record `tools`, assistant `tool_calls` (ids, names, JSON-string arguments), `tool` messages
  with `tool_call_id`, `parallel_tool_calls`; the legacy `functions` / assistant `function_call` / `function` messages;
- ShareGPT as glaive and LLaMA-Factory write it: `function_call` turns (a JSON {"name", "arguments"}) and `observation`
  turns, the tools as a `tools` field (a JSON string or a list);
- Hermes/Qwen style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` inside an assistant's text.

Every call is checked: its arguments parse as a JSON object, its name is one of the record's tools, and its arguments
validate against that tool's parameter schema (jsonschema: required parameters, types, enums); every tool message
answers a call made before it. A record that fails is quarantined with the field (messages[3].tool_calls[0].function.
arguments ...), never repaired.

Training renders tool use as text, one documented form (TOOLS_FORMAT), for every template: the tools' JSON schemas in
the system turn, each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's turn, each
result as a `tool` turn. Assistant turns (calls included) are trained; tool results are not. The rendered messages are
what evaluation and serving then see too, so a model is asked in the form it was trained on.
"""

from __future__ import annotations

import json

from ..metrics import TOOL_CALL  # the text form's call block, which the tool-call metrics parse too

TOOLS_FORMAT = "hermes"  # the name recorded with a trained model: the text form below
TEMPLATE_MARK = "{#- tunewise tool form: tools and calls as text (tunewise/data/tools.py), then the model's own template -#}"

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query. The functions, as JSON schemas, "
                "are within <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nFor each call, reply with a JSON object with the "
                "function's name and arguments within <tool_call></tool_call>:\n<tool_call>\n{{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}}\n</tool_call>")
_HEADER_OPEN, _HEADER_CLOSE = TOOLS_HEADER.format(tools="\0").split("\0")  # the header's text before and after the tools


class ToolError(ValueError):
    """Why a record's tool use cannot be trained on; the message starts with the field."""


def has_tool_use(obj: dict) -> bool:
    msgs = obj.get("messages") if isinstance(obj.get("messages"), list) else []
    return bool(obj.get("tools") or obj.get("functions") or any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call") or m.get("role") in ("tool", "function")) for m in msgs))


def tool_list(raw, field: str) -> list[dict]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except ValueError as e:
            raise ToolError(f"{field}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, list):
        raise ToolError(f"{field}: expected a list of tools")
    out = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"{field}[{i}]: expected a function with a name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"{field}[{i}].parameters: expected a JSON schema object")
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}})
    return out


def _arguments(raw, field: str) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise ToolError(f"{field}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ToolError(f"{field}: expected a JSON object")
    return raw


def check_call(name: str, args: dict, tools: list[dict], field: str) -> None:
    """The call names one of the tools and its arguments validate against its parameter schema."""
    import jsonschema

    fn = next((t["function"] for t in tools if t["function"]["name"] == name), None)
    if fn is None:
        raise ToolError(f"{field}.name: {name!r} is not one of the record's tools ({', '.join(t['function']['name'] for t in tools) or 'none'})")
    try:
        jsonschema.validate(args, fn["parameters"])
    except jsonschema.ValidationError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise ToolError(f"{field}.arguments{where}: {e.message}") from None
    except jsonschema.SchemaError as e:
        raise ToolError(f"tools: {name}'s parameters are not a valid JSON schema: {e.message}") from None


def normalize_openai(obj: dict) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of an OpenAI record, legacy functions turned into tools; every call checked. Raises ToolError."""
    tools = tool_list(obj.get("tools") if obj.get("tools") is not None else obj.get("functions") or [],
                       "tools" if obj.get("tools") is not None else "functions")
    parallel = obj.get("parallel_tool_calls", True)
    out, pending = [], {}
    for i, m in enumerate(obj.get("messages") or []):
        if not isinstance(m, dict):
            raise ToolError(f"messages[{i}]: expected an object")
        role = m.get("role")
        if role == "function":  # legacy: a function's result, answering the call before it
            role, m = "tool", {**m, "tool_call_id": m.get("tool_call_id") or next(reversed(pending), None)}
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            raw_calls = m.get("tool_calls") or [{"id": f"call_{i}", "type": "function", "function": m["function_call"]}]
            key = "tool_calls" if m.get("tool_calls") else "function_call"
            if not isinstance(raw_calls, list):
                raise ToolError(f"messages[{i}].tool_calls: expected a list")
            if not parallel and len(raw_calls) > 1:
                raise ToolError(f"messages[{i}].tool_calls: {len(raw_calls)} calls, but parallel_tool_calls is false")
            calls = []
            for j, c in enumerate(raw_calls):
                field = f"messages[{i}].{key}" + (f"[{j}]" if key == "tool_calls" else "")
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolError(f"{field}.function: expected an object with a name and arguments")
                args = _arguments(fn.get("arguments", {}), f"{field}.function.arguments")
                check_call(fn["name"], args, tools, f"{field}.function")
                cid = str(c.get("id") or f"call_{i}_{j}")
                pending[cid] = fn["name"]
                calls.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise ToolError(f"messages[{i}].content: expected a string or null")
            out.append({"role": "assistant", "content": content or "", "tool_calls": calls,
                        **({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {})})
        elif role == "tool":
            cid = m.get("tool_call_id")
            if not pending:
                raise ToolError(f"messages[{i}]: a tool message with no call before it to answer")
            if cid not in pending:
                raise ToolError(f"messages[{i}].tool_call_id: {cid!r} answers no call made before it ({', '.join(pending)})")
            content = m.get("content")
            if not isinstance(content, str):
                content = json.dumps(content) if content is not None else ""
            out.append({"role": "tool", "content": content, "tool_call_id": cid, "name": pending.pop(cid)})
        else:
            if role == "assistant" and isinstance(m.get("content"), str) and TOOL_CALL.search(m["content"]):
                out.append(_hermes_turn(m, tools, f"messages[{i}]", pending, i))
                continue
            out.append({k: v for k, v in m.items() if k in ("role", "content", "weight", "reasoning_content")})
    return out, tools


def _hermes_turn(m: dict, tools: list[dict], field: str, pending: dict, i: int) -> dict:
    """An assistant text with <tool_call>{...}</tool_call> blocks as a turn with tool_calls."""
    calls = []
    for j, raw in enumerate(TOOL_CALL.findall(m["content"])):
        call = _arguments(raw, f"{field}.content <tool_call> {j}")
        name, args = call.get("name"), _arguments(call.get("arguments", {}), f"{field}.content <tool_call> {j}.arguments")
        if not isinstance(name, str):
            raise ToolError(f"{field}.content <tool_call> {j}: no function name")
        check_call(name, args, tools, f"{field}.content <tool_call> {j}")
        cid = f"call_{i}_{j}"
        pending[cid] = name
        calls.append({"id": cid, "type": "function", "function": {"name": name, "arguments": args}})
    return {"role": "assistant", "content": TOOL_CALL.sub("", m["content"]).strip(), "tool_calls": calls}


def normalize_sharegpt(conversations: list, tools_raw) -> tuple[list[dict], list[dict]]:
    """glaive / LLaMA-Factory ShareGPT: function_call and observation turns, the tools as a JSON string or list."""
    msgs = []
    for i, turn in enumerate(conversations):
        kind = turn.get("from")
        if kind == "function_call":
            call = _arguments(turn.get("value", ""), f"conversations[{i}].value")
            msgs.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function",
                                                                               "function": {"name": call.get("name"), "arguments": call.get("arguments", {})}}]})
        elif kind == "observation":
            msgs.append({"role": "tool", "content": turn.get("value", ""), "tool_call_id": next(
                (c["id"] for m in reversed(msgs) if m.get("tool_calls") for c in m["tool_calls"]), None)})
        else:
            msgs.append(turn)
    return normalize_openai({"messages": msgs, "tools": tools_raw if tools_raw is not None else []})


def render_text(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages as plain text in TOOLS_FORMAT: tools in the system turn, calls as <tool_call> blocks, results as
    tool turns. What training, evaluation and serving put through the chat template."""
    out = []
    if tools:
        header = TOOLS_HEADER.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{header}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": header})
    for m in messages:
        if m.get("tool_calls"):
            blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                               for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m['content']}\n{blocks}" if m.get("content") else blocks,
                        **{k: m[k] for k in ("weight", "reasoning_content") if k in m}})
        elif m.get("role") == "tool":
            out.append({"role": "tool", "content": m["content"]})
        else:
            out.append(m)
    return out


TOOL_CHOICES = ("auto", "required")


def call_grammar(tools: list[dict], choice: str = "auto", parallel: bool = True) -> str:
    """The structural tag (xgrammar's JSON format) that holds decoding to TOOLS_FORMAT's calls of `tools`: each call is
    `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` with NAME one of the tools and ARGS valid against that
    tool's parameter schema, written as render_text writes a call. choice: auto (text, with calls wherever the model opens
    one), required (only calls, at least one), or a tool's name (only calls of it). parallel=False: one call at most."""
    import xgrammar as xgr
    from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat, TriggeredTagsFormat

    if choice not in TOOL_CHOICES:
        tools = [t for t in tools if t["function"]["name"] == choice]
        if not tools:
            raise ToolError(f"tool_choice: {choice!r} is not one of the tools")
    if not tools:
        raise ToolError("tools: no tools to constrain the calls to")
    tags = [TagFormat(begin="<tool_call>\n{\"name\": " + json.dumps(t["function"]["name"], ensure_ascii=False) + ", \"arguments\": ",
                      content=GrammarFormat(grammar=str(xgr.Grammar.from_json_schema(  # the arguments as json.dumps writes them
                          json.dumps(t["function"]["parameters"]), any_whitespace=False, separators=(", ", ": ")))),
                      end="}\n</tool_call>") for t in tools]
    if choice == "auto":
        fmt = TriggeredTagsFormat(triggers=["<tool_call>"], tags=tags, stop_after_first=not parallel)
    else:
        fmt = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
    return StructuralTag(format=fmt).model_dump_json()


# The text form as Jinja, put in front of a model's own chat template (`with_tool_form`): a conversation given as
# structured messages with `tools=` renders exactly as render_text's messages render through the model's template, so
# a runtime that sends OpenAI tools and tool_calls to the saved template (vLLM, llama.cpp --jinja) prompts the model
# as training did. The model's own tool handling is switched off (tools is none for it): it was trained on this form.
_TOOL_FORM_JINJA = TEMPLATE_MARK + """
{%- set ns = namespace(msgs=[], text='') -%}
{%- set rest = messages -%}
{%- if tools is defined and tools -%}
  {%- for t in tools -%}
    {%- set f = t.function if t.function is defined else t -%}
    {%- set t = {'type': 'function', 'function': {'name': f.name, 'description': f.description if f.description is defined else '',
                 'parameters': f.parameters if f.parameters is defined else {'type': 'object', 'properties': {}}}} -%}
    {%- set ns.text = ns.text + ('' if loop.first else '\\n') + (t | tojson) -%}
  {%- endfor -%}
  {%- set header = HEADER_OPEN + ns.text + HEADER_CLOSE -%}
  {%- if messages and messages[0].role == 'system' -%}
    {%- set ns.msgs = [{'role': 'system', 'content': messages[0].content + '\\n\\n' + header}] -%}
    {%- set rest = messages[1:] -%}
  {%- else -%}
    {%- set ns.msgs = [{'role': 'system', 'content': header}] -%}
  {%- endif -%}
{%- endif -%}
{%- for m in rest -%}
  {%- if m.tool_calls is defined and m.tool_calls -%}
    {%- set ns.text = '' -%}
    {%- for c in m.tool_calls -%}
      {%- set f = c.function if c.function is defined else c -%}
      {%- set args = f.arguments if f.arguments is string else (f.arguments | tojson) -%}
      {%- set ns.text = ns.text + ('' if loop.first else '\\n') + '<tool_call>\\n{"name": ' + (f.name | tojson) + ', "arguments": ' + args + '}\\n</tool_call>' -%}
    {%- endfor -%}
    {%- set ns.msgs = ns.msgs + [{'role': 'assistant', 'content': ((m.content + '\\n') if m.content else '') + ns.text}] -%}
  {%- elif m.role == 'tool' -%}
    {%- set ns.msgs = ns.msgs + [{'role': 'tool', 'content': m.content}] -%}
  {%- else -%}
    {%- set ns.msgs = ns.msgs + [m] -%}
  {%- endif -%}
{%- endfor -%}
{%- set messages = ns.msgs -%}
{%- set tools = none %}"""


def native_tools(template) -> bool:
    """A chat template that renders tools and calls itself in this form's call syntax (Hermes style: Qwen2.5, Qwen3,
    Hermes): `<tool_call>` blocks of {"name", "arguments"} JSON. Tool use is then rendered by the template itself
    (structured), with the tools in its own words; other templates get with_tool_form."""
    return (isinstance(template, str) and not template.startswith(TEMPLATE_MARK) and "<tool_call>" in template
            and "tools" in template and "arguments" in template)


def structured(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """render_text undone: (messages with tool_calls and tool turns, tools) from the text form; the messages unchanged
    and no tools where they are not in it (or would not render back the same)."""
    head, tail = _HEADER_OPEN, _HEADER_CLOSE
    if not messages or messages[0].get("role") != "system" or head not in (messages[0].get("content") or ""):
        return messages, []
    content = messages[0]["content"]
    at = content.index(head)
    body = content[at + len(head):]
    if not body.endswith(tail):
        return messages, []
    try:
        tools = [json.loads(line) for line in body[: -len(tail)].split("\n") if line.strip()]
    except ValueError:
        return messages, []
    out = [{**messages[0], "content": content[:at].removesuffix("\n\n")}] if at else []
    for m in messages[1:]:
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and TOOL_CALL.search(m["content"]):
            calls = []
            for raw in TOOL_CALL.findall(m["content"]):
                try:
                    c = json.loads(raw)
                except ValueError:
                    return messages, []
                calls.append({"type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments", {})}})
            rest = TOOL_CALL.sub("", m["content"]).strip()
            out.append({**{k: v for k, v in m.items() if k != "content"}, "content": rest, "tool_calls": calls})
        else:
            out.append(m)
    if render_text(out, tools) != messages:
        return messages, []
    return out, tools


def with_tool_form(template: str) -> str:
    """A model's chat template with the text form in front (once: a template that has it is returned as it is)."""
    if template.startswith(TEMPLATE_MARK):
        return template
    return _TOOL_FORM_JINJA.replace("HEADER_OPEN", json.dumps(_HEADER_OPEN)).replace("HEADER_CLOSE", json.dumps(_HEADER_CLOSE)) + template
