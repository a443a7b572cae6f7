"""GGUF and Ollama export: what is written loads back through an implementation that is not ours (transformers' GGUF
loader) and computes what the trained model computes; the Modelfile's TEMPLATE renders what the chat template
renders; every refusal comes before any file is written."""

import json
import random

import numpy as np
import pytest
import torch
import yaml

from tunewise.models import load_model


def _load_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))


CONV = [{"role": "system", "content": "Classify the intent."}, {"role": "user", "content": "Where is my new card?"}]


def _export(model_dir, tmp_path, quant, **kw):
    from tunewise.serve.export import export_gguf

    return export_gguf(model_dir, tmp_path / f"out-{quant}", "tiny:1", quant=quant, pre="smollm", **kw)


def test_an_f32_gguf_loads_back_exactly_and_f16_q8_0_within_their_rounding(tiny_model, tmp_path):
    """f32: transformers' loader (which undoes llama.cpp's q/k permutation) gives the same logits, bit for bit, and the
    tokenizer read from the GGUF's metadata gives the same ids. f16 and q8_0 differ from float32 only by their
    rounding: each dequantised weight is within half a float16 ulp (2**-11 relative), or, for q8_0, half a step of its
    block of 32 (step d = the block's largest magnitude / 127) plus what storing d itself in float16 moves a value of
    up to 127 steps (127 d 2**-11)."""
    plain = load_model(str(tiny_model), device="cpu", dtype="float32")
    ids = plain.tokenizer.apply_chat_template(CONV, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        want = plain.model(torch.tensor([ids])).logits
    done = _export(tiny_model, tmp_path, "f32")
    back, btok = _load_back(tmp_path / "out-f32" / "tiny-1-f32.gguf")
    assert btok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == ids
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([ids])).logits, want)
    assert done.gguf.tensors == {"F32": 2 * 9 + 2}  # 2 layers x 9 tensors, embeddings, final norm (the head is tied)
    sd = plain.model.state_dict()
    for quant, bound in (("f16", lambda w: np.abs(w) * 2.0**-11 + 2.0**-25),
                         ("q8_0", lambda w: np.repeat(np.abs(w.reshape(-1, 32)).max(1) / 127 * (0.5 + 127 * 2.0**-11), 32).reshape(w.shape) * 1.0001 + 1e-9)):
        done = _export(tiny_model, tmp_path, quant)
        back, _ = _load_back(tmp_path / f"out-{quant}" / f"tiny-1-{quant}.gguf")
        got = back.state_dict()
        for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight", "model.embed_tokens.weight"):
            w, g = sd[name].numpy(), got[name].numpy()
            assert (np.abs(g - w) <= bound(w)).all(), (quant, name)
        assert set(done.gguf.tensors) == {"F32", quant.upper()}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_round_trip_exactly(tmp_path, smol_tokenizer, family):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): no permutation, llama.cpp's own tensor names; tiny random models
    built from each family's config, the bundled tokenizer as theirs."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    from tunewise.serve.gguf_export import plan_gguf, write_gguf

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    # Qwen3's head_dim is 128 in every released size (not hidden / heads); transformers' GGUF loader assumes it, so the
    # tiny Qwen3 keeps it too (the GGUF also says it: attention.key_length)
    cfg = cls(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, head_dim=16 if family == "qwen2" else 128)
    cfg.architectures = [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if family == "qwen2":  # biases are zero at init: make them count
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    plan = plan_gguf(model.config, smol_tokenizer, "f32", "qwen2")
    path = tmp_path / "q.gguf"
    write_gguf(model, smol_tokenizer, path, plan, "q", [smol_tokenizer.eos_token_id])
    back, _ = _load_back(path)
    x = torch.tensor([smol_tokenizer("Where is my card?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(back(x).logits, model(x).logits, atol=1e-6, rtol=0)  # float32: the same computation in another model class


def test_refusals_come_before_any_file_with_the_reason(tiny_model, tmp_path, smol_tokenizer):
    from transformers import Gemma2Config, Phi3Config

    from tunewise.serve.export import export_gguf
    from tunewise.serve.gguf_export import GGUFError, plan_gguf

    out = tmp_path / "never"
    with pytest.raises(GGUFError, match="llama-quantize"):
        export_gguf(tiny_model, out, "t", quant="q4_k_m", pre="smollm")
    with pytest.raises(GGUFError, match="--quant q3: one of f32, f16, q8_0"):
        export_gguf(tiny_model, out, "t", quant="q3", pre="smollm")
    with pytest.raises(GGUFError, match="--gguf-pre"):  # a base that did not come from a GGUF: no guessing its pre-tokenizer
        export_gguf(tiny_model, out, "t", quant="f16")
    assert not out.exists()
    gemma = Gemma2Config(hidden_size=64, num_hidden_layers=2)
    gemma.architectures = ["Gemma2ForCausalLM"]
    with pytest.raises(GGUFError, match="Gemma"):
        plan_gguf(gemma, smol_tokenizer, "f16", "smollm")
    phi = Phi3Config(hidden_size=64, num_hidden_layers=2)
    phi.architectures = ["Phi3ForCausalLM"]
    with pytest.raises(GGUFError, match="qkv_proj"):
        plan_gguf(phi, smol_tokenizer, "f16", "smollm")
    odd = Gemma2Config()
    odd.architectures = ["MysteryForCausalLM"]
    with pytest.raises(GGUFError, match="MysteryForCausalLM: not a family"):
        plan_gguf(odd, smol_tokenizer, "f16", "smollm")


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = ["card", "refund", "pin", "top-up", "{{ .Role }}", "line\nbreak", "<b>", "“quotes”", "ünïcode", ""]
    convs = []
    for k in range(n):
        conv = [{"role": "system", "content": rng.choice(words) + " system"}] if k % 2 else []
        for t in range(rng.randint(1, 3)):
            conv.append({"role": "user", "content": " ".join(rng.choices(words, k=3))})
            if t < 2 and rng.random() < 0.6:
                conv.append({"role": "assistant", "content": " ".join(rng.choices(words, k=2))})
        if conv[-1]["role"] == "assistant":
            conv.append({"role": "user", "content": "and?"})
        convs.append(conv)
    return convs


def test_the_modelfile_template_renders_what_the_chat_template_renders(smol_tokenizer):
    """20 conversations, with and without a system turn, multi-turn, text that looks like template syntax: the TEMPLATE
    (rendered as Ollama's Go text/template does) equals the chat template's rendering; stop is the end-of-turn token."""
    from tunewise.serve.ollama import modelfile, render_template, template_of

    text = modelfile(smol_tokenizer, "m.gguf", ["<|im_end|>"])
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    template = template_of(text)
    for conv in _conversations(20):
        assert render_template(template, conv) == smol_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    broken = template.replace("{{ $m.Content }}<|im_end|>\n", "{{ $m.Content }}<|im_end|>")  # one newline lost
    assert any(render_template(broken, c) != smol_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in _conversations(20))


def test_a_template_that_is_not_chatml_gets_no_modelfile(smol_tokenizer):
    import copy

    from tunewise.serve.gguf_export import GGUFError
    from tunewise.serve.ollama import modelfile

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
                         "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    with pytest.raises(GGUFError, match="not ChatML-shaped"):
        modelfile(tok, "m.gguf", ["<|eot_id|>"])


def test_export_ollama_from_the_cli_after_training(tiny_project, tmp_path):
    """A new user's path: train a LoRA adapter, `tunewise export --format ollama --quant q8_0 --gguf-pre smollm`; the GGUF
    holds the merged model (its answers equal the trained model's through transformers' loader, greedy)."""
    from typer.testing import CliRunner

    from tunewise.cli import app
    from tunewise.config import load_config
    from tunewise.engine import Engine
    from tunewise.train.loop import train

    path = tiny_project(max_steps=4, learning_rate=5e-2)
    cfg = load_config(path)
    r = train(cfg, cfg.train_dir, progress=False)
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", str(path), r.model_dir, "--out", str(out), "--format", "ollama", "--quant", "f32",
                                   "--gguf-pre", "smollm"])
    assert res.exit_code == 0, res.output
    done = json.loads((out / "export.json").read_text())
    assert (out / "Modelfile").exists() and "ollama create model" in done["commands"]["ollama"]
    assert done["stop_tokens"] == ["<|im_end|>"]
    gguf_path = out / "model-f32.gguf"
    back, btok = _load_back(gguf_path)
    eng = Engine.load(cfg.model.name, r.model_dir)
    convs = [[{"role": "system", "content": "Classify the intent."}, {"role": "user", "content": q}]
             for q in ("card?", "Where is my new card", "pin blocked", "refund please")]
    ours = [o.text for o in eng.generate(convs, max_new_tokens=6, adapter="default")]
    for conv, want in zip(convs, ours):
        ids = btok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = back.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=btok.pad_token_id)[0, ids["input_ids"].shape[1]:]
        assert btok.decode(gen, skip_special_tokens=True).strip() == want
    res = CliRunner().invoke(app, ["export", str(path), r.model_dir, "--out", str(tmp_path / "x"), "--format", "gguf", "--quant", "q4_k_m",
                                   "--gguf-pre", "smollm"])
    assert res.exit_code == 2 and "llama-quantize" in res.output and not (tmp_path / "x").exists()
    assert yaml.safe_load(path.read_text())  # the config is untouched


def test_a_lora_adapter_is_written_as_llama_cpps_lora_gguf_that_adds_up_to_the_merged_one(tiny_model, tmp_path):
    """Beside the merged GGUF, a LoRA model's adapter alone (llama.cpp's LoRA GGUF: general.type adapter, alpha,
    <tensor>.lora_a/.lora_b): for every adapted weight, the base GGUF's tensor + alpha/r * B A equals the merged GGUF's,
    within float32 rounding (sums of r = 8 products of ~1e-1 terms: 1e-5 holds with room, while a q/k tensor whose B is
    not permuted as the weight is misses by ~1, tried once). A DoRA adapter gets no LoRA GGUF, with the reason."""
    import gguf

    from tunewise.config import TrainConfig
    from tunewise.train.methods import apply_method

    loaded = load_model(str(tiny_model), device="cpu", dtype="float32")
    peft_model = apply_method(loaded.model, TrainConfig(method="lora"))
    torch.manual_seed(3)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    loaded.tokenizer.save_pretrained(adapter)
    (adapter / "tunewise.json").write_text(json.dumps({"base_model": str(tiny_model)}))
    done = _export(adapter, tmp_path, "f32")
    _export(tiny_model, tmp_path / "base", "f32")
    assert done.lora_gguf is not None and "--lora" in done.commands["llama.cpp lora"]
    read = lambda p: {t.name: np.array(t.data) for t in gguf.GGUFReader(str(p)).tensors}  # noqa: E731
    lora_reader = gguf.GGUFReader(done.lora_gguf.path)
    field = lambda k: lora_reader.fields[k].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type")) == ("adapter", "lora")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = field("adapter.lora.alpha") / cfg["r"]
    lora, merged, base = read(done.lora_gguf.path), read(done.gguf.path), read(tmp_path / "base" / "out-f32" / "tiny-1-f32.gguf")
    adapted = sorted(k[: -len(".lora_a")] for k in lora if k.endswith(".lora_a"))
    assert len(adapted) == 2 * 7 and "blk.0.attn_q.weight" in adapted and "blk.1.ffn_down.weight" in adapted
    for k in adapted:
        a, b = lora[k + ".lora_a"], lora[k + ".lora_b"]
        assert a.shape == (cfg["r"], base[k].shape[1]) and b.shape == (base[k].shape[0], cfg["r"])
        assert np.abs(base[k] + scale * (b @ a) - merged[k]).max() < 1e-5, k
    dora = json.loads((adapter / "adapter_config.json").read_text()) | {"use_dora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(dora))
    again = _export(adapter, tmp_path / "dora", "f32")
    assert again.lora_gguf is None and "DoRA" in again.lora_gguf_skipped
