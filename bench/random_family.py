"""A randomly initialised model of another family, at a real model's shape, with the bundled tokenizer and the family's
real chat template (tests/fixtures/templates): what `bench/gpu_check.sh` trains to measure a non-Llama family's
tokens/s and peak memory on a GPU that cannot download weights. The answers are noise; the throughput is the family's.

    python bench/random_family.py OUT_DIR [--family qwen3] [--size 0.6b|tiny]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# family -> (config class, template fixture, special tokens, end of turn, shapes); the 0.6b shape is Qwen3-0.6B's
FAMILIES = {
    "qwen3": ("Qwen3Config", "qwen3.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], "<|im_end|>",
              {"0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128),
               "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16)},
              dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, max_position_embeddings=4096)),
}


def main() -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from tunewise.models import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", default="qwen3", choices=list(FAMILIES))
    ap.add_argument("--size", default="0.6b")
    a = ap.parse_args()
    cls, fixture, specials, eot, sizes, own = FAMILIES[a.family]
    tok = copy.deepcopy(load_tokenizer("bundled:smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = (ROOT / "tests" / "fixtures" / "templates" / fixture).read_text()
    tok.eos_token = tok.pad_token = eot
    cfg = getattr(transformers, cls)(vocab_size=len(tok), **sizes[a.size], **own, eos_token_id=tok.convert_tokens_to_ids(eot),
                                     pad_token_id=tok.convert_tokens_to_ids(eot), bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.family} ({a.size}, random weights, {n / 1e6:.0f}M parameters) -> {a.out}")


if __name__ == "__main__":
    main()
