"""Chat template -> token ids with a loss mask on assistant tokens only; truncation; batching.

The mask is derived from the rendered template itself: each assistant turn's character span (its text
plus the end-of-turn marker the template writes after it) is located in the rendered conversation, and
exactly the tokens inside those spans are trained. Nothing assumes a particular template, and a
template that renders a conversation inconsistently with its own prefixes fails loudly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import TunewiseError

IGNORE = -100


class TemplateError(TunewiseError, ValueError):
    pass


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _render(tok, messages, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the (start, end) char spans to train on."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tok, msgs)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prefix = _render(tok, msgs[:i], add_generation_prompt=True)
        upto = _render(tok, msgs[: i + 1])
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefixes "
                f"(at message {i}); assistant-only loss masks cannot be derived safely"
            )
        delta = upto[len(prefix) :]
        content = m["content"].strip()
        start = delta.find(content)
        if start < 0:
            raise TemplateError(f"assistant message {i} text not found in the rendered template")
        end = len(delta.rstrip())  # the text plus the template's end-of-turn marker, without trailing whitespace
        spans.append((len(prefix) + start, len(prefix) + end))
    return text, spans


def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        for j, (a, b) in enumerate(offsets):
            if b > s and a < e:  # any overlap: a token straddling the boundary still carries answer text
                labels[j] = ids[j]
    return labels


def tokenize_messages(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], _mask(enc["input_ids"], enc["offset_mapping"], spans)


PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine."}]


def end_of_turn(tok) -> list[int]:
    """The tokens the loss mask trains after an assistant answer's text: the template's end-of-turn marker."""
    text, spans = assistant_spans(tok, PROBE)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start, end = spans[0]
    after = text.index("Fine.", start) + len("Fine.")
    return [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= after and b <= end and b > a]


def check_end_of_turn(tok, stop_ids: list[int]) -> list[int]:
    """The end-of-turn token is trained (inside the loss mask) and is one the engine, serve and export stop on; a
    TemplateError that names both otherwise (Gemma's <end_of_turn> against an <eos> that is the only stop token, a
    template that writes nothing after an answer). Returns the trained end-of-turn tokens."""
    eot = end_of_turn(tok)
    if not eot:
        raise TemplateError("the chat template writes no end-of-turn token after an assistant answer, so none is trained: a fine-tuned "
                            "model would not learn to stop (use a template that closes the assistant turn)")
    if stop_ids and not set(eot) & set(stop_ids):
        raise TemplateError(f"the chat template ends an assistant turn with {tok.convert_ids_to_tokens(eot)}, which training teaches, but "
                            f"generation stops on {tok.convert_ids_to_tokens(list(stop_ids))} only: the model would run past its answers. "
                            "Add the end-of-turn token to the model's generation_config.json eos_token_id")
    return eot


def tokenize_many(tok, conversations: list[list[dict]], sources: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """tokenize_messages for many conversations, encoded in one batch call (a fast tokenizer does that ~2.4x
    faster than one at a time; the ids and masks are the same). A template problem names its record's source."""
    rendered = []
    for i, messages in enumerate(conversations):
        try:
            rendered.append(assistant_spans(tok, messages))
        except TemplateError as e:  # a template problem stops the run, but says on which record it showed
            raise TemplateError(f"{sources[i]}: {e}" if sources else str(e)) from None
    if not rendered:
        return []
    enc = tok([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, _mask(ids, offsets, spans)) for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"])]


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        ls = sorted(self.lengths) or [0]
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "length_p50": ls[len(ls) // 2],
            "length_p95": ls[min(len(ls) - 1, int(len(ls) * 0.95))],
            "length_max": ls[-1],
            "length_histogram": _histogram(self.lengths),
        }


def _histogram(values: list[int], bins: int = 20) -> dict:
    """Equal-width bins from 0 to the maximum: {"edges": [...], "counts": [...]}."""
    top = max(values, default=0) or 1
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, v // width)] += 1
    return {"edges": [i * width for i in range(bins + 1)], "counts": counts}


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """Drop the oldest context tokens; never cut into the last trained span. None if the answer alone is too long."""
    if len(ids) <= max_length:
        return ids, labels
    first_last_span = len(labels)
    j = len(labels) - 1
    while j >= 0 and labels[j] == IGNORE:
        j -= 1
    while j >= 0 and labels[j] != IGNORE:
        first_last_span = j
        j -= 1
    cut = len(ids) - max_length
    if cut > first_last_span:
        return None
    return ids[cut:], labels[cut:]


def tokenize_records(tok, records, max_length: int, stats: TokenStats | None = None) -> tuple[list[Tokenized], TokenStats]:
    """Records -> examples within max_length; `stats` (counts, lengths) is added to when given, so a stream of
    chunks can be summarised."""
    stats = stats if stats is not None else TokenStats()
    out = []
    records = list(records)
    for r, (ids, labels) in zip(records, tokenize_many(tok, [r.messages for r in records], [r.source for r in records])):
        kept = truncate(ids, labels, max_length)
        if kept is None:
            stats.dropped_too_long += 1
            stats.dropped.append({"source": r.source, "reason": f"answer does not fit max_length={max_length} ({len(ids)} tokens)"})
            continue
        if len(kept[0]) < len(ids):
            stats.truncated += 1
        t = Tokenized(kept[0], kept[1], r.source)
        out.append(t)
        stats.examples += 1
        stats.tokens += len(t.input_ids)
        stats.loss_tokens += t.n_loss
        stats.lengths.append(len(t.input_ids))
    return out, stats


def batch_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """Indices of each micro-batch for one epoch; deterministic in (seed).

    With group_by_length, shuffle, then sort within windows of 50 batches by length, so a batch holds
    similar lengths (little padding) while batch order stays random.
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        window = batch_size * 50
        idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w : w + window], key=lambda i: -lengths[i])]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch for training."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
