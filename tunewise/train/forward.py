"""The training forward pass, layer by layer, over a Layout: the summed token loss of a micro-batch.

Why not `model(input_ids, labels)`: it runs the 49k-vocabulary head at every position, pads every row,
runs the shared prefix once per example and recomputes frozen layers that never change. Here:
  * the head (and the final norm) run only where a target is set, which is exact for models whose
    logits are lm_head(norm(hidden));
  * the prefix row runs once per batch and its keys/values are broadcast to every example row;
  * packed rows restart positions per example and attend only inside it;
  * with `freeze`, the hidden states entering the first trainable layer are computed once per example
    (no gradient, the frozen layers in eval mode) and reused every epoch (FrozenCache), so later epochs
    cost only the trainable layers.
It calls the model's own decoder layers (so LoRA/DoRA wrappers inside them work unchanged). Models
that are not Llama-shaped (embed_tokens, layers, norm, rotary_emb, lm_head) use the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE
from .layout import Layout


# The model types whose decoder our layer-by-layer forward reproduces exactly, each proven in float64 against the model's
# own forward (tests/test_families.py): embeddings -> layers(position_embeddings) -> final norm -> head, with nothing
# else in the model's forward. Any other type takes the plain path, with the reason.
EXACT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3")


def fast_path_reason(model) -> str | None:
    """Why our layer-by-layer forward (prefix sharing, packing, cached frozen layers) is not used for this model, or
    None when it is: it is used only where it is exact."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    decoder = getattr(base, "model", None)
    kind = getattr(cfg, "model_type", "?")
    if kind not in EXACT_TYPES:
        return f"model type {kind} is not one whose layer-by-layer forward is proven exact ({', '.join(EXACT_TYPES)})"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return "the logits are soft-capped or scaled after the head"
    if cfg._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {cfg._attn_implementation} (the layout masks need sdpa or eager)"
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (window and getattr(cfg, "use_sliding_window", True) is not False
                                                           and not layer_types):
        return f"sliding-window attention (window {window}; the layout masks are full causal)"
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the decoder has no embed_tokens, layers, norm and rotary_emb"
    if base.get_output_embeddings() is None:
        return "no output head"
    return None


def llama_parts(model):
    """(decoder, head) when our layer-by-layer forward is exact for the model (fast_path_reason); else None."""
    if fast_path_reason(model) is not None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


