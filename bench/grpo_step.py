"""Where a GRPO step's time goes: the rollouts (sampling 8 prompts x group_size completions through the engine)
against the loss's forward and backward, on the bundled model with examples/support-intents/grpo.yaml's settings.

    python bench/grpo_step.py            # three steps, each line: rollouts s, loss forward+backward s, row shape
"""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunewise.config import load_config
from tunewise.data.prepared import ensure_prepared
from tunewise.models import load_model
from tunewise.train.grpo import GRPOLoss, Rollouts, prompts_of
from tunewise.train.methods import apply_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(steps: int = 3):
    cfg = load_config(os.path.join(ROOT, "examples/support-intents/grpo.yaml"), ["model.name=bundled:smollm2-135m-instruct"])
    loaded = load_model(cfg.model.name)
    model = apply_method(loaded.model, cfg.training)
    prepared = ensure_prepared(cfg, loaded.tokenizer)
    prompts = prompts_of(loaded.tokenizer, prepared.splits["train"][: cfg.training.batch_size])
    rollouts = Rollouts(loaded, model, cfg.training.grpo, 0, loaded.tokenizer.pad_token_id, loaded.device)
    loss_fn = GRPOLoss(model, cfg.training.grpo.beta, cfg.training.grpo.epsilon)
    model.train()
    for _ in range(steps):
        t0 = time.time()
        b = rollouts.make(prompts, [("t", i) for i in range(len(prompts))])
        t1 = time.time()
        loss_fn(**b).backward()
        print(f"rollouts {t1 - t0:.2f} s   loss forward+backward {time.time() - t1:.2f} s   rows {tuple(b['input_ids'].shape)}")


if __name__ == "__main__":
    main()
