"""Tuning methods: a name -> function registry. Each function takes the loaded model and the training
config, sets exactly the parameters it trains to requires_grad=True, and returns the model to train.
Adding a method is one function and one decorator line.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TrainConfig

METHODS: dict[str, Callable[[torch.nn.Module, TrainConfig], torch.nn.Module]] = {}


def method(name: str):
    def register(fn):
        METHODS[name] = fn
        return fn

    return register


def _peft(model, cfg: TrainConfig, use_dora: bool):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


@method("lora")
def lora(model, cfg: TrainConfig):
    return _peft(model, cfg, use_dora=False)


@method("dora")
def dora(model, cfg: TrainConfig):
    return _peft(model, cfg, use_dora=True)


@method("qlora")
def qlora(model, cfg: TrainConfig):
    """LoRA on a base loaded in 4-bit NF4 (the loop loads it so for this method): the 4-bit weights stay fixed,
    the adapters train in the compute dtype; the adapter loads on the unquantised base too."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _peft(model, cfg, use_dora=False)


@method("full")
def full(model, cfg: TrainConfig):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's block list, found by its length (works across Llama/Qwen/Mistral/GPT-style models)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError("could not find the decoder layer list of this model")


@method("freeze")
def freeze(model, cfg: TrainConfig):
    """Train only the last N decoder layers (and the final norm); embeddings and the head stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    if cfg.trainable_layers > len(layers):
        raise ValueError(f"training.trainable_layers={cfg.trainable_layers} but the model has {len(layers)} layers")
    for layer in layers[len(layers) - cfg.trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    norm = getattr(getattr(model, "model", model), "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    return model


def apply_method(model, cfg: TrainConfig):
    if cfg.method not in METHODS:
        raise ValueError(f"unknown training.method {cfg.method!r}; one of {', '.join(METHODS)}")
    return METHODS[cfg.method](model, cfg)


def is_adapter(cfg: TrainConfig) -> bool:
    return cfg.method in ("lora", "dora", "qlora")


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
