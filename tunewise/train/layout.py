"""How the examples of one micro-batch are laid out for a forward pass: the loop's exact speed-ups.

plain    one example per row, right-padded to the longest.
prefix   (training.share_prefix) the tokens every example of the batch starts with (system prompt,
         template head) are one extra row of length P that runs once; every example row attends to
         its keys and values. Gradients flow through the prefix once.
packed   (training.packing) several examples per row, positions restarting per example, attention only
         inside an example (a block-diagonal mask), so no token is padding.

Every layout computes the same loss and gradients as the plain one (tests/test_layout.py checks it in
float64): the shared prefix holds no loss target, and each token sees exactly the tokens it would see
alone. Targets are shifted here (position t predicts token t + 1 of the same example), so packed
examples never predict their neighbour's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import IGNORE, Tokenized

MIN_SHARED_PREFIX = 4  # below this the extra prefix row costs more than it saves
PACK_ROW_TOKENS = 256  # a packed row's capacity (or the longest example, if longer): attention cost grows with its square


@dataclass
class Layout:
    prefix_ids: torch.Tensor  # [P] tokens every example starts with (P = 0: none)
    input_ids: torch.Tensor  # [R, L] the examples' own tokens after the prefix
    position_ids: torch.Tensor  # [R, L]
    segments: torch.Tensor  # [R, L] the example's index in the batch, -1 = padding
    targets: torch.Tensor  # [R, L] the next token each position predicts, IGNORE where there is no loss
    slots: list[tuple[int, int, int]]  # per example: (row, start, length) of its tokens after the prefix
    n_loss: int
    n_tokens: int  # real tokens, the prefix counted once per example (as a plain batch holds them)

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.numel())

    def to(self, device) -> "Layout":
        move = {k: getattr(self, k).to(device) for k in ("prefix_ids", "input_ids", "position_ids", "segments", "targets")}
        return Layout(**move, slots=self.slots, n_loss=self.n_loss, n_tokens=self.n_tokens)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [R, 1, L, P + L]: every real token sees the prefix and the earlier tokens of its own
        example. A padding position sees only itself, so no row of the softmax is empty (an empty row gives NaN,
        and NaN times a zero gradient is still NaN)."""
        seg = self.segments
        rows, n = seg.shape
        idx = torch.arange(n, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        own = same & causal
        own |= torch.eye(n, dtype=torch.bool, device=seg.device)[None] & (seg[:, :, None] < 0)
        prefix = (seg >= 0)[:, :, None].expand(rows, n, self.prefix_len)
        allowed = torch.cat([prefix, own], dim=2)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def shifted_targets(ex: Tokenized) -> list[int]:
    """Position t is trained to predict token t + 1; the last position predicts nothing."""
    return ex.labels[1:] + [IGNORE]


def shared_prefix(examples: list[Tokenized]) -> int:
    """How many leading tokens the examples share and can run once: no position inside carries a target (the
    prefix row has no loss), and every example keeps at least one token of its own."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(e.input_ids) for e in examples) - 1
    for e in examples:
        t = shifted_targets(e)
        n = min(n, next((i for i, x in enumerate(t) if x != IGNORE), len(t)))
    p = 0
    while p < n and all(e.input_ids[p] == first[p] for e in examples):
        p += 1
    return p if p >= MIN_SHARED_PREFIX else 0


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, no row over capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def make_layout(examples: list[Tokenized], pad_id: int, share_prefix: bool = False, packing: bool = False,
                at_least: int = 0) -> Layout:
    """Lay out one micro-batch. `at_least`: a prefix length known to be valid for every example (the run's
    shared prefix, which the frozen-layer cache is keyed on): used even for a batch of one."""
    p = max(shared_prefix(examples) if share_prefix else 0, at_least)
    own = [len(e.input_ids) - p for e in examples]
    if packing:
        rows = _pack(own, max(max(own), PACK_ROW_TOKENS))
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(own[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    tgt = torch.full(shape, IGNORE, dtype=torch.long)
    slots: list[tuple[int, int, int]] = [(0, 0, 0)] * len(examples)
    for r, row in enumerate(rows):
        at = 0
        for i in sorted(row):  # batch order inside a row: the layout does not depend on the packer's ordering
            e, n = examples[i], own[i]
            ids[r, at : at + n] = torch.tensor(e.input_ids[p:])
            pos[r, at : at + n] = torch.arange(p, p + n)
            seg[r, at : at + n] = i
            tgt[r, at : at + n] = torch.tensor(shifted_targets(e)[p:])
            slots[i] = (r, at, n)
            at += n
    prefix_ids = torch.tensor(examples[0].input_ids[:p], dtype=torch.long)
    n_loss = int((tgt != IGNORE).sum())
    return Layout(prefix_ids, ids, pos, seg, tgt, slots, n_loss, sum(len(e.input_ids) for e in examples))
