"""The cost model: FLOPs, time, memory and money for each route, from the model's shape and a measured probe.

Training FLOPs per token, for a decoder whose matmul weights (every linear layer and the LM head) hold M
parameters, with S tokens of context (attention adds ~2*L*d*S per token forward, causal average):
- forward 2M (+ attention); full fine-tuning 3x forward (the backward pass computes input and weight
  gradients: ~6*N*T, Kaplan et al. 2020);
- LoRA 2x forward (~4*N*T: the backward pass still computes input gradients through every frozen
  weight, but no weight gradients) plus the adapters' own 6 * adapter params;
- freeze (last k layers) forward + input gradients down to the first trained layer (the LM head's
  included) + weight gradients of the k layers: between the two;
- QLoRA = LoRA x QLORA_DEQUANT_OVERHEAD (each 4-bit weight is dequantised in the forward and backward
  pass; an assumption, not measured here: bitsandbytes runs 4-bit on CPU but not fast).

Time = FLOPs / (the machine's measured matmul rate at the model's shapes x TRAIN_EFFICIENCY). The probe
runs a few seconds once per machine and is cached. TRAIN_EFFICIENCY is the share of the probe's rate a
whole training step reaches (backward matmuls with transposed operands, norms, activations, the
optimizer); it was measured on the 2-core CPU this project is built on (tests/test_costs.py checks
prediction against real LoRA and full runs there).

Memory (bytes) = weights + gradients and AdamW moments of the trainable parameters (fp32) + saved
activations (per token and layer: 7 hidden-size, 3 KV-size and 4 MLP-size tensors for a Llama-style
block) + logits (3 copies of loss tokens x vocab in fp32: logits, their softmax and gradient; the loop
computes logits only where the loss is, the assistant's tokens) + the runtime
(Python, torch, the tokenizer; measured ~0.6 GB on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

QLORA_DEQUANT_OVERHEAD = 1.3
TRAIN_EFFICIENCY = {"cpu": 0.75, "cuda": 0.45}  # cpu: bench/cost_model.py on the 2-core reference machine (lora 0.77, full 0.68, freeze 0.88 of the probe)
PREFILL_EFFICIENCY = {"cpu": 0.8, "cuda": 0.5}
RUNTIME_GB = {"cpu": 0.6, "cuda": 0.5}
PADDING = 1.1  # batches of similar length still pad ~10%


@dataclass
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    params: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_matmul_params(self) -> int:
        d = self.hidden
        return d * d * 2 + d * self.kv_dim * 2 + 3 * d * self.intermediate

    @property
    def matmul_params(self) -> int:
        return self.layers * self.layer_matmul_params + self.vocab * self.hidden

    @classmethod
    def from_hf_config(cls, c, params: int | None = None) -> "ModelShape":
        heads = c.num_attention_heads
        shape = cls(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
                    heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, vocab=c.vocab_size, params=0)
        tied = getattr(c, "tie_word_embeddings", False)
        shape.params = params or (shape.layers * (shape.layer_matmul_params + 2 * shape.hidden) + shape.vocab * shape.hidden * (1 if tied else 2) + shape.hidden)
        return shape


def model_shape(ref: str) -> ModelShape:
    from transformers import AutoConfig

    from ..models import resolve_model

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(resolve_model(ref)))


def lora_params(shape: ModelShape, r: int) -> int:
    d, kv, ff = shape.hidden, shape.kv_dim, shape.intermediate
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 2 + (ff + d))  # q, o, k, v, gate, up, down
    return shape.layers * per_layer


def forward_flops_per_token(shape: ModelShape, seq: int, head_share: float = 1.0) -> float:
    """head_share: the share of positions whose logits are computed (training: only the loss tokens)."""
    head = shape.vocab * shape.hidden
    return 2 * (shape.matmul_params - head + head * min(1.0, head_share)) + 2 * shape.layers * shape.hidden * seq


def train_flops_per_token(shape: ModelShape, method: str, seq: int, lora_r: int = 16, trainable_layers: int = 2,
                          loss_share: float = 1.0) -> float:
    """loss_share: the share of tokens with a loss (assistant tokens); the loop runs the output head only there."""
    fwd = forward_flops_per_token(shape, seq, loss_share)
    if method == "full":
        return 3 * fwd
    if method in ("lora", "dora", "qlora"):
        flops = 2 * fwd + 6 * lora_params(shape, lora_r)
        return flops * (QLORA_DEQUANT_OVERHEAD if method == "qlora" else 1.0)
    if method == "freeze":
        k = min(trainable_layers, shape.layers)
        layer_fwd = 2 * shape.layer_matmul_params + 2 * shape.hidden * seq
        return fwd + 2 * shape.vocab * shape.hidden * min(1.0, loss_share) + 2 * k * layer_fwd  # head input grads + the k layers' input and weight grads
    raise ValueError(f"unknown method {method!r}")


def trainable_params(shape: ModelShape, method: str, lora_r: int = 16, trainable_layers: int = 2) -> int:
    if method == "full":
        return shape.params
    if method in ("lora", "dora", "qlora"):
        return lora_params(shape, lora_r)
    return min(trainable_layers, shape.layers) * (shape.layer_matmul_params + 2 * shape.hidden) + shape.hidden


def train_memory_gb(shape: ModelShape, method: str, batch_size: int, seq: int, device: str = "cpu", lora_r: int = 16,
                    trainable_layers: int = 2, weight_bytes: int | None = None, loss_share: float = 1.0) -> dict:
    """Peak training memory by part, in GB (see the module docstring). loss_share: the share of tokens that
    carry loss (assistant tokens); the loop computes logits only there."""
    wb = weight_bytes or (4 if device == "cpu" else 2)
    if method == "qlora":
        weights = shape.layers * shape.layer_matmul_params * 0.55 + (shape.params - shape.layers * shape.layer_matmul_params) * 2
    else:
        weights = shape.params * wb
    tr = trainable_params(shape, method, lora_r, trainable_layers)
    grads_optim = tr * (4 + 8) + (tr * 4 if (method == "full" and wb == 2) else 0)  # fp32 grads + 2 Adam moments (+ master copy)
    act_bytes = 4 if device == "cpu" else 2
    tokens = batch_size * seq
    per_layer = (7 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate) * act_bytes
    stored_layers = min(trainable_layers, shape.layers) if method == "freeze" else shape.layers
    activations = tokens * per_layer * stored_layers
    logits = 3 * tokens * min(1.0, loss_share) * shape.vocab * 4
    parts = {"weights": weights, "grads_optimizer": grads_optim, "activations": activations, "logits": logits,
             "runtime": RUNTIME_GB.get(device, 0.6) * 1e9}
    gb = {k: v / 1e9 for k, v in parts.items()}
    gb["total"] = sum(gb.values())
    return gb


# ---------------------------------------------------------------- the probe: this machine's matmul rate


def _cache_path():
    from ..models import cache_home

    return cache_home() / "probe.json"


def probe_matmul_tflops(device: str = "cpu", hidden: int = 576, intermediate: int = 1536, tokens: int = 1024,
                        seconds: float = 2.0, use_cache: bool = True) -> float:
    """fp32 (CPU) or bf16 (GPU) TFLOP/s of [tokens, hidden] x [hidden, intermediate], the model's own MLP shape,
    measured for ~`seconds`; cached per machine, torch version, thread count and shape."""
    import platform

    import torch

    key = f"{device}|{platform.node()}|{torch.__version__}|{torch.get_num_threads()}|{hidden}x{intermediate}x{tokens}"
    path = _cache_path()
    cache = {}
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
        except ValueError:
            cache = {}
        if key in cache:
            return cache[key]["tflops"]
    dev = torch.device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    b = torch.randn(hidden, intermediate, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        a @ b.T.contiguous().T  # both layouts a backward pass meets
        n += 2
    sync()
    tflops = 2 * tokens * hidden * intermediate * n / (time.perf_counter() - t0) / 1e12
    cache[key] = {"tflops": tflops, "measured": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..util import atomic_write_json

        atomic_write_json(path, cache)
    except OSError:
        pass
    return tflops


@dataclass
class Hardware:
    device: str
    name: str
    tflops: float
    memory_gb: float
    hour_usd: float

    def to_json(self) -> dict:
        return asdict(self)


def detect_hardware(cfg, shape: ModelShape | None = None) -> Hardware:
    import torch

    hw = cfg.hardware
    device = hw.device if hw.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 1e9
    else:
        name = f"{os.cpu_count()}-core CPU"
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    if hw.matmul_tflops:
        tflops = hw.matmul_tflops
    else:
        kw = {"hidden": shape.hidden, "intermediate": shape.intermediate} if shape else {}
        tflops = probe_matmul_tflops(device, **kw)
    price = cfg.prices.gpu_hour_usd if device == "cuda" else cfg.prices.cpu_hour_usd
    return Hardware(device=device, name=name, tflops=tflops, memory_gb=hw.memory_gb or mem, hour_usd=price)


# ---------------------------------------------------------------- estimates the decision uses


def train_estimate(shape: ModelShape, hw: Hardware, method: str, examples: int, mean_tokens: float, epochs: float,
                   batch_size: int, seq: int, lora_r: int = 16, trainable_layers: int = 2, max_steps: int | None = None,
                   loss_share: float = 1.0) -> dict:
    steps = max_steps or max(1, math.ceil(examples * epochs / batch_size))
    tokens = steps * batch_size * mean_tokens * PADDING
    flops = tokens * train_flops_per_token(shape, method, seq, lora_r, trainable_layers, loss_share)
    seconds = flops / (hw.tflops * 1e12 * TRAIN_EFFICIENCY.get(hw.device, 0.5))
    mem = train_memory_gb(shape, method, batch_size, seq, hw.device, lora_r, trainable_layers, loss_share=loss_share)
    return {"method": method, "steps": steps, "tokens": round(tokens), "flops": flops, "hours": seconds / 3600, "seconds": seconds,
            "usd": seconds / 3600 * hw.hour_usd, "memory_gb": round(mem["total"], 3), "memory_parts_gb": {k: round(v, 3) for k, v in mem.items()},
            "fits": mem["total"] <= hw.memory_gb}


def query_seconds(shape: ModelShape, hw: Hardware, prompt_tokens: float, completion_tokens: float) -> float:
    """Self-hosted compute time per query in a batched engine: prefill at the probe's rate, decode at the
    same FLOPs (batched decode is matmul-bound too; the measured eval throughput replaces this when known)."""
    eff = PREFILL_EFFICIENCY.get(hw.device, 0.5)
    flops = (prompt_tokens + completion_tokens) * forward_flops_per_token(shape, int(prompt_tokens + completion_tokens))
    return flops / (hw.tflops * 1e12 * eff)


def query_cost_usd(hw: Hardware, seconds_per_query: float) -> float:
    """Self-hosted: the machine's time per query at its hourly price (a hosted API's per-token bill is advise.decide's)."""
    return seconds_per_query * hw.hour_usd / 3600


def break_even_queries_per_day(fixed_a: float, per_query_a: float, fixed_b: float, per_query_b: float, years: float = 1.0) -> float | None:
    """Daily volume above which route b (higher fixed cost, lower per-query cost) is cheaper than a over `years`."""
    saving = (per_query_a - per_query_b) * 365 * years
    if saving <= 0:
        return None
    return max(0.0, (fixed_b - fixed_a) / saving)
