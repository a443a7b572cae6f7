"""Cleaning throughput: N records (default 100,000) through the whole `tunewise data prepare` pipeline.

The records are BANKING77 training queries made into a harder mix: every fifth one gets PII (email,
phone, card, IBAN or IP), 5% are exact copies and 5% near-copies (a word dropped or doubled) of earlier
ones, a few have broken whitespace. Prints wall time per stage, records/s and peak memory (RSS).

    python bench/data_prep.py [--records 100000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PII = ["write to {n}.smith@example.com", "call +44 20 7946 {d:04d}", "card 4111 1111 1111 1111", "IBAN GB82 WEST 1234 5698 7654 32",
       "from 10.0.{a}.{b}"]


def make(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = list(csv.DictReader(open(ROOT / "examples" / "support-intents" / "data" / "train.csv", encoding="utf-8")))
    out = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if out and r < 0.05:
                text, label = rng.choice(out)
            elif out and r < 0.10:
                text, label = rng.choice(out)
                words = text.split()
                j = rng.randrange(len(words))
                words = words[:j] + words[j + 1 :] if len(words) > 4 and rng.random() < 0.5 else words[: j + 1] + words[j:]
                text = " ".join(words)
            else:
                row = rng.choice(rows)
                text, label = f"{row['text']} (ticket {i})", row["category"]
                if i % 5 == 0:
                    text += " - " + rng.choice(PII).format(n=i, d=i % 10000, a=i % 256, b=(i // 256) % 256)
                if i % 50 == 0:
                    text = "  " + text.replace(" ", "   ", 2) + "\u200b "
            out.append((text, label))
            f.write(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}], "label": label}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import yaml
    from rich.console import Console
    from rich.table import Table

    from tunewise.config import load_config
    from tunewise.data import clean as clean_mod
    from tunewise.data.prepare import prepare_data

    tmp = Path(tempfile.mkdtemp(prefix="tw-dataprep-"))
    t0 = time.time()
    make(tmp / "train.jsonl", args.records)
    gen_s = time.time() - t0
    (tmp / "tunewise.yaml").write_text(yaml.safe_dump({"project": "bench", "output_dir": "runs", "data": {
        "format": "openai", "train": "train.jsonl", "split": {"validation": 0.02, "test": 0.02}}}))
    cfg = load_config(tmp / "tunewise.yaml")

    stages: dict[str, float] = {}
    cls = clean_mod.Cleaner
    for name in ("_normalize", "_redact", "_keep", "_dedup", "_near_dedup"):  # time each stage where it runs
        orig = getattr(cls, name)

        def timed(self, *a, _orig=orig, _name=name, **k):
            t = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                stages[_name] = stages.get(_name, 0.0) + time.perf_counter() - t

        setattr(cls, name, timed)
    t0 = time.time()
    p = prepare_data(cfg)
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = p.summary
    t = Table(title=f"data prepare on {args.records:,} records ({os.cpu_count()} CPUs); generating the file took {gen_s:.1f} s")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for name, sec in stages.items():
        t.add_row(name.strip("_"), f"{sec:.1f}")
    t.add_row("whole prepare (read, clean, split, leakage, write)", f"{wall:.1f}")
    Console(width=120).print(t)
    steps = {k: (v["changed"], v["dropped"]) for k, v in s["cleaning"]["steps"].items()}
    print(f"records/s: {args.records / wall:,.0f}; peak RSS {peak_mb:,.0f} MB; kept {s['read']['kept']:,} of {s['read']['valid']:,}; "
          f"steps (changed, dropped): {steps}; PII: {s['cleaning']['pii_found']}")
    print(f"target: <= 60 s for 100,000 records: {'met' if wall <= 60 * args.records / 100_000 else 'NOT met'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
