"""An answer in the tool-call text form as OpenAI's chat message, whole or as stream deltas.

`split_answer` cuts an answer into text and `<tool_call>` blocks; `read_block` reads a block's function name and the
arguments as the model wrote them. `ToolRequest.shape` (serve/app.py) builds the finished message from them, and
`CallStream` sends the same message while it decodes, as OpenAI streams a call: its id and name once the name is
written, then its arguments piece by piece. Both read the answer the same way, so what the stream has sent is always a
prefix of the finished message, and `CallStream.finish` sends the rest: streamed equals non-streamed.

Arguments are returned as the model wrote them (a JSON object's text), not re-serialised, so the pieces a stream sends
join to exactly the non-streamed `arguments`. Under the call grammar (data.tools.call_grammar) each block is
`{"name": NAME, "arguments": ARGS}` as json.dumps spaces it; a block in another shape (free decoding) is read with
json.loads and its arguments written back by json.dumps.
"""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HEAD = re.compile(r'\s*\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def split_answer(text: str, partial: bool = False) -> list[tuple[str, str, bool]]:
    """The answer as parts in order: ("text", text, True) and ("call", block body, closed). A last block with no
    `</tool_call>` yet is open (closed False). partial: the text is still growing, so a tail of text that may be the
    start of `<tool_call>` is left out until it is known."""
    parts, i = [], 0
    while True:
        j = text.find(OPEN, i)
        if j < 0:
            tail = text[i:]
            if partial:
                tail = next((tail[: -n] for n in range(len(OPEN) - 1, 0, -1) if tail.endswith(OPEN[:n])), tail)
            if tail:
                parts.append(("text", tail, True))
            return parts
        if j > i:
            parts.append(("text", text[i:j], True))
        k = text.find(CLOSE, j + len(OPEN))
        if k < 0:
            parts.append(("call", text[j + len(OPEN):], False))
            return parts
        parts.append(("call", text[j + len(OPEN):k], True))
        i = k + len(CLOSE)


def read_block(body: str, closed: bool) -> tuple[str | None, str | None]:
    """(name, arguments text) of a block. A closed block's arguments are a JSON object's text, or None when the block is
    not a call; an open block's are what is written so far, less a tail that may be the block's closing `}`."""
    m = HEAD.match(body)
    if m is None:
        if not closed:
            return None, None
        try:
            obj = json.loads(body)
        except ValueError:
            return None, None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return None, None
        return obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)
    name, rest = json.loads(m.group(1)), body[m.end():]
    if closed:
        rest = rest.rstrip()
        if not rest.endswith("}"):
            return None, None
        try:
            args = json.loads(rest[:-1])
        except ValueError:
            return None, None
        return (name, rest[:-1]) if isinstance(args, dict) else (None, None)
    end = rest.rfind("}")
    while end >= 0:  # the closing `}` of {"name", "arguments"} can only be told once more follows it
        if not rest[end + 1:].strip() or CLOSE.startswith(rest[end + 1:].strip()):
            return name, rest[:end]
        end = rest.rfind("}", 0, end)
    return name, rest


def calls_of(text: str, valid) -> tuple[list[dict], str | None, int | None]:
    """(calls, the text around them, the index of a call cut off or None). valid(name, args) says whether a closed block
    is a call the request admits; a block that is not stays in the text. An open last block with its name written is a
    call cut off before its end (OpenAI returns it as it stands, with finish_reason length)."""
    calls, text_parts, cut = [], [], None
    for kind, body, closed in split_answer(text):
        if kind == "text":
            text_parts.append(body)
            continue
        name, args = read_block(body, closed)
        if name is not None and (not closed or valid(name, json.loads(args))):
            cut = None if closed else len(calls)
            calls.append({"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}})
        elif closed:
            text_parts.append(OPEN + body + CLOSE)
    return calls, "".join(text_parts).strip() or None, cut


class CallStream:
    """One streamed choice of a tool request: feed() the answer decoded so far, get the deltas it adds; finish() the
    finished message (ToolRequest.shape's) gets the rest, and gives the message the call ids the stream sent."""

    def __init__(self):
        self.content = ""  # the content sent
        self.calls: list[list[str]] = []  # [id, the arguments sent] per call started

    def feed(self, text: str) -> list[dict]:
        deltas, said, n = [], "", 0
        for kind, body, closed in split_answer(text, partial=True):
            if kind == "text":
                said += body
                continue
            name, args = read_block(body, closed)
            if name is None:  # the name is not written yet
                break
            deltas += self._call(n, name, args)
            n += 1
        content = said.strip()  # whitespace at either end may be cut from the finished content
        if len(content) > len(self.content) and content.startswith(self.content):
            deltas.insert(0, {"content": content[len(self.content):]})
            self.content = content
        return deltas

    def _call(self, n: int, name: str, args: str) -> list[dict]:
        out = []
        if n == len(self.calls):
            self.calls.append([call_id(), ""])
            out.append({"tool_calls": [{"index": n, "id": self.calls[n][0], "type": "function", "function": {"name": name, "arguments": ""}}]})
        sent = self.calls[n][1]
        if len(args) > len(sent) and args.startswith(sent):
            out.append({"tool_calls": [{"index": n, "function": {"arguments": args[len(sent):]}}]})
            self.calls[n][1] = args
        return out

    def finish(self, message: dict) -> list[dict]:
        content = message.get("content") or ""
        deltas = [{"content": content[len(self.content):]}] if len(content) > len(self.content) and content.startswith(self.content) else []
        for n, call in enumerate(message.get("tool_calls") or []):
            deltas += self._call(n, call["function"]["name"], call["function"]["arguments"])
            call["id"] = self.calls[n][0]
        return deltas
