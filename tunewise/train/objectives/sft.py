"""Supervised fine-tuning: the summed cross-entropy of the answer tokens (the assistant-only loss mask).

Where the model is Llama-shaped the loss runs through LayoutLoss (forward.py): the batch's shared prefix once,
examples packed without padding, the head only at loss positions, and under `freeze` the frozen layers once per
example (all exact). Otherwise the plain TokenLoss over padded rows.
"""

from __future__ import annotations

import os

import torch

from ...data.tokenize import IGNORE, collate
from ..forward import FrozenCache, LayoutLoss, fast_path_reason, llama_parts, summed_cross_entropy
from ..layout import make_layout, shared_prefix
from ..methods import decoder_layers
from .base import Context, Objective, Setup, padded_stats


class TokenLoss(torch.nn.Module):
    """Summed cross-entropy over loss tokens of a batch; the head runs only where labels are set."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        self.sparse = not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))
        self._base = [base]  # a list keeps it out of the module tree (it is already inside self.model)

    def forward(self, input_ids, attention_mask, labels):
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.sparse:
            base = self._base[0]
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
        return summed_cross_entropy(logits, targets[keep])


class Batches:
    """Micro-batches as the loss module takes them: (Layout, keys) for LayoutLoss, padded dicts otherwise.

    The layout options come from the config; `start` is the prefix every example of the run shares, which
    the frozen cache is keyed on (0 when prefixes are not shared)."""

    def __init__(self, t, pad_id: int, device, layouts: bool, start: int):
        self.t, self.pad_id, self.device, self.layouts, self.start = t, pad_id, device, layouts, start

    def make(self, examples, keys):
        if not self.layouts:
            return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}
        layout = make_layout(examples, self.pad_id, self.t.share_prefix, self.t.packing, at_least=self.start)
        return layout.to(self.device), keys

    def sorted_batches(self, examples, tag: str, batch_size: int):
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        return [self.make([examples[i] for i in order[k : k + batch_size]], [(tag, i) for i in order[k : k + batch_size]])
                for k in range(0, len(order), batch_size)]


def cache_limit_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 * 2**30


def frozen_cache(model, t, examples, start: int, notes: list[str]) -> tuple[int, FrozenCache | None]:
    """(first trainable layer, cache) when `freeze` can run its frozen layers once per example; (0, None) otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    n_layers = len(decoder_layers(base))
    dropout = max(float(getattr(cfg, k, 0.0) or 0.0) for k in ("attention_dropout", "hidden_dropout", "resid_pdrop"))
    tokens = sum(len(e.input_ids) - start for e in examples)
    nbytes = tokens * cfg.hidden_size * base.dtype.itemsize
    limit = cache_limit_bytes()
    if dropout:
        notes.append(f"cache_frozen: off (the frozen layers have dropout {dropout})")
        return 0, None
    if nbytes > limit:
        notes.append(f"cache_frozen: off ({nbytes / 2**30:.1f} GiB of hidden states > {limit / 2**30:.1f} GiB, a quarter of memory)")
        return 0, None
    first = n_layers - t.trainable_layers
    notes.append(f"cache_frozen: layers 0-{first - 1} run once per example ({nbytes / 2**20:.0f} MiB of hidden states)")
    return first, FrozenCache(start)


class Sft(Objective):
    name = "sft"
    idle_rows = True
    closed_set_freeze = True

    def setup(self, ctx: Context) -> Setup:
        """LayoutLoss (prefix sharing, packing, frozen cache) where the model allows it, else the plain TokenLoss."""
        t, model = ctx.t, ctx.model
        pad = ctx.loaded.tokenizer.pad_token_id
        if llama_parts(model) is None:
            if t.share_prefix or t.packing or (t.method == "freeze" and t.cache_frozen):
                ctx.notes.append(f"share_prefix/packing/cache_frozen: off ({fast_path_reason(model)}; plain padded batches)")
            return Setup(TokenLoss(model), Batches(t, pad, ctx.device, False, 0), ctx.train_ex, ctx.val_ex)
        start = shared_prefix(ctx.train_ex + ctx.val_ex) if t.share_prefix else 0
        first, cache = 0, None
        if t.method == "freeze" and t.cache_frozen:
            first, cache = frozen_cache(model, t, ctx.train_ex + ctx.val_ex, start, ctx.notes)
        return Setup(LayoutLoss(model, first, cache), Batches(t, pad, ctx.device, True, start), ctx.train_ex, ctx.val_ex,
                     start=start, cache=cache)

    def stats(self, b) -> tuple[int, int, int]:
        """A shared prefix is computed once but counted once per example as a real token, as the peers count it."""
        if isinstance(b, tuple):
            lay = b[0]
            return lay.n_tokens, lay.prefix_len + lay.input_ids.numel(), lay.input_ids.shape[0] + (1 if lay.prefix_len else 0)
        return padded_stats(b)
