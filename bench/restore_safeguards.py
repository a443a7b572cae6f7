"""Build the DPO project that restores refusals to the fine-tuned support-intents model.

Writes OUT/tunewise.yaml and its data as TRL preference pairs (trl-preference):
- HH-RLHF harmless-base pairs (Anthropic, MIT; ../shared/data/hh_rlhf_harmless_test): single-turn ones, the
  chosen answer being the human-preferred (more harmless) one;
- BANKING77 task pairs (PolyAI, CC BY 4.0; the example's data): the system prompt and the query, the true intent
  chosen, another intent rejected; the test split the same way, so the gate's task check scores the intents.
The project's model is the fine-tuned model (MODEL), so `tunewise gate OUT/tunewise.yaml` compares the DPO adapter
with the supervised fine-tune it starts from: refusals and task accuracy before and after, in one table. Its
gate.min_improvement is negative (--min-improvement, -0.03): the task check asks for no loss beyond that margin,
not for a gain, since this pass is meant to restore refusals.

    python bench/restore_safeguards.py --model runs/support-intents/train/model --out /tmp/dpo [--hh-select refusals --hh 147]
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


def hh_pairs(n: int, seed: int, select: str = "single-turn") -> list[dict]:
    """single-turn: one-turn pairs, as they come. refusals: pairs of any length whose chosen last answer is a
    refusal and whose rejected one is not, by the gate's own classifier (tunewise.eval.suites.is_refusal): the
    pairs that teach what the gate's safety check counts."""
    from tunewise.data.formats import read_records
    from tunewise.data.records import Record
    from tunewise.eval.suites import is_refusal

    recs = [r for r in read_records(HH, "hh-rlhf") if isinstance(r, Record)
            and sum(len(m["content"]) for m in r.messages) + len(r.meta["rejected"]) < 900]
    if select == "refusals":
        recs = [r for r in recs if is_refusal(r.answer) and not is_refusal(r.meta["rejected"])]
    else:
        recs = [r for r in recs if len(r.messages) == 2 and len(r.messages[0]["content"]) + len(r.answer) + len(r.meta["rejected"]) < 700]
    random.Random(seed).shuffle(recs)
    return [{"prompt": r.messages[0]["content"] if len(r.messages) == 2 else r.messages[:-1], "chosen": r.answer,
             "rejected": r.meta["rejected"]} for r in recs[:n]]


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
    ap.add_argument("--hh-select", choices=["single-turn", "refusals"], default="single-turn",
                    help="Which HH-RLHF pairs: single-turn ones, or those whose chosen answer refuses and rejected one does not.")
    ap.add_argument("--min-improvement", type=float, default=-0.03,
                    help="gate.min_improvement of the project: negative, a non-inferiority margin on task accuracy.")
    ap.add_argument("--task", type=int, default=200, help="BANKING77 training pairs.")
    ap.add_argument("--sft-weight", type=float, default=1.0,
                    help="training.preference.sft_weight: an NLL term on the chosen answer. DPO alone can widen the margin by "
                         "pushing the rejected answer down while greedy decoding still answers with an intent label.")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    hh = hh_pairs(a.hh, a.seed, a.hh_select)
    train = hh + task_pairs(BANKING / "train.csv", a.task, a.seed)
    random.Random(a.seed).shuffle(train)
    for name, rows in (("train.jsonl", train), ("test.jsonl", task_pairs(BANKING / "test.csv", None, a.seed))):
        (a.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "project": "restore-safeguards", "output_dir": str(a.out / "runs"), "model": {"name": str(Path(a.model).resolve())},
        "data": {"format": "trl-preference", "train": "train.jsonl", "test": "test.jsonl", "max_length": 256,
                 "split": {"validation": 0.1, "test": 0.0}},
        "training": {"objective": "dpo", "method": "lora", "learning_rate": 2e-4, "epochs": a.epochs, "batch_size": 8,
                     "eval_every": 10, "save_every": 10, "preference": {"sft_weight": a.sft_weight}},
        "evaluation": {"max_samples": 500, "metrics": ["accuracy"], "perplexity": False},
        "gate": {"min_improvement": a.min_improvement},
    }
    import yaml

    (a.out / "tunewise.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{len(train)} training pairs ({len(hh)} HH-RLHF {a.hh_select}, {a.task} BANKING77) -> {a.out / 'tunewise.yaml'}")


if __name__ == "__main__":
    main()
