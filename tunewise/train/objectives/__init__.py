"""The training objectives, one class each (base.py has the interface the loop uses)."""

from __future__ import annotations

from .base import Context, Objective, Setup, TrainError
from .grpo import Grpo
from .preference import Dpo, Kto, Orpo
from .pretrain import Pretrain
from .sft import Sft

REGISTRY: dict[str, type[Objective]] = {c.name: c for c in (Sft, Pretrain, Dpo, Orpo, Kto, Grpo)}


def objective_of(cfg) -> Objective:
    """The objective `training.objective` names, for this config."""
    name = cfg.training.objective
    if name not in REGISTRY:
        raise TrainError(f"training.objective: {name!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[name](cfg)


__all__ = ["REGISTRY", "Context", "Objective", "Setup", "TrainError", "objective_of"]
