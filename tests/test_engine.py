"""The generation engine: batched, left-padded greedy output equals one-at-a-time generate; adapters per request."""

import pytest
import torch

from tunewise.engine import Engine, LabelTrie
from tunewise.models import load_model

def single(eng, conv, max_new_tokens):
    """What one-at-a-time `model.generate` answers: (text, generated tokens, prompt tokens).

    `eng` may be an Engine or a plain `Loaded` model (the reference without any of the engine's changes).
    """
    tok = eng.tok if hasattr(eng, "tok") else eng.tokenizer
    model = eng.model
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    gen = ref[0, ids["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    gen = gen[: next((i for i, t in enumerate(gen) if t in eos), len(gen))]
    return tok.decode(gen, skip_special_tokens=True).strip(), len(gen), ids["input_ids"].shape[1]


CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France, please?"}],
    [{"role": "user", "content": "A much longer message " * 5}],
]


def test_batched_greedy_equals_single_generate(tiny_model):
    plain = load_model(str(tiny_model))  # transformers as shipped: no packed weights, its own generate
    eng = Engine(load_model(str(tiny_model)))
    outs = eng.generate(CONVS, max_new_tokens=8, batch_size=3)
    assert len({o.text for o in outs}) == len(CONVS)  # the model answers each prompt differently
    for conv, out in zip(CONVS, outs):
        text, n_gen, n_prompt = single(plain, conv, 8)
        assert out.text == text and out.prompt_tokens == n_prompt and out.completion_tokens == n_gen


@pytest.mark.parametrize("system", [None, "You are a careful banking assistant. Answer with one intent label only."])
def test_chunked_prefill_and_dropping_finished_rows_are_exact(tiny_model, monkeypatch, system):
    """Many rows of different lengths, prefilled in several chunks; rows end at different steps (extra end
    tokens), so finished rows are dropped from the batch mid-way. Every answer must equal generate's."""
    import tunewise.engine.prefill as engine_mod

    plain = load_model(str(tiny_model))
    eng = Engine(load_model(str(tiny_model)))
    head = [{"role": "system", "content": system}] if system else []
    convs = [head + [{"role": "user", "content": " ".join(f"w{i}" for i in range(n))}] for n in (1, 3, 5, 8, 13, 21, 2, 4, 9, 6)]
    free = []
    for conv in convs:  # what each row says with no stopping
        ids = plain.tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = plain.model.generate(**ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=plain.tokenizer.pad_token_id)
        free.append(out[0, ids["input_ids"].shape[1] :].tolist())
    eos = [plain.model.generation_config.eos_token_id] + sorted({free[r][r % 7 + 2] for r in range(0, len(convs), 2)})
    plain.model.generation_config.eos_token_id = eos
    eng.model.generation_config.eos_token_id = eos
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK_TOKENS", 24)
    outs = eng.generate(convs, max_new_tokens=10, batch_size=10)
    for conv, out in zip(convs, outs):
        text, n_gen, _ = single(plain, conv, 10)
        assert (out.text, out.completion_tokens) == (text, n_gen)
        assert out.finish_reason == ("stop" if n_gen < 10 else "length")
    lengths = [o.completion_tokens for o in outs]
    assert min(lengths) < 10 and len(set(lengths)) >= 3, lengths  # rows really ended at different steps


def test_identical_prompts_are_prefilled_once_and_answer_exactly(tiny_model, monkeypatch):
    """n samples of one prompt (GRPO's groups, serve's n): the distinct prompts are prefilled once and their cache copied
    to each copy. Greedy answers equal one-at-a-time generate; sampled ones equal the engine without the sharing."""
    import tunewise.engine.prefill as engine_mod

    plain = load_model(str(tiny_model))
    eng = Engine(load_model(str(tiny_model)))
    convs = [CONVS[1], CONVS[0], CONVS[1], CONVS[2], CONVS[1], CONVS[0]]
    calls = []
    real = engine_mod._unique_rows
    monkeypatch.setattr(engine_mod, "_unique_rows", lambda b: calls.append(real(b)) or calls[-1])
    outs = eng.generate(convs, max_new_tokens=8, batch_size=6)
    assert len(calls[0][0]) == 3 and calls[0][1] is not None  # three distinct prompts prefilled for six rows
    for conv, out in zip(convs, outs):
        text, n_gen, n_prompt = single(plain, conv, 8)
        assert (out.text, out.completion_tokens, out.prompt_tokens) == (text, n_gen, n_prompt)
    sampled = eng.generate(convs, max_new_tokens=8, temperature=1.0, seed=5, batch_size=6)
    monkeypatch.setattr(engine_mod, "_unique_rows", lambda b: (b, None))
    unshared = eng.generate(convs, max_new_tokens=8, temperature=1.0, seed=5, batch_size=6)
    assert [o.text for o in sampled] == [o.text for o in unshared]
    assert len({o.text for o, c in zip(sampled, convs) if c is CONVS[1]}) > 1  # the copies sample independently


def test_sampling_is_seeded(tiny_model):
    eng = Engine(load_model(str(tiny_model)))
    a = eng.generate(CONVS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = eng.generate(CONVS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = eng.generate(CONVS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert [o.text for o in a] == [o.text for o in b] != [o.text for o in c]


def test_adapter_selected_per_request(tiny_project, tmp_path):
    from tunewise.config import load_config
    from tunewise.train.loop import train

    cfg = load_config(tiny_project(max_steps=6, learning_rate=5e-2))
    r = train(cfg, tmp_path / "run", progress=False)
    eng = Engine.load(cfg.model.name, r.model_dir)
    base_only = Engine(load_model(cfg.model.name)).generate(CONVS, max_new_tokens=6)
    base = eng.generate(CONVS, max_new_tokens=6, adapter=None)
    tuned = eng.generate(CONVS, max_new_tokens=6, adapter="default")
    assert [o.text for o in base] == [o.text for o in base_only]
    assert [o.text for o in tuned] != [o.text for o in base]
    try:
        eng.generate(CONVS[:1], adapter="nope")
        raise AssertionError("unknown adapter must fail")
    except KeyError as e:
        assert "nope" in str(e)


def test_shared_prefix_path_equals_single_generate(tiny_model):
    """Prompts with a long common system prompt take the prefix-cache path; answers must not change."""
    from tunewise.engine.prefill import MIN_SHARED_PREFIX, _common_prefix

    eng = Engine(load_model(str(tiny_model)))
    system = {"role": "system", "content": "You are a careful banking assistant. Answer with one intent label only."}
    convs = [[system, {"role": "user", "content": q}] for q in ("card?", "Where is my new card that I ordered", "pin blocked", "hello there")]
    prompts = eng._prompts(convs)
    assert _common_prefix(prompts) - 1 >= MIN_SHARED_PREFIX
    outs = eng.generate(convs, max_new_tokens=8, batch_size=4)
    plain = load_model(str(tiny_model))
    for conv, out in zip(convs, outs):
        text, n_gen, _ = single(plain, conv, 8)
        assert out.text == text and out.completion_tokens == n_gen


def test_shared_prefix_path_is_exact_with_an_adapter(tiny_project, tmp_path, monkeypatch):
    import tunewise.engine.prefill as engine_mod
    from tunewise.config import load_config
    from tunewise.train.loop import train

    cfg = load_config(tiny_project(max_steps=4, learning_rate=5e-2))
    r = train(cfg, tmp_path / "run", progress=False)
    eng = Engine.load(cfg.model.name, r.model_dir)
    system = {"role": "system", "content": cfg.data.system_prompt + " Reply with the label."}
    convs = [[system, {"role": "user", "content": q}] for q in ("card?", "Where is my new card", "pin blocked")]
    with_prefix = [o.text for o in eng.generate(convs, max_new_tokens=6, adapter="default")]
    monkeypatch.setattr(engine_mod, "MIN_SHARED_PREFIX", 10**9)  # force plain left padding
    plain = [o.text for o in eng.generate(convs, max_new_tokens=6, adapter="default")]
    base = [o.text for o in eng.generate(convs, max_new_tokens=6, adapter=None)]
    assert with_prefix == plain and with_prefix != base


def test_reference_nll_matches_a_hand_computed_forward(tiny_model):
    import torch.nn.functional as F

    from tunewise.data.tokenize import tokenize_messages

    eng = Engine(load_model(str(tiny_model)))
    conv = [{"role": "user", "content": "Where is my card?"}]
    (nll, n), = eng.reference_nll([conv], ["card_arrival"])
    ids, labels = tokenize_messages(eng.tok, conv + [{"role": "assistant", "content": "card_arrival"}])
    logits = eng.model(input_ids=torch.tensor([ids])).logits[0, :-1]
    expected = F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")
    assert n == sum(x != -100 for x in labels) and abs(nll - float(expected)) < 1e-3
    # Batched with a longer and a shorter item: padding must not change the score.
    batch = eng.reference_nll([conv, [{"role": "user", "content": "a much longer question " * 6}], [{"role": "user", "content": "x"}]],
                              ["card_arrival", "y", "z"], batch_size=3)
    assert abs(batch[0][0] - nll) < 1e-3


LABELS = ["card", "card_arrival", "card_linking", "cancel_transfer", "exchange_rate", "Refund_not_showing_up", "reverted_card_payment?"]


def _reference_constrained(plain, conv, choices):
    """Greedy decoding restricted to the choices, one full forward per token (no cache, no trie): at each
    step the allowed tokens are those that continue some choice's tokens, plus end-of-turn once the tokens
    so far are a whole choice; decoding ends once a single choice is left (or end-of-turn is picked)."""
    tok, model = plain.tokenizer, plain.model
    seqs = {c: tok.encode(c, add_special_tokens=False) for c in choices}
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
    out: list[int] = []
    while True:
        live = [c for c, s in seqs.items() if s[: len(out)] == out]
        if len(live) == 1 and (len(out) > 0):
            return live[0]
        allowed = {seqs[c][len(out)] for c in live if len(seqs[c]) > len(out)}
        if any(seqs[c] == out for c in live):
            allowed |= set(eos)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        mask = torch.full_like(logits, float("-inf"))
        mask[sorted(allowed)] = 0
        t = int((logits + mask).argmax())
        if t in eos:
            return tok.decode(out)
        out.append(t)


def test_constrained_decoding_answers_only_labels_and_equals_the_reference(tiny_model):
    plain = load_model(str(tiny_model))
    eng = Engine(load_model(str(tiny_model)))
    convs = CONVS + [[{"role": "user", "content": f"message number {i}"}] for i in range(6)]
    free = eng.generate(convs, max_new_tokens=8, batch_size=4)
    assert not any(o.text in LABELS for o in free)  # the random model never answers a label by itself
    calls = []
    hook = eng.model.register_forward_hook(lambda *a: calls.append(1))
    outs = eng.generate(convs, max_new_tokens=2, batch_size=4, choices=LABELS)  # max_new_tokens too short: extended
    fast = len(calls)
    assert all(o.text in LABELS and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert [o.text for o in outs] == [_reference_constrained(plain, c, LABELS) for c in convs]
    # a row stops as soon as its answer is told apart from the others: without that, more forward passes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LabelTrie, "only", lambda self, node: None)
        calls.clear()
        assert [o.text for o in eng.generate(convs, max_new_tokens=2, batch_size=4, choices=LABELS)] == [o.text for o in outs]
    hook.remove()
    assert fast < len(calls), (fast, len(calls))
    # a single choice needs no decode step at all beyond the prefill
    assert {o.text for o in eng.generate(convs[:2], choices=["exchange_rate"])} == {"exchange_rate"}


@pytest.mark.parametrize("choices,match", [([], "empty"), (["ok", ""], "non-empty"), ([f"l{i}" for i in range(10_001)], "at most")])
def test_choice_lists_that_cannot_be_enforced_are_refused(tiny_model, choices, match):
    from tunewise.engine import ChoiceError

    eng = Engine(load_model(str(tiny_model)))
    with pytest.raises(ChoiceError, match=match):
        eng.generate(CONVS[:1], choices=choices)


def test_grammar_constrained_decoding_follows_a_json_schema_and_a_regex(tiny_model):
    """xgrammar through our decode loop: every answer of a random model is valid for the schema (free-form values)
    or the regex, sampled or greedy, and a grammar that does not compile is a ChoiceError naming its kind."""
    import json
    import re

    import pytest

    from tunewise.engine import ChoiceError, Engine

    eng = Engine.load(str(tiny_model))
    schema = {"type": "object", "properties": {"ticket": {"type": "integer", "minimum": 0, "maximum": 999}, "urgent": {"type": "boolean"},
                                               "team": {"type": "string", "maxLength": 6}}, "required": ["ticket", "urgent", "team"],
              "additionalProperties": False}
    convs = [[{"role": "user", "content": f"ticket {i}?"}] for i in range(6)]
    for temperature in (0.0, 1.0):
        outs = eng.generate(convs, max_new_tokens=48, temperature=temperature, seed=1, grammar=("json_schema", json.dumps(schema)))
        for o in outs:
            v = json.loads(o.text)
            assert o.finish_reason == "stop" and set(v) == {"ticket", "urgent", "team"} and 0 <= v["ticket"] <= 999 and len(v["team"]) <= 6
    outs = eng.generate(convs, max_new_tokens=12, temperature=1.0, seed=2, grammar=("regex", r"T-[0-9]{3} (yes|no)"))
    assert all(re.fullmatch(r"T-[0-9]{3} (yes|no)", o.text) for o in outs), [o.text for o in outs]
    with pytest.raises(ChoiceError, match="regex: cannot be compiled"):
        eng.generate(convs[:1], max_new_tokens=4, grammar=("regex", "([a-z"))


def test_the_stop_check_decodes_only_the_tail_and_stops_where_the_whole_answer_would(smol_tokenizer):
    """engine.stopped looks at the last stop_window tokens: over random answers (multi-byte characters and spaces
    included) it first fires at the same token as decoding the whole answer does."""
    import random

    from tunewise.engine import stop_window, stopped

    rng = random.Random(0)
    words = ["card", " top", " up", "\n\n", " ünïcode", " 日本語", " 🙂", "###", " Stop", "END", ".", " the", "</s", ">"]
    checked = 0
    for trial in range(200):
        stop = rng.sample(["\n\n", "###", "END", " 日本", "🙂", "</s>"], 2)
        text = "".join(rng.choice(words) for _ in range(40))
        ids = smol_tokenizer.encode(text, add_special_tokens=False)
        window = stop_window(stop)
        full = next((k for k in range(1, len(ids) + 1) if any(s in smol_tokenizer.decode(ids[:k]) for s in stop)), None)
        tail = next((k for k in range(1, len(ids) + 1) if stopped(smol_tokenizer, ids[:k], stop, window)), None)
        assert tail == full, (stop, text)
        checked += full is not None
    assert checked > 150  # most answers do hit a stop string


def test_reference_nll_with_the_shared_prefix_equals_each_item_alone(tiny_model):
    """A batch shares its system prompt and template head (run once, its cache copied to every row): every item's NLL
    equals its own unbatched, unshared forward, in float64 (norms included) to 1e-9."""
    import torch.nn.functional as F

    from tunewise.data.tokenize import tokenize_messages

    eng = Engine(load_model(str(tiny_model), dtype="float64"), pack=False)
    system = {"role": "system", "content": "Classify the online-banking customer message into its intent."}
    convs = [[system, {"role": "user", "content": q}] for q in ("Where is my card?", "x", "How do I top up by bank transfer? " * 4, "pin")]
    refs = ["card_arrival", "y", "top_up_by_bank_transfer_charge", "change_pin"]
    got = eng.reference_nll(convs, refs, batch_size=4)
    for conv, ref, (nll, n) in zip(convs, refs, got):
        ids, labels = tokenize_messages(eng.tok, conv + [{"role": "assistant", "content": ref}])
        logits = eng.model(input_ids=torch.tensor([ids])).logits[0, :-1]
        want = F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")
        assert n == sum(x != -100 for x in labels) and abs(nll - float(want)) < 1e-9


# The engine's parts, one at a time (prefill.py, decode.py, constraints.py).

def test_prefill_gives_each_row_the_logits_of_its_whole_prompt(tiny_model):
    """Duplicates prefilled once, a shared prefix run once, the rest in chunks: each row's next-token logits equal
    one forward of that row's whole prompt. float64 (model.dtype), so the bound is float64 rounding of the
    different summation order (prefix and suffix in separate calls), far below any real difference (~1e-2)."""
    from tunewise.engine.prefill import prefill_rows, shared_length

    loaded = load_model(str(tiny_model), dtype="float64")
    tok, model = loaded.tokenizer, loaded.model.eval()
    head = [{"role": "system", "content": "You are a careful banking assistant."}]
    convs = [head + [{"role": "user", "content": q}] for q in ("card?", "card?", "Where is my new card", "pin blocked please")]
    prompts = sorted((tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for c in convs),
                     key=len)
    assert shared_length(prompts) > 0  # the prefix pass is taken
    with torch.no_grad():
        pre = prefill_rows(model, prompts, tok.pad_token_id, torch.device("cpu"), model.config.num_hidden_layers, 4)
        for row, p in enumerate(prompts):
            want = model(input_ids=torch.tensor([p])).logits[0, -1]
            assert torch.allclose(pre.logits[row], want, atol=1e-10, rtol=0)
    assert pre.next_pos.tolist() == [len(p) for p in prompts] and pre.prompts == prompts


def test_a_row_ends_on_end_of_turn_or_a_stop_string_and_keeps_its_tokens(smol_tokenizer):
    """The per-row state: end-of-turn ends the row without its token; a stop string ends it after the token that
    completes it; other tokens are appended and reported."""
    import time

    from tunewise.engine.decode import RowState, Step, advance, stop_window

    tok = smol_tokenizer
    seen = []
    s = Step(8, 0.0, 1.0, torch.Generator(), eos={tok.eos_token_id}, stop=["END"], on_token=lambda row, ids: seen.append(list(ids)))
    window = stop_window(s.stop)
    st = RowState()
    for t in tok.encode("hello there", add_special_tokens=False):
        advance(tok, st, 0, t, s, time.time(), window)
    assert not st.finished and tok.decode(st.ids) == "hello there" and seen[-1] == st.ids
    advance(tok, st, 0, tok.eos_token_id, s, time.time(), window)
    assert st.finished and st.reason == "stop" and tok.eos_token_id not in st.ids
    st = RowState()
    for t in tok.encode("a b END c", add_special_tokens=False):
        if not st.finished:
            advance(tok, st, 0, t, s, time.time(), window)
    assert st.finished and tok.decode(st.ids).endswith("END")


def test_a_label_trie_allows_only_continuations_and_fills_in_a_single_answer_left(smol_tokenizer):
    from tunewise.engine.constraints import LabelTrie, TrieRows

    tok = smol_tokenizer
    labels = ["card_arrival", "card_linking", "cash_withdrawal"]
    trie = LabelTrie(tok, labels)
    rows = TrieRows(trie, 2, eos={tok.eos_token_id})
    logits = torch.zeros(2, len(tok))
    masked = rows.mask(logits, [0, 1])
    firsts = {tok.encode(x, add_special_tokens=False)[0] for x in labels}
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == firsts
    cash = tok.encode("cash_withdrawal", add_special_tokens=False)
    rest = rows.accept(1, cash[0])  # only one label starts this way: the rest comes without model steps
    assert rest == cash[1:]
    card = tok.encode("card_arrival", add_special_tokens=False)
    if card[0] == tok.encode("card_linking", add_special_tokens=False)[0]:
        assert rows.accept(0, card[0]) is None  # two labels still possible
    assert not rows.complete(0)
