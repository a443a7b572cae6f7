"""The loop's exact speed-ups (shared prefix, packing, cached frozen layers) compute the same loss and the
same gradients as the plain batch, in float64 on a tiny model; and each comparison is sensitive: the same
layout with its mechanism broken (positions not restarted, no block-diagonal mask, a wrong prefix, a
shifted cache entry) gives a different loss."""

import pytest
import torch

from tunewise.data.records import Record
from tunewise.data.tokenize import IGNORE, collate, tokenize_records
from tunewise.train.forward import FrozenCache, LayoutLoss
from tunewise.train.layout import make_layout, shared_prefix
from tunewise.train.loop import TokenLoss

TEXTS = [("I am still waiting on my card?", "card_arrival"), ("How do I top up by bank transfer?", "top_up_by_bank_transfer_charge"),
         ("my card got eaten by the ATM", "card_swallowed"), ("What's the exchange rate?", "exchange_rate"),
         ("Can I change my PIN at a cash machine, or do I need to go to the branch?", "change_pin")]


def examples(tok, multi_turn=True):
    sys = {"role": "system", "content": "Classify the intent."}
    recs = [Record([sys, {"role": "user", "content": u}, {"role": "assistant", "content": a}], f"t:{i}") for i, (u, a) in enumerate(TEXTS)]
    if multi_turn:  # two answers trained in one conversation
        recs.append(Record([sys, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
                            {"role": "user", "content": "card not here"}, {"role": "assistant", "content": "card_arrival"}], "t:mt"))
    exs, _ = tokenize_records(tok, recs, 128)
    return exs


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain(model, exs, pad):
    return TokenLoss(model)(**collate(exs, pad))


def same(a, b, rtol=1e-10):
    return torch.allclose(a, b, rtol=rtol, atol=1e-12)


def test_shared_prefix_stops_before_the_first_target(tiny64):
    _, tok = tiny64
    exs = examples(tok)
    p = shared_prefix(exs)
    assert p >= 4
    assert all(t == IGNORE for e in exs for t in e.labels[: p + 1])
    assert tok.decode(exs[0].input_ids[:p]).startswith("<|im_start|>system\nClassify the intent.")
    assert shared_prefix(exs[:1]) == 0


@pytest.mark.parametrize("share_prefix,packing", [(False, False), (True, False), (False, True), (True, True)])
def test_layout_loss_and_gradients_equal_the_plain_batch(tiny64, share_prefix, packing):
    model, tok = tiny64
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    exs = examples(tok)
    ref = plain(model, exs, tok.pad_token_id)
    g_ref = grads_of(model, ref)
    layout = make_layout(exs, tok.pad_token_id, share_prefix=share_prefix, packing=packing)
    assert layout.n_loss == sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for e in exs)
    if packing:
        assert layout.input_ids.shape[0] < len(exs)  # several examples per row
    if share_prefix:
        assert layout.prefix_len >= 4
    loss = LayoutLoss(model)(layout)
    assert same(loss, ref)
    g = grads_of(model, loss)
    assert g.keys() == g_ref.keys() and all(same(g[k], g_ref[k]) for k in g)


def test_a_broken_layout_is_detected(tiny64):
    """Negative controls: each mechanism, broken, changes the loss, so the equalities above can fail."""
    model, tok = tiny64
    exs = examples(tok)
    ref = plain(model, exs, tok.pad_token_id).detach()
    fn = LayoutLoss(model)
    with torch.no_grad():
        packed = make_layout(exs, tok.pad_token_id, share_prefix=True, packing=True)
        no_restart = make_layout(exs, tok.pad_token_id, share_prefix=True, packing=True)
        no_restart.position_ids = torch.arange(packed.input_ids.shape[1])[None].expand_as(packed.position_ids) + packed.prefix_len
        assert not same(fn(no_restart), ref)
        leaky = make_layout(exs, tok.pad_token_id, share_prefix=True, packing=True)
        leaky.segments = torch.where(packed.segments >= 0, 0, -1)  # one causal block per row: examples see their neighbours
        assert not same(fn(leaky), ref)
        wrong_prefix = make_layout(exs, tok.pad_token_id, share_prefix=True)
        wrong_prefix.prefix_ids = wrong_prefix.prefix_ids.roll(1)
        assert not same(fn(wrong_prefix), ref)
        assert same(fn(packed), ref)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_cached_frozen_layers_equal_the_full_pass(tiny64, share_prefix):
    model, tok = tiny64
    model.train()
    layers = model.model.layers
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(layers[1].parameters()) + list(model.model.norm.parameters()):
        p.requires_grad_(True)
    exs = examples(tok)
    ref = plain(model, exs, tok.pad_token_id)
    start = shared_prefix(exs) if share_prefix else 0
    cache = FrozenCache(start)
    fn = LayoutLoss(model, first_trainable=1, cache=cache)
    keys = list(range(len(exs)))
    for order in (keys, keys[::-1], keys[1:4], [2]):  # fills the cache, then batches of other shapes read it back
        sub = [exs[i] for i in order]
        layout = make_layout(sub, tok.pad_token_id, share_prefix=share_prefix, packing=True, at_least=start)
        filled = cache.has(order)
        loss = fn(layout, order)
        r = plain(model, sub, tok.pad_token_id)
        g_r = grads_of(model, r)
        assert same(loss, r), f"cache {'read' if filled else 'filled'}: {loss} != {r}"
        g = grads_of(model, loss)
        assert g.keys() == g_r.keys() and all(same(g[k], g_r[k]) for k in g)
        assert not any(n.startswith("model.layers.0.") for n in g)
    assert same(fn(make_layout(exs, tok.pad_token_id, share_prefix=share_prefix), keys), ref)
    assert len(cache.states) == len(exs) and cache.nbytes() > 0
    # negative control: an entry read back one position off changes the loss
    cache.states[0] = cache.states[0].roll(1, dims=0)
    with torch.no_grad():
        assert not same(fn(make_layout(exs, tok.pad_token_id, share_prefix=share_prefix), keys), ref)
