"""Does quality-score selection beat a random draw? BANKING77, same N, same training budget.

1. `tunewise data prepare` cleans the BANKING77 training file and scores every record (data/clean.py).
2. Two training sets of N records: the N best by quality score (what `data prepare --select N` keeps)
   and N drawn at random (seeded) from the same cleaned split.
3. Each is fine-tuned with the same LoRA settings and steps, then scored on the same seeded sample of
   the test split; accuracy with 95% bootstrap CIs and a paired test of the difference.

    python bench/selection.py [--n 300] [--steps 40] [--test-items 400]

With planted label noise (the seeds' "poor examples"): --noise 0.3 gives a seeded 30% of the pool a wrong
label, --pool 1500 draws the pool from the cleaned split first, and --perplexity adds the base model's
perplexity of each answer to the score (data.clean.perplexity). The table then also shows the share of
wrongly labelled records each selection kept.

    python bench/selection.py --pool 1500 --noise 0.3 --perplexity [--global]
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
    ap.add_argument("--pool", type=int, default=None, help="Draw a pool of this many records from the cleaned split (seeded).")
    ap.add_argument("--noise", type=float, default=0.0, help="Share of the pool given a wrong label (seeded).")
    ap.add_argument("--perplexity", action="store_true", help="Add the perplexity signal to the score.")
    ap.add_argument("--global", dest="global_top", action="store_true", help="Select the overall best N (data.clean.select_by_label=false).")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from tunewise.config import VariantConfig, load_config
    from tunewise.data.clean import quality_scores
    from tunewise.data.prepare import ensure_prepared
    from tunewise.eval.evaluate import evaluate, load_scores
    from tunewise.eval.stats import paired_test
    from tunewise.models import load_tokenizer
    from tunewise.train.loop import train
    from tunewise.util import write_jsonl

    example = ROOT / "examples" / "support-intents" / "tunewise.yaml"
    cfg = load_config(example)
    prepared = ensure_prepared(cfg, load_tokenizer(cfg.model.name))
    pool = prepared.splits["train"]
    rng = random.Random(args.seed)
    if args.pool:
        pool = [pool[i] for i in sorted(rng.sample(range(len(pool)), args.pool))]
    flipped = set(rng.sample(range(len(pool)), round(args.noise * len(pool))))
    if flipped:
        from tunewise.data.records import Record

        labels = sorted({r.label for r in pool})
        for i in sorted(flipped):
            r = pool[i]
            wrong = rng.choice([x for x in labels if x != r.label])
            pool[i] = Record([*r.messages[:-1], {**r.messages[-1], "content": wrong}], r.source, label=wrong, meta=r.meta)
    nll = None
    if args.perplexity:
        from tunewise.data.perplexity import answer_nll

        nll = answer_nll(cfg.model.name, [pool], cfg.data.max_length, dtype=cfg.model.dtype,
                         cache=Path(tempfile.gettempdir()) / "tw-selection-nll.bin")
    scores = quality_scores(pool, nll=nll)
    import numpy as np

    from tunewise.data.clean import select_best
    from tunewise.data.split import label_ids

    # what `data prepare --select N` keeps: by default each label's share of N (--global: the overall best N)
    labels = None if args.global_top else label_ids([r.label for r in pool])[0]
    best = select_best(np.array([x["score"] for x in scores]), args.n, labels)
    chosen = {"quality": np.flatnonzero(best).tolist(), "random": random.Random(args.seed).sample(range(len(pool)), args.n)}
    print({name: f"{sum(i in flipped for i in idx) / len(idx):.1%} wrongly labelled" for name, idx in chosen.items()}, flush=True)
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
                         "wrong": sum(i in flipped for i in idx) / len(idx),
                         "scores": load_scores(c, "fine-tuned", "accuracy")}
    t = Table(title=f"BANKING77: N={args.n} training examples from a pool of {len(pool)} ({args.noise:.0%} wrongly labelled), "
                    f"{args.steps} LoRA steps each, {args.test_items} test items; score signals: {', '.join(k for k in scores[0] if k != 'score')}")
    for h in ("selection", "mean quality score", "labels covered", "wrong labels kept", "best val loss", "accuracy [95% CI]"):
        t.add_column(h)
    for name, r in results.items():
        a = r["summary"]["metrics"]["accuracy"]
        t.add_row(name, f"{r['mean_quality']:.3f}", str(r["labels"]), f"{r['wrong']:.1%}", f"{r['train'].best_val_loss:.3f}",
                  f"{a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
    Console().print(t)
    p = paired_test(results["random"]["scores"], results["quality"]["scores"])
    Console().print(f"quality - random: {p.diff} (paired, p = {p.p_value:.3f})")
    print(json.dumps({k: {"accuracy": v["summary"]["metrics"]["accuracy"], "mean_quality": v["mean_quality"], "labels": v["labels"], "wrong": v["wrong"]}
                      for k, v in results.items()} | {"paired": p.as_dict()}, indent=1))


if __name__ == "__main__":
    main()
