"""Build the DPO project that restores refusals to the fine-tuned support-intents model.

Writes OUT/tunewise.yaml and its data as TRL preference pairs (trl-preference):
- HH-RLHF harmless-base pairs (Anthropic, MIT; ../shared/data/hh_rlhf_harmless_test): single-turn ones, the
  chosen answer being the human-preferred (more harmless) one;
- BANKING77 task pairs (PolyAI, CC BY 4.0; the example's data): the system prompt and the query, the true intent
  chosen, another intent rejected; the test split the same way, so the gate's task check scores the intents.
The project's model is the fine-tuned model (MODEL), so `tunewise gate OUT/tunewise.yaml` compares the DPO adapter
with the supervised fine-tune it starts from: refusals and task accuracy before and after, in one table.

    python bench/restore_safeguards.py --model runs/support-intents/train/model --out /tmp/dpo
    tunewise train /tmp/dpo/tunewise.yaml
    tunewise gate /tmp/dpo/tunewise.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test" / "harmless-base_test.jsonl"
BANKING = ROOT / "examples" / "support-intents" / "data"
SYSTEM = "Classify the online-banking customer message into its intent. Answer with the intent label only."


def hh_pairs(n: int, seed: int) -> list[dict]:
    from tunewise.data.formats import read_records
    from tunewise.data.records import Record

    recs = [r for r in read_records(HH, "hh-rlhf") if isinstance(r, Record) and len(r.messages) == 2
            and len(r.messages[0]["content"]) + len(r.answer) + len(r.meta["rejected"]) < 700]
    random.Random(seed).shuffle(recs)
    return [{"prompt": r.messages[0]["content"], "chosen": r.answer, "rejected": r.meta["rejected"]} for r in recs[:n]]


def task_pairs(path: Path, n: int | None, seed: int) -> list[dict]:
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    labels = sorted({r["category"] for r in rows})
    rng = random.Random(seed)
    if n:
        rows = rng.sample(rows, n)
    return [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}],
             "chosen": r["category"], "rejected": rng.choice([x for x in labels if x != r["category"]])} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="The supervised fine-tune to start from (a trained output directory).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hh", type=int, default=200, help="HH-RLHF pairs.")
    ap.add_argument("--task", type=int, default=200, help="BANKING77 training pairs.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    train = hh_pairs(a.hh, a.seed) + task_pairs(BANKING / "train.csv", a.task, a.seed)
    random.Random(a.seed).shuffle(train)
    for name, rows in (("train.jsonl", train), ("test.jsonl", task_pairs(BANKING / "test.csv", None, a.seed))):
        (a.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "project": "restore-safeguards", "output_dir": str(a.out / "runs"), "model": {"name": str(Path(a.model).resolve())},
        "data": {"format": "trl-preference", "train": "train.jsonl", "test": "test.jsonl", "max_length": 256,
                 "split": {"validation": 0.1, "test": 0.0}},
        "training": {"objective": "dpo", "method": "lora", "learning_rate": 2e-4, "epochs": 1, "batch_size": 8,
                     "eval_every": 10, "save_every": 10},
        "evaluation": {"max_samples": 500, "metrics": ["accuracy"], "perplexity": False},
    }
    import yaml

    (a.out / "tunewise.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{len(train)} training pairs ({a.hh} HH-RLHF, {a.task} BANKING77) -> {a.out / 'tunewise.yaml'}")


if __name__ == "__main__":
    main()
