"""Decoding a prefilled batch token by token: each row's state, sampling, stop strings and constraints.

Rows that finish are dropped from the batch (the cache compacted) so that later steps compute only the rows still
generating. The stop-string check decodes only the tail of an answer that can complete a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .prefill import Prefilled


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" | "length"


def stop_window(stop: list[str]) -> int:
    """Tokens at the end of an answer that can hold a stop string the last token completed: a character takes at most
    4 tokens (a UTF-8 character is at most 4 bytes, a byte-level token at least one), and 8 more keep the window's
    first tokens (where a decode can drop a leading space or show half a character) away from the match."""
    return 4 * max(len(s) for s in stop) + 8


def stopped(tok, ids: list[int], stop: list[str], window: int) -> bool:
    """Whether a stop string appears at the end of the answer: only the tail that can complete one is decoded, so the
    check costs the same at every step (decoding the whole answer each step made it quadratic in the answer's length).
    The answer is checked every step, so a stop string wholly before the window was found when it was completed."""
    text = tok.decode(ids[-window:], skip_special_tokens=True)
    return any(s in text for s in stop)


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0; otherwise a sample from the temperature-scaled, top-p-truncated distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@dataclass
class RowState:
    """One row's answer so far, and whether, why and when it ended."""

    ids: list[int] = field(default_factory=list)
    finished: bool = False
    reason: str = "length"  # "stop" once it ends before max_new_tokens
    latency: float = 0.0

    def end(self, t0: float) -> None:
        self.finished, self.reason, self.latency = True, "stop", time.time() - t0


@dataclass
class Step:
    """What one batch's decode needs besides the model: sampling, stops, the constraint and the callback."""

    max_new_tokens: int
    temperature: float
    top_p: float
    gen: torch.Generator
    eos: set[int]
    stop: list[str] | None = None
    constraint: object = None  # constraints.TrieRows or GrammarRows
    on_token: object = None  # on_token(row, ids so far)


def advance(tok, state: RowState, row: int, t: int, s: Step, t0: float, window: int) -> None:
    """One token into a row: the constraint follows it (a trie may complete the answer), end-of-turn, a grammar
    that is satisfied or a stop string ends the row."""
    if s.constraint is not None:
        rest = s.constraint.accept(row, t)
        if rest is not None:  # a single answer is left: write it out, no more model steps
            state.ids.extend([t] + rest)
            if s.on_token:
                s.on_token(row, state.ids)
            state.end(t0)
            return
    if t in s.eos:
        state.end(t0)
    elif s.constraint is not None and s.constraint.complete(row):
        state.ids.append(t)
        state.end(t0)
    else:
        state.ids.append(t)
        if s.on_token:
            s.on_token(row, state.ids)
        if s.stop and stopped(tok, state.ids, s.stop, window):
            state.end(t0)


def decode(model, tok, pre: Prefilled, s: Step, t0: float) -> list[RowState]:
    """Decode every row of a prefilled batch until it ends or reaches max_new_tokens."""
    cache, logits, mask, next_pos = pre.cache, pre.logits, pre.mask, pre.next_pos
    states = [RowState() for _ in pre.prompts]
    alive = list(range(len(states)))  # batch row -> original row, for the rows still in the cache
    window = stop_window(s.stop) if s.stop else 0
    for step in range(s.max_new_tokens):
        if s.constraint is not None:
            logits = s.constraint.mask(logits, alive)
        tokens = pick(logits, s.temperature, s.top_p, s.gen)
        for j, row in enumerate(alive):
            if not states[row].finished:
                advance(tok, states[row], row, int(tokens[j]), s, t0, window)
        live = [j for j, row in enumerate(alive) if not states[row].finished]
        if not live or step == s.max_new_tokens - 1:
            break
        if len(alive) - len(live) >= max(1, len(alive) // 4):  # compact: finished rows stop costing compute
            keep = torch.tensor(live, device=tokens.device)
            cache.select_rows(keep)
            alive = [alive[j] for j in live]
            tokens, mask, next_pos = tokens[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = next_pos + 1
    return states


def completions(tok, pre: Prefilled, states: list[RowState], stop: list[str] | None, t0: float) -> list[Completion]:
    """The rows' answers as text, cut at the first stop string, with their token counts and latency."""
    end = time.time() - t0
    out = []
    for prompt, st in zip(pre.prompts, states):
        text = tok.decode(st.ids, skip_special_tokens=True)
        if stop:
            hits = [text.find(x) for x in stop if x in text]
            if hits:
                text = text[: min(hits)]
        out.append(Completion(text.strip(), len(prompt), len(st.ids), st.latency or end, st.reason))
    return out
