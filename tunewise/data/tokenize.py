"""Chat template -> token ids with a loss mask on assistant tokens only; truncation; batching.

The mask is derived from the rendered template itself. For each assistant turn, the render of the conversation
before it (with the generation prompt) is the context, and what the render up to and including the turn adds to it
is what the model writes: its text (and its reasoning, where the turn has one) plus the end-of-turn marker the template
writes after it (up to the first line break: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`). Exactly
the tokens of that span are trained. Nothing assumes a particular template.

The rule for templates that render a turn differently once later turns follow (Qwen3 drops the reasoning of earlier
assistant turns; Mistral writes the system prompt into the last user turn only): a turn is trained inside the whole
conversation's render where it appears there, with its context, as it did when it was written; otherwise it is trained
in a sequence of its own, its context followed by the turn, so every turn is trained exactly as the template renders it
when the model writes it. A turn whose text the template does not write fails loudly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import TunewiseError
from .reasoning import has_reasoning

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
    from jinja2 import TemplateError as JinjaError

    from ..models import render_chat

    try:
        return render_chat(tok, messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as e:  # raise_exception in the template: Gemma 2 refuses a system turn, Mistral tool call ids
        raise TemplateError(f"the chat template refuses this conversation: {e}") from None


def _turn(tok, msgs: list[dict], i: int, reasoning: bool) -> tuple[str, int, int]:
    """Assistant turn i as the model writes it: the sequence (its context, the render before it with the generation
    prompt, then the turn) and the (start, end) of what is trained there: from its text (or its reasoning) to the
    end-of-turn marker."""
    prefix = _render(tok, msgs[:i], add_generation_prompt=True)
    upto = _render(tok, msgs[: i + 1])
    content = msgs[i]["content"].strip()
    missing = TemplateError(f"assistant message {i} text not found in the rendered template")
    if upto.startswith(prefix):
        delta = upto[len(prefix) :]
    elif content and content in upto:  # the template renders the context differently when the answer follows (Mistral
        # moves the system prompt into the last user turn): the answer after its context as the template writes it
        delta = upto[upto.rfind(content) :]
    else:
        raise missing
    at = delta.find(content) if content else len(delta) - len(delta.lstrip())
    if at < 0:
        raise missing
    after = at + len(content)
    rest = delta[after:]
    marker = rest.lstrip().split("\n", 1)[0]  # the end-of-turn marker: what the template writes next, up to the line's end
    end = after + (len(rest) - len(rest.lstrip())) + len(marker) if marker else after
    start = len(delta) - len(delta.lstrip()) if reasoning else at  # a turn's reasoning is written by the model too
    return prefix + delta[:end], len(prefix) + start, len(prefix) + end


def training_renders(tok, messages: list[dict]) -> list[tuple[str, list[tuple[int, int]]]]:
    """The sequences one conversation trains as, each (text, char spans to train): one for each turn the template renders
    differently once later turns follow (the module's rule), then the whole conversation's render, with every turn the
    template renders there, and its context, as when the turn was written."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tok, msgs)
    spans, alone = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        written, start, end = _turn(tok, msgs, i, has_reasoning(m["content"]))
        if text[:end] == written:
            spans.append((start, end))
        else:  # the template rewrites this turn (or its context) once later turns follow: trained as it was written
            alone.append((written, [(start, end)]))
    return alone + ([(text, spans)] if spans or not alone else [])  # the whole conversation last


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the (start, end) char spans to train on, for a template that
    renders every assistant turn as it was written (TemplateError otherwise: use training_renders)."""
    renders = training_renders(tok, messages)
    if len(renders) != 1:
        raise TemplateError("the chat template renders earlier assistant turns differently once later turns follow; "
                            "this conversation trains as several sequences (training_renders)")
    return renders[0]


def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        for j, (a, b) in enumerate(offsets):
            if b > s and a < e:  # any overlap: a token straddling the boundary still carries answer text
                labels[j] = ids[j]
    return labels


def tokenize_messages(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """One conversation's ids and labels, in one sequence (a template that rewrites earlier turns: the last sequence of
    training_renders, the one whose last turn is the conversation's last answer)."""
    text, spans = training_renders(tok, messages)[-1]
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
    return [seqs[-1] for seqs in tokenize_sequences(tok, conversations, sources)]


def tokenize_sequences(tok, conversations: list[list[dict]], sources: list[str] | None = None) -> list[list[tuple[list[int], list[int]]]]:
    """Each conversation's training sequences (training_renders: one, or more where the template rewrites earlier turns),
    as (ids, labels), encoded in one batch call."""
    rendered = []
    for i, messages in enumerate(conversations):
        try:
            rendered.append(training_renders(tok, messages))
        except TemplateError as e:  # a template problem stops the run, but says on which record it showed
            raise TemplateError(f"{sources[i]}: {e}" if sources else str(e)) from None
    flat = [r for rs in rendered for r in rs]
    if not flat:
        return [[] for _ in rendered]
    enc = tok([text for text, _ in flat], add_special_tokens=False, return_offsets_mapping=True)
    seqs = iter([(ids, _mask(ids, offsets, spans)) for (_, spans), ids, offsets in zip(flat, enc["input_ids"], enc["offset_mapping"])])
    return [[next(seqs) for _ in rs] for rs in rendered]


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
    for r, (ids, labels) in ((r, seq) for r, seqs in zip(records, tokenize_sequences(tok, [r.messages for r in records],
                                                                                      [r.source for r in records])) for seq in seqs):
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
