"""Reasoning traces in training data: `data.reasoning: keep | drop`.

Assistant turns may carry their reasoning as OpenAI-style `reasoning_content` (DeepSeek, Qwen3 and vLLM write it so) or
inline, as a leading `<think>...</think>` block in the text. Records hold it one way: inline, at the start of the
assistant's text, which templates that know reasoning (Qwen3's splits the text at `</think>`) render as they render
`reasoning_content`, and which every other template renders as text.

- keep (the default): the reasoning is trained with the answer (the loss mask starts at `<think>`);
- drop: the reasoning is removed, and the model learns the answers alone (with `data.enable_thinking: false`, Qwen3-style
  templates then put an empty think block in the prompt, as they do for their non-thinking mode).

Evaluation scores answers without their reasoning (`strip_reasoning`), whatever the model thought first.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def has_reasoning(text: str) -> bool:
    """A text that opens with a reasoning block (<think>...</think>)."""
    return isinstance(text, str) and text.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in text


def strip_reasoning(text: str) -> str:
    """The answer without its leading reasoning block."""
    return text.split(THINK_CLOSE, 1)[1].lstrip() if has_reasoning(text) else text


def inline(reasoning: str, answer: str) -> str:
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.lstrip()}"


def apply(messages: list[dict], mode: str) -> list[dict]:
    """Each assistant turn's reasoning (reasoning_content or a leading <think> block) inline, or removed (drop)."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
            out.append(m)
            continue
        m = dict(m)
        r = m.pop("reasoning_content", None)
        if mode == "drop":
            m["content"] = strip_reasoning(m["content"])
        elif isinstance(r, str) and r.strip() and not has_reasoning(m["content"]):
            m["content"] = inline(r, m["content"])
        out.append(m)
    return out
