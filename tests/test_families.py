"""Model families beyond the bundled one: Llama 3, Qwen2.5, Qwen3, Gemma 2, Gemma 3 (text), Mistral, Phi-3 and SmolLM3.

Each is a tiny random model built offline from its family's config class with the family's own settings (rope scaling,
tied heads, q/k norms, sliding windows, soft-capping, fused projections, NoPE layers) and the sizes scaled down. For
each: our training loss and gradients, with prefix sharing, packing and cached frozen layers on and off, equal the
cross-entropy of the model's own forward run one example at a time, in float64; or the family takes the plain path
and the reason is said. Every method finds its targets, and the engine's greedy answers equal `generate`.

Why the bound holds: float64 throughout (the RMSNorms too, models.norms_in_float64), so the only differences are
summation orders (prefix and rows in separate calls, packed rows, padded batches), ~1e-15 relative; a real mechanism
error (a wrong position, mask or cache entry) moves the loss by more than 1e-3 (tests/test_layout.py shows each)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunewise.data.tokenize import IGNORE, collate
from tunewise.models import norms_in_float64
from tunewise.train.forward import FrozenCache, LayoutLoss, fast_path_reason
from tunewise.train.layout import make_layout, shared_prefix
from tunewise.train.objectives.sft import TokenLoss

from .test_layout import examples, grads_of

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

# family -> (config class name, the family's own settings as its released config.json has them, fast path expected)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), True),  # Llama 3.2 1B
    "qwen2.5": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                                    sliding_window=32768), True),  # Qwen2.5 0.5B: biases on q, k, v
    "qwen3": ("Qwen3Config", dict(rope_theta=1000000.0, tie_word_embeddings=True, head_dim=32, use_sliding_window=False), True),
    "mistral": ("MistralConfig", dict(rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False), True),  # v0.3
    "phi3": ("Phi3Config", dict(rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False, pad_token_id=None,
                                bos_token_id=1, eos_token_id=2), True),  # fused qkv_proj, gate_up_proj
    "smollm3": ("SmolLM3Config", dict(rope_theta=2000000.0, tie_word_embeddings=True, no_rope_layer_interval=2,
                                      use_sliding_window=False, pad_token_id=None), True),  # NoPE every other layer
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                                    sliding_window=4096, head_dim=16), False),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=512, query_pre_attn_scalar=16, head_dim=16, rope_local_base_freq=10000.0,
                                        rope_theta=1000000.0), False),
    "mistral-swa": ("MistralConfig", dict(sliding_window=4096, tie_word_embeddings=False), False),  # v0.1: sliding windows
}


def build(family: str, tok, dtype=torch.float64):
    import transformers
    from transformers import AutoModelForCausalLM

    cls, own, _ = FAMILIES[family]
    cfg = getattr(transformers, cls)(vocab_size=len(tok), **SMALL, **own, initializer_range=0.2)  # large enough weights that attention
    # depends on position strongly (at 0.02 a position error moves the loss by ~1e-9 only)
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # transformers runs Gemma 2 in eager only
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    for name, p in model.named_parameters():  # biases and norm weights start at 0 or 1: make them count
        if name.endswith("bias") or "norm" in name:
            torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.2)
    norms_in_float64(model)
    return model


def reference(model, exs):
    """The model's own forward, one example at a time (no padding, no packing): summed cross-entropy of its targets."""
    total = 0.0
    for e in exs:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        keep = targets != IGNORE
        total = total + F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return total


