"""Does quality-score selection beat a random draw? BANKING77, same N, same training budget.

1. `tunewise data prepare` cleans the BANKING77 training file and scores every record (data/clean.py).
2. Two training sets of N records: the N best by quality score (what `data prepare --select N` keeps)
   and N drawn at random (seeded) from the same cleaned split.
3. Each is fine-tuned with the same LoRA settings and steps, then scored on the same seeded sample of
   the test split; accuracy with 95% bootstrap CIs and a paired test of the difference.

    python bench/selection.py [--n 300] [--steps 40] [--test-items 400]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--test-items", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from tunewise.config import VariantConfig, load_config
    from tunewise.data.clean import quality_scores
    from tunewise.data.prepare import ensure_prepared
    from tunewise.eval.run import evaluate, load_scores
    from tunewise.eval.stats import paired_test
    from tunewise.models import load_tokenizer
    from tunewise.train.loop import train
    from tunewise.util import write_jsonl

    example = ROOT / "examples" / "support-intents" / "tunewise.yaml"
    cfg = load_config(example)
    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    pool = prepared.splits["train"]
    scores = quality_scores(pool)
    order = sorted(range(len(pool)), key=lambda i: (-scores[i]["score"], i))
    chosen = {"quality": order[: args.n], "random": random.Random(args.seed).sample(range(len(pool)), args.n)}
    work = Path(tempfile.mkdtemp(prefix="tw-select-"))
    results = {}
    for name, idx in chosen.items():
        d = work / name
        d.mkdir()
        write_jsonl(d / "train.jsonl", (pool[i].to_json() for i in idx))
        write_jsonl(d / "validation.jsonl", (r.to_json() for r in prepared.splits["validation"]))
        write_jsonl(d / "test.jsonl", (r.to_json() for r in prepared.splits["test"]))
        c = copy.deepcopy(cfg)
        c.project = f"select-{name}"
        c.output_dir = work / "runs"
        c.base_dir = d
        c.data.format, c.data.train, c.data.validation, c.data.test = "openai", d / "train.jsonl", d / "validation.jsonl", d / "test.jsonl"
        c.data.clean.near_dedup = c.data.clean.dedup = False  # already cleaned: train on exactly these N
        c.training.max_steps, c.training.eval_every, c.training.save_every = args.steps, args.steps, args.steps
        c.evaluation.max_samples, c.evaluation.perplexity = args.test_items, False
        tr = train(c, c.run_dir / "train")
        s = evaluate(c, VariantConfig(name="fine-tuned", kind="fine-tuned"))
        mean_score = sum(scores[i]["score"] for i in idx) / len(idx)
        results[name] = {"summary": s, "train": tr, "mean_quality": mean_score, "labels": len({pool[i].label for i in idx}),
                         "scores": load_scores(c, "fine-tuned", "accuracy")}
    t = Table(title=f"BANKING77: N={args.n} training examples, {args.steps} LoRA steps each, {args.test_items} test items")
    for h in ("selection", "mean quality score", "labels covered", "best val loss", "accuracy [95% CI]"):
        t.add_column(h)
    for name, r in results.items():
        a = r["summary"]["metrics"]["accuracy"]
        t.add_row(name, f"{r['mean_quality']:.3f}", str(r["labels"]), f"{r['train'].best_val_loss:.3f}",
                  f"{a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
    Console().print(t)
    p = paired_test(results["random"]["scores"], results["quality"]["scores"])
    Console().print(f"quality - random: {p.diff} (paired, p = {p.p_value:.3f})")
    print(json.dumps({k: {"accuracy": v["summary"]["metrics"]["accuracy"], "mean_quality": v["mean_quality"], "labels": v["labels"]}
                      for k, v in results.items()} | {"paired": p.as_dict()}, indent=1))


if __name__ == "__main__":
    main()
