"""Where a GRPO step's time goes: the rollouts (sampling 8 prompts x group_size completions through the engine)
against the loss's forward and backward, on the bundled model with examples/support-intents/grpo.yaml's settings;
the loss both ways on the same rollouts: padded rows, and one layout per prompt (the prompt run once per group).

    python bench/grpo_step.py            # three steps, each line: rollouts s, loss s padded, loss s grouped
"""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunewise.config import load_config
from tunewise.data.prepare import ensure_prepared
from tunewise.models import load_model
from tunewise.train.objectives.grpo import GRPOLoss, Rollouts, prompts_of
from tunewise.train.methods import apply_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(steps: int = 3):
    cfg = load_config(os.path.join(ROOT, "examples/support-intents/grpo.yaml"), ["model.name=bundled:smollm2-135m-instruct"])
    loaded = load_model(cfg.model.name)
    model = apply_method(loaded.model, cfg.training)
    prepared = ensure_prepared(cfg, loaded.tokenizer)
    prompts = prompts_of(loaded.tokenizer, prepared.splits["train"][: cfg.training.batch_size])
    padded = Rollouts(loaded, model, cfg.training.grpo, 0, loaded.tokenizer.pad_token_id, loaded.device)
    loss_fn = GRPOLoss(model, cfg.training.grpo.beta, cfg.training.grpo.epsilon)
    grouped = Rollouts(loaded, model, cfg.training.grpo, 0, loaded.tokenizer.pad_token_id, loaded.device, groups=loss_fn.groups)
    model.train()
    for step in range(steps):
        keys = [("t", i) for i in range(len(prompts))]
        t0 = time.time()
        b = padded.make(prompts, keys)
        t1 = time.time()
        a = loss_fn(**b)
        a.backward()
        t2 = time.time()
        grouped.calls = padded.calls - 1  # the same seed: the same rollouts, laid out per prompt
        g = grouped.make(prompts, keys)
        t3 = time.time()
        c = loss_fn(**g)
        c.backward()
        t4 = time.time()
        model.zero_grad(set_to_none=True)
        print(f"step {step}: rollouts {t1 - t0:.2f} s; loss forward+backward: padded {t2 - t1:.2f} s "
              f"({tuple(b['input_ids'].shape)}), grouped {t4 - t3:.2f} s (loss {a.item():.6f} vs {c.item():.6f})")


if __name__ == "__main__":
    main()
