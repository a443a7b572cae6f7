"""Answers restricted to the label set: free decoding vs the token trie vs scoring every label, one model.

On the same fine-tuned model and the same seeded sample of the BANKING77 test split:
- free: greedy decoding, up to 16 new tokens (what `evaluation.constrain: none` does);
- trie: greedy decoding through a token trie of the 77 labels, stopping as soon as one label is left
  (`evaluation.constrain: labels`, the default for classification);
- score: the exact alternative: the teacher-forced log-likelihood of every label (answer tokens and
  end-of-turn), the best one wins; 77 forward passes per item.

    python bench/constrained_decoding.py --model runs/support-intents/train/model --items 200
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "support-intents" / "tunewise.yaml"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="A trained model directory (tunewise train's model/).")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--modes", default="free,trie,score")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunewise.config import load_config
    from tunewise.data.prepare import ensure_prepared
    from tunewise.data.split import sample_records
    from tunewise.engine import Engine
    from tunewise.metrics import score
    from tunewise.eval.evaluate import build_prompt, label_set
    from tunewise.eval.stats import bootstrap_ci
    from tunewise.models import load_tokenizer

    cfg = load_config(CONFIG)
    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    items = sample_records(prepared.splits["test"], args.items)
    labels = label_set(cfg, prepared)
    convs = [build_prompt(r, cfg.data.system_prompt, None) for r in items]
    refs = [r.label for r in items]
    eng = Engine.load(cfg.model.name, adapter=args.model)
    rows = []
    for mode in args.modes.split(","):
        t0 = time.time()
        if mode == "free":
            preds = [o.text for o in eng.generate(convs, max_new_tokens=16, batch_size=64)]
        elif mode == "trie":
            preds = [o.text for o in eng.generate(convs, max_new_tokens=16, batch_size=64, choices=labels)]
        else:
            pairs = [(c, lab) for c in convs for lab in labels]
            nll = eng.reference_nll([c for c, _ in pairs], [lab for _, lab in pairs], batch_size=64)
            preds = []
            for i in range(len(convs)):
                scores = nll[i * len(labels) : (i + 1) * len(labels)]
                preds.append(labels[min(range(len(labels)), key=lambda j: scores[j][0])])
        wall = time.time() - t0
        acc = bootstrap_ci(score("accuracy", preds, refs))
        valid = sum(p in labels for p in preds) / len(preds)
        rows.append((mode, acc, valid, len(items) / wall, wall))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"BANKING77 test sample of {len(items)}, {len(labels)} labels: {args.model}")
    for col in ("decoding", "accuracy [95% CI]", "answers that are labels", "items/s", "wall s"):
        table.add_column(col, justify="right")
    for mode, acc, valid, ips, wall in rows:
        table.add_row(mode, f"{acc.mean:.3f} [{acc.low:.3f}, {acc.high:.3f}]", f"{valid:.1%}", f"{ips:.2f}", f"{wall:.0f}")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
