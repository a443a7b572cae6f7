"""Prefill: a batch's prompts into a preallocated KV buffer, ready for decoding.

Identical prompts (n samples, GRPO's groups) are prefilled once and their cache copied; the prefix every prompt of
the batch shares (system prompt, template, few-shot block) runs once and is copied to every row; the rows' own
tokens run in chunks of similar length, each padded only to its own longest row. Rows are laid out as
[shared prefix][left padding][own suffix]: the attention mask hides the padding and position ids follow the mask,
so this is the same computation as plain left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_SHARED_PREFIX = 4  # below this, a separate prefix pass costs more than it saves
PREFILL_CHUNK_TOKENS = 512  # rows x padded width per prefill forward: large enough for efficient matmuls


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n



def _unique_rows(batch: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """(the distinct prompts in order of first appearance, each row's index among them); None when all differ."""
    first: dict[tuple, int] = {}
    copies = [first.setdefault(tuple(p), len(first)) for p in batch]
    if len(first) == len(batch):
        return batch, None
    return [list(k) for k in first], copies


def shared_length(seqs: list[list[int]], before: int | None = None) -> int:
    """The tokens every sequence starts with that run once as a prefix pass: at least one token of each stays
    outside it (and, with `before`, every position from `before` on), and 0 below MIN_SHARED_PREFIX or for one row."""
    shared = min(_common_prefix(seqs), before if before is not None else len(seqs[0])) - 1
    return 0 if shared < MIN_SHARED_PREFIX or len(seqs) == 1 else shared


@dataclass
class Prefilled:
    """A prefilled batch: every row's cache, the logits of its next token, its mask and next position."""

    cache: "_BufferCache"
    logits: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor
    prompts: list[list[int]]  # each row's prompt (copies included)


def prefill_rows(model, batch: list[list[int]], pad: int, device, num_layers: int, max_new_tokens: int) -> Prefilled:
    """Run the prompts of one batch (sorted by length) into a buffer with room for max_new_tokens more."""
    rows = batch
    batch, copies = _unique_rows(batch)  # identical prompts are prefilled once
    shared = shared_length(batch)
    n = max(len(p) for p in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for row, p in enumerate(batch):
        own = n - (len(p) - shared)  # where this row's own suffix starts
        ids[row, :shared], ids[row, own:] = torch.tensor(p[:shared]), torch.tensor(p[shared:])
        mask[row, :shared], mask[row, own:] = 1, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    cache = _BufferCache(num_layers, len(batch), capacity=n + max_new_tokens)
    if shared:
        cache.at(slice(0, 1), 0)
        model(input_ids=ids[:1, :shared], position_ids=pos[:1, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.copy_first_row(shared)
    logits = []
    a = 0
    while a < len(batch):  # chunks of rows of similar length, each written at the right end of the buffer
        b = a + 1
        while b < len(batch) and (b + 1 - a) * (len(batch[b]) - shared) <= PREFILL_CHUNK_TOKENS:
            b += 1
        width = max(len(p) for p in batch[a:b]) - shared
        cache.at(slice(a, b), n - width)
        logits.append(model(input_ids=ids[a:b, n - width :], attention_mask=mask[a:b], position_ids=pos[a:b, n - width :],
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1])
        a = b
    cache.at(slice(None), n)
    logits = torch.cat(logits)
    if copies is not None:  # every row its prompt's cache and first logits
        index = torch.tensor(copies, device=device)
        cache.select_rows(index)
        logits, mask, pos = logits[index], mask[index], pos[index]
    return Prefilled(cache, logits, mask, pos[:, -1] + 1, rows)


class _BufferLayer(DynamicLayer):
    """One layer's KV cache in a buffer of [rows, heads, prompt + max_new_tokens, dim].

    Updates write in place and return views, so a decode step copies one token's keys and values, not
    the whole cache. `rows` and `length` say where the next update goes: the prompt is prefilled in
    chunks of rows of similar length, each written at the right end of its rows.
    """

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.n_rows, self.capacity, self.length = rows, capacity, 0
        self.rows = slice(None)
        self.buf_k = self.buf_v = None

    def lazy_initialization(self, key_states, value_states):
        _, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buf_k = key_states.new_zeros(self.n_rows, h, self.capacity, d)
        self.buf_v = value_states.new_zeros(self.n_rows, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.buf_k[self.rows, :, self.length : end] = key_states
        self.buf_v[self.rows, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.buf_k[self.rows, :, :end], self.buf_v[self.rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: torch.Tensor) -> None:
        self.buf_k, self.buf_v = self.buf_k.index_select(0, index), self.buf_v.index_select(0, index)


class _BufferCache(Cache):
    """The decode loop's KV cache: one preallocated buffer per layer."""

    def __init__(self, num_layers: int, rows: int, capacity: int):
        super().__init__(layers=[_BufferLayer(rows, capacity) for _ in range(num_layers)])

    def at(self, rows: slice, start: int) -> None:
        """Direct the next update to these rows, from this position."""
        for layer in self.layers:
            layer.rows, layer.length = rows, start

    def copy_first_row(self, length: int) -> None:
        """Copy row 0's first `length` positions (the shared prefix) to every row."""
        for layer in self.layers:
            layer.buf_k[1:, :, :length] = layer.buf_k[:1, :, :length]
            layer.buf_v[1:, :, :length] = layer.buf_v[:1, :, :length]

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)
