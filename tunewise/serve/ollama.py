"""An Ollama Modelfile for a GGUF export: FROM the file, a TEMPLATE that renders what the model's chat template renders,
and the stop parameters the engine stops on.

Ollama renders prompts with Go's text/template over `.Messages` (each with `.Role` and `.Content`). The TEMPLATE is
written for ChatML-shaped chat templates (`<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`, SmolLM2, Qwen2 and Qwen2.5
without tools), with the default system prompt the template adds when a conversation has none. Whether a model's
template is of that shape is checked by rendering probe conversations through both; another shape is refused with
the reason (the GGUF still carries the chat template in its metadata, which llama.cpp's server applies itself).

`render_template` interprets the subset of Go's text/template the TEMPLATE uses (text, `{{ range $i, $m := .Messages }}`,
`{{ if }}` with `and`/`eq`/`ne`, `{{ $m.Role }}`, `{{ $m.Content }}`, `{{-` / `-}}` trimming), so the tests render the
TEMPLATE string itself, not the structure it was built from.
"""

from __future__ import annotations

import re

from ..models import render_chat
from .gguf_export import GGUFError

START, END = "<|im_start|>", "<|im_end|>"
PROBES = [
    [{"role": "user", "content": "Where is my card?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
]


def chatml(messages: list[dict], default_system: str | None) -> str:
    """A ChatML rendering with the generation prompt (what the TEMPLATE must produce)."""
    out = ""
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out += f"{START}system\n{default_system}{END}\n"
    for m in messages:
        out += f"{START}{m['role']}\n{m['content']}{END}\n"
    return out + f"{START}assistant\n"


def _render_jinja(tok, messages: list[dict]) -> str:
    return render_chat(tok, messages, add_generation_prompt=True, tokenize=False)


def chatml_default_system(tok) -> str | None:
    """The default system prompt of a ChatML-shaped chat template (None: it adds none); GGUFError when the template
    is not ChatML-shaped."""
    if not tok.chat_template:
        raise GGUFError("Ollama export: the tokenizer has no chat template")
    first = _render_jinja(tok, PROBES[0])
    default = None
    head = f"{START}system\n"
    if first.startswith(head):
        default = first[len(head): first.index(END)]
    for conv in PROBES:
        if _render_jinja(tok, conv) != chatml(conv, default):
            raise GGUFError("Ollama export: the chat template is not ChatML-shaped (<|im_start|>ROLE ... <|im_end|>); tunewise writes "
                            "a Modelfile TEMPLATE for those only. The GGUF carries the chat template: serve it with llama.cpp's "
                            "llama-server --jinja, or write the TEMPLATE by hand")
    return default


def _go_quote(s: str) -> str:
    return s.replace("{{", "{{`{{`}}")


def modelfile(tok, gguf_name: str, stop: list[str]) -> str:
    """The Modelfile text (FROM, TEMPLATE, PARAMETER stop ...)."""
    default = chatml_default_system(tok)
    first = ("" if default is None else
             '{{ if and (eq $i 0) (ne $m.Role "system") }}' + f"{START}system\n{_go_quote(default)}{END}\n" + "{{ end }}")
    template = ("{{- range $i, $m := .Messages }}" + first + START + "{{ $m.Role }}\n{{ $m.Content }}" + END + "\n{{ end }}"
                + START + "assistant\n")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"


def template_of(text: str) -> str:
    m = re.search(r'TEMPLATE """(.*?)"""', text, re.S)
    if not m:
        raise ValueError("no TEMPLATE in the Modelfile")
    return m.group(1)


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """Text and actions, with `{{-` and `-}}` trimming the adjacent text's whitespace as Go does."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _value(expr: str, env: dict):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        return _call(expr[1:-1], env)
    if expr.startswith('"'):
        return expr[1:-1]
    if expr.startswith("`"):
        return expr[1:-1]
    if expr.startswith("$"):
        name, _, attr = expr.partition(".")
        v = env[name]
        return v[attr.lower()] if attr else v
    if expr == ".Messages":
        return env[".Messages"]
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if " " not in expr:
        raise ValueError(f"unsupported template value {expr!r}")
    return _call(expr, env)


def _split_args(expr: str) -> list[str]:
    args, depth, cur, quote = [], 0, "", None
    for ch in expr:
        if quote:
            cur += ch
            quote = None if ch == quote else quote
        elif ch in "\"`":
            cur, quote = cur + ch, ch
        elif ch == "(":
            depth, cur = depth + 1, cur + ch
        elif ch == ")":
            depth, cur = depth - 1, cur + ch
        elif ch == " " and depth == 0:
            if cur:
                args.append(cur)
            cur = ""
        else:
            cur += ch
    return args + ([cur] if cur else [])


def _call(expr: str, env: dict):
    fn, *args = _split_args(expr)
    vals = [_value(a, env) for a in args]
    if fn == "and":
        return all(vals)
    if fn == "eq":
        return vals[0] == vals[1]
    if fn == "ne":
        return vals[0] != vals[1]
    raise ValueError(f"unsupported template function {fn!r}")


def render_template(template: str, messages: list[dict]) -> str:
    """Render a TEMPLATE over messages as Ollama does (the subset of text/template described above)."""
    toks = _tokens(template)
    out, _ = _run(toks, 0, {".Messages": messages})
    return out


def _run(toks, k: int, env: dict) -> tuple[str, int]:
    out = ""
    while k < len(toks):
        kind, body = toks[k]
        if kind == "text":
            out += body
            k += 1
            continue
        if body == "end" or body == "else":
            return out, k
        m = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", body)
        if m:
            items = _value(m.group(3), env)
            end = k + 1
            for i, item in enumerate(items):
                text, end = _run(toks, k + 1, {**env, m.group(1): i, m.group(2): item})
                out += text
            if not items:
                _, end = _run(toks, k + 1, env)
            k = end + 1
            continue
        if body.startswith("if "):
            text, end = _run(toks, k + 1, env)
            if _value(body[3:], env):
                out += text
            k = end + 1
            continue
        out += str(_value(body, env))
        k += 1
    return out, k