class _PrefixKV:
    """Keys/values of the prefix row, per layer, prepended to every example row's own (the Cache duck type
    the attention layers call). With `record`, a layer's keys/values are kept (the prefix pass)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.record = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.k[layer_idx], self.v[layer_idx] = key_states, value_states
            return key_states, value_states
        rows = key_states.shape[0]
        k = torch.cat([self.k[layer_idx].expand(rows, -1, -1, -1), key_states], dim=2)
        v = torch.cat([self.v[layer_idx].expand(rows, -1, -1, -1), value_states], dim=2)
        return k, v


class FrozenCache:
    """Hidden states entering the first trainable layer, per example: they depend on frozen weights only.

    An example's entry holds its positions from `start` on, where `start` is the prefix every example of the
    run shares (its states are kept once, in `prefix`). Entries stay on the model's device and dtype, so a
    cached pass computes exactly what the full pass does.
    """

    def __init__(self, start: int):
        self.start = start
        self.prefix: torch.Tensor | None = None  # [start, H]
        self.states: dict[int, torch.Tensor] = {}

    def has(self, keys) -> bool:
        return all(k in self.states for k in keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def store(self, keys, layout: Layout, prefix_h: torch.Tensor | None, rows_h: torch.Tensor) -> None:
        p = layout.prefix_len
        if self.start and self.prefix is None:
            self.prefix = prefix_h[0, : self.start].detach().clone()
        for key, (r, a, n) in zip(keys, layout.slots):
            own = rows_h[r, a : a + n]
            if p > self.start:
                own = torch.cat([prefix_h[0, self.start : p], own])
            self.states[key] = own.detach().clone()

    def load(self, keys, layout: Layout, hidden: int, dtype, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        p = layout.prefix_len
        first = self.states[keys[0]]
        prefix_h = None
        if p:
            parts = ([self.prefix] if self.start else []) + [first[: p - self.start]]
            prefix_h = torch.cat(parts)[None]
        rows_h = torch.zeros(*layout.input_ids.shape, hidden, dtype=dtype, device=device)
        for key, (r, a, n) in zip(keys, layout.slots):
            rows_h[r, a : a + n] = self.states[key][p - self.start :]
        return prefix_h, rows_h


class LayoutLoss(torch.nn.Module):
    """Summed cross-entropy of a Layout's targets. `first_trainable` > 0 with a FrozenCache: the layers below
    it run once per example, without gradient."""

    def __init__(self, model, first_trainable: int = 0, cache: FrozenCache | None = None):
        super().__init__()
        self.model = model
        parts = llama_parts(model)
        if parts is None:
            raise ValueError("this model is not Llama-shaped; use the plain loss")
        self._parts = [parts]  # a list keeps them out of the module tree (they are inside self.model)
        self.first_trainable = first_trainable
        self.cache = cache

    def _run(self, layers, mask, prefix_h, rows_h, layout: Layout):
        decoder = self._parts[0][0]
        kv = None
        if prefix_h is not None:
            kv = _PrefixKV()
            ppos = torch.arange(layout.prefix_len, device=rows_h.device)[None]
            pmask = torch.zeros(1, 1, layout.prefix_len, layout.prefix_len, dtype=mask.dtype, device=mask.device)
            pmask.masked_fill_(~torch.ones_like(pmask, dtype=torch.bool).tril_(), torch.finfo(mask.dtype).min)
            pemb = decoder.rotary_emb(prefix_h, position_ids=ppos)
        emb = decoder.rotary_emb(rows_h, position_ids=layout.position_ids)
        for layer in layers:
            if kv is not None:
                kv.record = True
                prefix_h = layer(prefix_h, attention_mask=pmask, position_ids=ppos, past_key_values=kv, position_embeddings=pemb)
                kv.record = False
            rows_h = layer(rows_h, attention_mask=mask, position_ids=layout.position_ids, past_key_values=kv, position_embeddings=emb)
        return prefix_h, rows_h

    def forward(self, layout: Layout, keys: list | None = None) -> torch.Tensor:
        hidden, keep = self._target_hidden(layout, keys)
        return summed_cross_entropy(self._parts[0][1](hidden), layout.targets[keep])

    def target_logps(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-prob of every target token (flat, row-major) and the example (its index in the batch) of each:
        what a policy-gradient loss weights per example (GRPO's advantages)."""
        hidden, keep = self._target_hidden(layout, None)
        logits = self._parts[0][1](hidden)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return -F.cross_entropy(logits, layout.targets[keep], reduction="none"), layout.segments[keep]

    def _target_hidden(self, layout: Layout, keys: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final-normed hidden states at the positions that carry a target, and where those are."""
        decoder, head = self._parts[0]
        layers = list(decoder.layers[: decoder.config.num_hidden_layers])
        dtype = decoder.embed_tokens.weight.dtype
        mask = layout.attention_mask(dtype)
        k = self.first_trainable
        if self.cache is not None and keys is not None and self.cache.has(keys):
            prefix_h, rows_h = self.cache.load(keys, layout, decoder.config.hidden_size, dtype, layout.input_ids.device)
        else:
            prefix_h = decoder.embed_tokens(layout.prefix_ids)[None] if layout.prefix_len else None
            rows_h = decoder.embed_tokens(layout.input_ids)
            if k:
                with torch.no_grad():
                    training = [m.training for m in layers[:k]]
                    for m in layers[:k]:
                        m.eval()
                    prefix_h, rows_h = self._run(layers[:k], mask, prefix_h, rows_h, layout)
                    for m, t in zip(layers[:k], training):
                        m.train(t)
                if self.cache is not None and keys is not None:
                    self.cache.store(keys, layout, prefix_h, rows_h)
        _, rows_h = self._run(layers[k:], mask, prefix_h, rows_h, layout)
        keep = layout.targets != IGNORE
        return decoder.norm(rows_h[keep]), keep


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """In at least float32 (bf16 logits lose the loss's precision); float64 stays float64 (exactness tests)."""
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="sum")