def same(a, b):
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_loss_and_gradients_equal_the_family_forward_or_the_plain_path_says_why(family, smol_tokenizer):
    model = build(family, smol_tokenizer).train()
    for m in model.modules():  # dropout off (Phi-3 and Gemma configs carry some): the comparison is of the arithmetic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    exs = examples(smol_tokenizer)
    ref = reference(model, exs)
    g_ref = grads_of(model, ref)
    reason = fast_path_reason(model)
    expected_fast = FAMILIES[family][2]
    assert (reason is None) == expected_fast, reason
    plain = TokenLoss(model)(**collate(exs, smol_tokenizer.pad_token_id))
    assert same(plain, ref), f"{family}: plain padded batch {plain} != {ref}"
    g = grads_of(model, plain)
    assert g.keys() == g_ref.keys() and all(same(g[k], g_ref[k]) for k in g)
    if not expected_fast:
        print(f"{family}: plain path ({reason})")
        return
    for share, pack in ((True, False), (False, True), (True, True)):
        loss = LayoutLoss(model)(make_layout(exs, smol_tokenizer.pad_token_id, share_prefix=share, packing=pack))
        assert same(loss, ref), f"{family} share_prefix={share} packing={pack}: {loss} != {ref}"
        g = grads_of(model, loss)
        assert all(same(g[k], g_ref[k]) for k in g_ref), f"{family} share_prefix={share} packing={pack}: gradients differ"
    start = shared_prefix(exs)
    fn = LayoutLoss(model, first_trainable=1, cache=FrozenCache(start))
    keys = [("t", i) for i in range(len(exs))]
    for _ in range(2):  # fills the cache, then reads it
        loss = fn(make_layout(exs, smol_tokenizer.pad_token_id, share_prefix=True, packing=False, at_least=start), keys)
        assert same(loss, ref), f"{family} cached frozen layers: {loss} != {ref}"


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "qwen3", "mistral", "phi3", "smollm3", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "dora", "freeze", "full"])
def test_every_method_finds_its_targets(family, method, smol_tokenizer):
    from tunewise.config import TrainConfig
    from tunewise.train.methods import apply_method, count_params, decoder_layers

    model = build(family, smol_tokenizer, dtype=torch.float32)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in decoder_layers(model).modules())
    t = TrainConfig(method=method, trainable_layers=1)
    trained = apply_method(model, t)
    trainable, total = count_params(trained)
    assert 0 < trainable <= total
    if method in ("lora", "dora"):
        wrapped = [n for n, m in trained.named_modules() if hasattr(m, "lora_A") and "layers." in n]
        assert len(wrapped) == n_linear, f"{family}: {len(wrapped)} of {n_linear} decoder linears carry an adapter"
    if method == "freeze":
        last = decoder_layers(trained)[-1]
        assert all(p.requires_grad for p in last.parameters())
        assert not any(p.requires_grad for p in decoder_layers(trained)[0].parameters())


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "qwen3", "mistral", "phi3", "smollm3", "gemma2", "gemma3"])
def test_the_engine_answers_as_generate_does(family, smol_tokenizer):
    """Greedy decoding through the engine (shared prefix, KV buffer, finished rows dropped) equals transformers'
    generate, one conversation at a time."""
    from tunewise.engine import Engine
    from tunewise.models import Loaded

    model = build(family, smol_tokenizer, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = smol_tokenizer.eos_token_id
    eng = Engine(Loaded(model, smol_tokenizer, family, torch.device("cpu"), torch.float32), pack=False)
    convs = [[{"role": "system", "content": "Classify the intent."}, {"role": "user", "content": q}]
             for q in ("Where is my card?", "top up failed twice", "pin")]
    outs = eng.generate(convs, max_new_tokens=8, batch_size=3)
    for conv, out in zip(convs, outs):
        ids = smol_tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
        gen = gen.tolist()
        gen = gen[: gen.index(smol_tokenizer.eos_token_id)] if smol_tokenizer.eos_token_id in gen else gen
        assert out.text == smol_tokenizer.decode(gen, skip_special_tokens=True).strip(), family


ROUND_TRIP = ["llama3", "qwen2.5", "qwen3", "mistral", "phi3", "smollm3", "gemma2", "gemma3"]


def _saved_family(family, tok, path):
    model = build(family, tok, dtype=torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_an_adapter_saves_loads_merges_and_exports_per_family(family, smol_tokenizer, tmp_path):
    """A LoRA adapter on each family (its B matrices made non-zero, so it changes the output): saved and loaded back
    through the engine it computes the same logits, bit for bit; merged (`tunewise export`'s merged safetensors, loaded
    by transformers) within float32 rounding: W x + B (A x) and (W + B A) x sum in another order, ~1e-7 relative on logits
    of size ~1, so 1e-4 absolute holds with room, while a wrong merge moves them far more (a doubled lora_alpha: by ~9
    on Qwen3 and Phi-3, tried once)."""
    import json

    from transformers import AutoModelForCausalLM

    from tunewise.config import TrainConfig
    from tunewise.engine import Engine
    from tunewise.serve.export import export_model
    from tunewise.train.methods import apply_method

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = _saved_family(family, smol_tokenizer, base_dir)
    peft_model = apply_method(base, TrainConfig(method="lora"))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    ids = torch.tensor([smol_tokenizer("Where is my new card? It has not come.")["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
    peft_model.save_pretrained(adapter_dir)
    smol_tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "tunewise.json").write_text(json.dumps({"base_model": str(base_dir)}))
    from peft import PeftModel

    fresh = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    back = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, want), f"{family}: the adapter loaded back computes other logits"
    eng = Engine.load(str(base_dir), str(adapter_dir), device="cpu", dtype="float32")  # packs q/k/v on CPU: same sums, other order
    with torch.no_grad(), eng._adapter_ctx("default"):
        served = eng.model(input_ids=ids).logits
    assert torch.allclose(served, want, atol=1e-4, rtol=0), f"{family}: the engine's logits differ by {(served - want).abs().max():.2e}"
    done = export_model(adapter_dir, tmp_path / "export", f"{family}:1", merge=True, adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(done.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), f"{family}: merged logits differ by {(got - want).abs().max():.2e}"
    assert json.loads((Path(done.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_qlora_finds_its_targets_and_trains_only_the_adapters_per_family(family, smol_tokenizer, tmp_path):
    """QLoRA on each family: the decoder's linears load in 4-bit NF4 (bitsandbytes, on this CPU too), every one of them
    carries an adapter (Phi-3's fused qkv_proj and gate_up_proj included), and one optimiser step changes the adapter
    weights and leaves the 4-bit base weights bit-identical."""
    from tunewise.config import TrainConfig
    from tunewise.models import load_model
    from tunewise.train.methods import apply_method, decoder_layers

    _saved_family(family, smol_tokenizer, tmp_path / "base")
    loaded = load_model(str(tmp_path / "base"), device="cpu", dtype="float32", quantize_4bit=True)
    four_bit = [n for n, m in decoder_layers(loaded.model).named_modules() if type(m).__name__ == "Linear4bit"]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in decoder_layers(loaded.model).modules())
    assert four_bit and len(four_bit) == n_linear, f"{family}: {len(four_bit)} of {n_linear} decoder linears in 4 bits"
    model = apply_method(loaded.model, TrainConfig(method="qlora"))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "layers." in n]
    assert len(wrapped) == n_linear, f"{family}: {len(wrapped)} of {n_linear} 4-bit linears carry an adapter"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([smol_tokenizer("Where is my new card? It has not come.")["input_ids"]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items()), f"{family}: a frozen weight moved"
    assert any(not torch.equal(after[n], v) for n, v in trainable.items() if "lora_A" in n), f"{family}: no adapter weight moved"


def test_a_model_without_a_piece_or_an_adapter_on_another_base_is_a_clear_error_before_any_file(smol_tokenizer, tmp_path):
    """Bad input, each named: a decoder without its rotary embedding takes the plain path and says so; a tokenizer with no
    chat template is refused; an adapter trained on one base and pointed at another (Llama-shaped, then Qwen3 with
    head_dim 32: its q and k projections are twice as wide) is refused by the engine and by export, vLLM and GGUF, before any
    file is written."""
    import json

    from tunewise.engine import Engine
    from tunewise.models import ModelError, load_tokenizer
    from tunewise.serve.export import ExportError, export_gguf, export_model
    from tunewise.train.methods import apply_method
    from tunewise.config import TrainConfig

    model = build("llama3", smol_tokenizer)
    del model.model.rotary_emb
    assert "rotary_emb" in fast_path_reason(model)

    bare = tmp_path / "bare"
    smol_tokenizer.save_pretrained(bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(ModelError, match="tokenizer has no chat template"):
        load_tokenizer(str(bare))

    base = _saved_family("llama3", smol_tokenizer, tmp_path / "llama")
    adapter = tmp_path / "adapter"
    apply_method(base, TrainConfig(method="lora")).save_pretrained(adapter)
    smol_tokenizer.save_pretrained(adapter)
    _saved_family("qwen3", smol_tokenizer, tmp_path / "qwen3")
    (adapter / "tunewise.json").write_text(json.dumps({"base_model": str(tmp_path / "qwen3")}))
    misfit = r"adapter does not fit the base model .*qwen3 \(trained on another base\?\): its model\.layers\.\d\.self_attn\.[qk]_proj gives \d+ outputs, the model's takes 64 and gives \d+"
    with pytest.raises(ModelError, match=misfit):
        Engine.load(str(tmp_path / "qwen3"), str(adapter), device="cpu", dtype="float32")
    for export in (lambda out: export_model(adapter, out, "x:1"), lambda out: export_gguf(adapter, out, "x:1", pre="smollm")):
        with pytest.raises(ExportError, match=misfit):
            export(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (adapter / "tunewise.json").write_text(json.dumps({"base_model": str(tmp_path / "llama")}))
    assert Engine.load(str(tmp_path / "llama"), str(adapter), device="cpu", dtype="float32").adapters == ["default"]  # its own base fits
