"""GGUF export (llama.cpp, Ollama, LM Studio): the merged model, its tokenizer, special tokens and chat template,
written with the `gguf` package from PyPI (llama.cpp's own Python writer), tensor names through its name maps.

What is written exactly, and what is refused before any file is written:
- families: Llama-shaped (Llama, Mistral without sliding windows, SmolLM2: llama.cpp's `llama` architecture, whose
  rotary layout wants the q and k rows permuted as llama.cpp's convert_hf_to_gguf.py permutes them), Qwen2 and
  Qwen3 (no permutation; Qwen3's q/k norms by name). Others (Gemma, Phi-3, ...) are refused with the reason: their
  conversions have family-specific steps (Gemma's norm offset and embedding scale, Phi-3's fused projections) that
  we have not written and tested; llama.cpp's convert_hf_to_gguf.py on the `merged/` export does them.
- rotary scaling (Llama 3.1's rope_scaling) is refused: llama.cpp wants a rope_freqs tensor we do not compute.
- tokenizers: byte-level BPE (tokenizer.ggml.model "gpt2"), with llama.cpp's pre-tokenizer name: taken from the GGUF
  the base model came from (the bundled model), or given with --gguf-pre (llama.cpp names it by hashing the
  tokenizer's output in convert_hf_to_gguf.py; a wrong name tokenizes differently, so we do not guess).
  SentencePiece tokenizers are refused.
- quantisations: f32, f16 and q8_0 (1-D tensors stay f32; a matrix whose rows are not a multiple of 32 is f16 under
  q8_0, as llama.cpp does). K-quants (q4_k_m, ...) are refused: the gguf package cannot write them; llama.cpp's
  `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M` can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TunewiseError
from ..results import GgufFile

ARCH_OF = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
PERMUTE_QK = ("llama",)
QUANTS = ("f32", "f16", "q8_0")
REFUSED_QUANTS = {
    "q4_k_m": "the gguf package cannot quantise to Q4_K", "q4_k_s": "the gguf package cannot quantise to Q4_K",
    "q5_k_m": "the gguf package cannot quantise to Q5_K", "q6_k": "the gguf package cannot quantise to Q6_K",
}
REFUSED_FAMILIES = {
    "Gemma2ForCausalLM": "Gemma's RMSNorm scales by (1 + weight) and its embeddings by sqrt(hidden), which llama.cpp's "
                         "converter folds in; not written by tunewise yet",
    "Gemma3ForCausalLM": "Gemma 3's norm offset, embedding scale and sliding-window layers are not written by tunewise yet",
    "Gemma3ForConditionalGeneration": "a multimodal Gemma 3; export the text model",
    "Phi3ForCausalLM": "Phi-3's fused qkv_proj and gate_up_proj are not written by tunewise yet",
}


class GGUFError(TunewiseError, ValueError):
    pass


@dataclass
class Plan:
    """What will be written, decided (and every refusal raised) before any file is."""

    arch: str
    quant: str
    pre: str
    merges: list[str]
    notes: list[str] = field(default_factory=list)


def source_pre(base_gguf: Path | None) -> str | None:
    """The pre-tokenizer name in the GGUF the base model was converted from, if any."""
    if base_gguf is None:
        return None
    import gguf

    f = gguf.GGUFReader(str(base_gguf)).fields.get("tokenizer.ggml.pre")
    return f.contents() if f is not None else None


def plan_gguf(config, tok, quant: str, pre: str | None) -> Plan:
    """Check that this model, tokenizer and quantisation can be written exactly; GGUFError naming what cannot."""
    quant = quant.lower()
    if quant in REFUSED_QUANTS:
        raise GGUFError(f"--quant {quant}: {REFUSED_QUANTS[quant]}; export f16 and run llama.cpp's "
                        f"`llama-quantize model-f16.gguf model-{quant}.gguf {quant.upper()}`")
    if quant not in QUANTS:
        raise GGUFError(f"--quant {quant}: one of {', '.join(QUANTS)}")
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else type(config).__name__
    if name in REFUSED_FAMILIES:
        raise GGUFError(f"GGUF export of {name}: {REFUSED_FAMILIES[name]}")
    if name not in ARCH_OF:
        raise GGUFError(f"GGUF export of {name}: not a family tunewise writes (it writes {', '.join(sorted(ARCH_OF))}); "
                        "use llama.cpp's convert_hf_to_gguf.py on the merged/ export")
    arch = ARCH_OF[name]
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise GGUFError(f"GGUF export of {name}: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} needs llama.cpp's "
                        "rope_freqs tensor, which tunewise does not compute; use llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", name == "MistralForCausalLM"):
        raise GGUFError(f"GGUF export of {name}: sliding-window attention ({config.sliding_window}) is not written by tunewise")
    model = json.loads(tok.backend_tokenizer.to_str())["model"] if getattr(tok, "backend_tokenizer", None) else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError(f"GGUF export: the tokenizer is {model.get('type', 'not a fast tokenizer')}"
                        f"{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}; tunewise writes byte-level BPE "
                        "tokenizers only")
    if not pre:
        raise GGUFError("GGUF export: llama.cpp's pre-tokenizer name for this tokenizer is unknown (the base model did not come from "
                        "a GGUF); pass --gguf-pre NAME (llama.cpp's convert_hf_to_gguf.py names it, e.g. llama-bpe, qwen2, smollm)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Plan(arch, quant, pre, merges)


def _permute(w: np.ndarray, n_head: int, n_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotary halves to llama.cpp's interleaved pairs."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their types (normal, control for special tokens, user-defined for other added tokens,
    unused for ids past the tokenizer's vocabulary)."""
    import gguf

    rev = {i: t for t, i in tok.get_vocab().items()}
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _metadata(w, config, arch: str, head_dim: int) -> None:
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(float(getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(int(config.vocab_size))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _tokenizer(w, tok, config, plan: Plan, stop_ids: list[int]) -> None:
    tokens, types = _vocab(tok, int(config.vocab_size))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(plan.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(plan.merges)
    probe = tok("a")["input_ids"]
    if tok.bos_token_id is not None:
        w.add_bos_token_id(int(tok.bos_token_id))
    w.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    if tok.eos_token_id is not None:
        w.add_eos_token_id(int(tok.eos_token_id))
    if tok.unk_token_id is not None:
        w.add_unk_token_id(int(tok.unk_token_id))
    if tok.pad_token_id is not None:
        w.add_pad_token_id(int(tok.pad_token_id))
    other = [i for i in stop_ids if i != tok.eos_token_id]
    if other:  # the end-of-turn token the engine also stops on (llama.cpp: end of generation)
        w.add_eot_token_id(int(other[0]))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _tensor(w, name: str, data: np.ndarray, quant: str) -> str:
    """One tensor in its type: 1-D (norms, biases) f32; matrices per the quantisation."""
    import gguf
    from gguf import quants

    if data.ndim == 1 or quant == "f32":
        w.add_tensor(name, data.astype(np.float32))
        return "F32"
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        w.add_tensor(name, quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "Q8_0"
    w.add_tensor(name, data.astype(np.float16))
    return "F16"


def _name_map(config, arch: str):
    """llama.cpp's tensor name map for this architecture and depth (the gguf package's own)."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    return gguf.get_tensor_name_map(arch_enum, int(config.num_hidden_layers))


def _qk_rows(module: str, rows: np.ndarray, arch: str, config) -> np.ndarray:
    """A q or k projection's rows (its weight, or a LoRA B) in llama.cpp's order for Llama-shaped models; else as given."""
    if arch not in PERMUTE_QK or not module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return rows
    n_head = int(config.num_attention_heads)
    return _permute(rows, n_head, n_head if module.endswith("q_proj") else int(getattr(config, "num_key_value_heads", None) or n_head))


def _open(path: Path, arch: str, name: str):
    """A writer on a temporary file beside `path` (_close renames it into place once written)."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path.with_name(f".{path.name}.tmp")), arch)
    w.add_name(name)
    return w


def _close(w, path: Path) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_name(f".{path.name}.tmp").replace(path)


def write_gguf(model, tok, path: Path, plan: Plan, name: str, stop_ids: list[int]) -> GgufFile:
    """The merged model (float32 weights) to one .gguf file; returns what was written."""
    import gguf

    config = model.config
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    names = _name_map(config, plan.arch)
    w = _open(path, plan.arch, name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[plan.quant])
    _metadata(w, config, plan.arch, head_dim)
    _tokenizer(w, tok, config, plan, stop_ids)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFError(f"GGUF export: no GGUF name for tensor {hf_name} in llama.cpp's {plan.arch} map")
        data = _qk_rows(hf_name.removesuffix(".weight"), t.detach().to("cpu").float().numpy(), plan.arch, config)
        kind = _tensor(w, gname, data, plan.quant)
        counts[kind] = counts.get(kind, 0) + 1
    _close(w, path)
    return GgufFile(path=str(path), arch=plan.arch, quant=plan.quant, pre=plan.pre, tensors=counts, bytes=path.stat().st_size)


def lora_refusal(adapter_cfg: dict) -> str | None:
    """Why a PEFT adapter cannot be written as a llama.cpp LoRA (which is W + alpha/r * B A on linear layers), or None."""
    if adapter_cfg.get("use_dora"):
        return "DoRA rescales each output column by a learned magnitude, which llama.cpp's LoRA does not (use the merged GGUF)"
    if adapter_cfg.get("use_rslora") and adapter_cfg.get("rank_pattern"):
        return "rsLoRA with per-module ranks: its alpha/sqrt(r) cannot be one alpha under llama.cpp's alpha/r (use the merged GGUF)"
    if adapter_cfg.get("alpha_pattern"):
        return "per-module lora_alpha (alpha_pattern): llama.cpp takes one alpha per adapter (use the merged GGUF)"
    if adapter_cfg.get("modules_to_save"):
        return f"fully trained modules ({', '.join(adapter_cfg['modules_to_save'])}) are not LoRA matrices (use the merged GGUF)"
    return None


def write_lora_gguf(adapter_dir: Path, config, path: Path, plan: Plan, name: str) -> GgufFile:
    """A PEFT LoRA adapter as llama.cpp's LoRA GGUF (`llama-server -m BASE.gguf --lora FILE`): general.type adapter, its
    alpha, and for each adapted weight its GGUF name (the same name map as the model) + .lora_a (r x in) and .lora_b
    (out x r), in float32. For Llama-shaped q/k the rows of B are permuted as the weight's are (permuting (B A)'s rows is
    permuting B's). rsLoRA's alpha/sqrt(r) is written as the alpha that gives it under llama.cpp's alpha/r."""
    import gguf
    from safetensors.numpy import load_file

    from ..models import ADAPTER_KEY

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    why = lora_refusal(cfg)
    if why:
        raise GGUFError(f"GGUF LoRA export: {why}")
    names = _name_map(config, plan.arch)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        m = ADAPTER_KEY.match(key)
        if m is None:
            raise GGUFError(f"GGUF LoRA export: {key} is not a LoRA matrix (use the merged GGUF)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.astype(np.float32)
    alpha = float(cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        alpha *= float(np.sqrt(cfg.get("r", 8)))
    w = _open(path, plan.arch, name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, ab in sorted(pairs.items()):
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None or set(ab) != {"A", "B"}:
            raise GGUFError(f"GGUF LoRA export: no GGUF name for {module} in llama.cpp's {plan.arch} map" if gname is None
                            else f"GGUF LoRA export: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        w.add_tensor(gname + ".lora_a", np.ascontiguousarray(ab["A"]))
        w.add_tensor(gname + ".lora_b", np.ascontiguousarray(_qk_rows(module, ab["B"], plan.arch, config)))
    _close(w, path)
    return GgufFile(path=str(path), arch=plan.arch, quant="f32", tensors={"F32": 2 * len(pairs)}, bytes=path.stat().st_size)
