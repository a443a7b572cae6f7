"""Build the DPO project that restores refusals to the fine-tuned support-intents model.

Writes OUT/tunewise.yaml and its data as TRL preference pairs (trl-preference):
- HH-RLHF harmless-base pairs (Anthropic, MIT; ../shared/data/hh_rlhf_harmless_test): single-turn ones, the
  chosen answer being the human-preferred (more harmless) one;
- BANKING77 task pairs (PolyAI, CC BY 4.0; the example's data): the system prompt and the query, the true intent
  chosen, another intent rejected; the test split the same way, so the gate's task check scores the intents.
- with --distill N: N more pairs on HH-RLHF red-team prompts (the dialogues' first turns), the chosen answer the
  bundled base model's own refusal when told to refuse harmful requests (SAFETY below; a plain user turn in the pair,
  so the refusal is distilled into the model without the prompt: context distillation), the rejected answer the
  fine-tuned model's own greedy reply (an intent label: what the gate sees it answer, so DPO pushes down what it
  actually writes, not an off-policy text); and --benign M pairs on everyday questions: the COVID-19 FAQ's
  (deepset COVID-QA, Apache-2.0; ../shared/data/covid_faq), then SQuAD v1.1 dev questions (CC BY-SA 4.0;
  ../shared/data/squad_dev) for the rest, the base model's own plain answer chosen, the fine-tune's label rejected,
  so that chat comes back without refusing everything.
- with --borderline K: K benign requests that carry alarming words (kill a process, shoot a photo, what is arson;
  bench/data/borderline_benign.txt, written for this bench), less any the bundled embedding model finds close to an
  XSTest prompt (cosine >= 0.75: the gate's over-refusal test stays unseen): the base model's plain answer chosen, a
  distilled refusal rejected, so the refusal is tied to harm, not to the words.
- --task-rejected refusal: the task pairs' rejected answer is one of the distilled refusals instead of another intent
  (a wrong label rejected pushes down the tokens, EOS included, that every label shares: free decoding then writes
  `lost_or_stolen_phone_phone_phone`); the pairs then teach "a banking query gets its label, not a refusal".
The project's model is the fine-tuned model (MODEL), so `tunewise gate OUT/tunewise.yaml` compares the DPO adapter
with the supervised fine-tune it starts from: refusals and task accuracy before and after, in one table. Its
gate.min_improvement is negative (--min-improvement, -0.03): the task check asks for no loss beyond that margin,
not for a gain, since this pass is meant to restore refusals.

    python bench/restore_safeguards.py --model runs/support-intents/train/model --out /tmp/dpo [--hh-select refusals --hh 147]
        [--distill 150 --benign 400 --borderline 150 --task-rejected refusal --lr 0.0005 --epochs 1 --eval-samples 1000]
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
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev" / "squad_v1.1_dev_from_explorer.json"
COVID = ROOT.parent / "shared" / "data" / "covid_faq" / "faq_covidbert.csv"
BORDERLINE = ROOT / "bench" / "data" / "borderline_benign.txt"
SAFETY = ("You are a helpful and harmless assistant. If a request is harmful, illegal, unethical or dangerous, refuse it: "
          "say you cannot help with it and briefly why.")
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


def _trim(text: str) -> str:
    """A reply cut at max_new_tokens ends at its last full sentence (the pair must not teach stopping mid-word)."""
    text = text.strip()
    cut = max(text.rfind(c) for c in ".!?")
    return text[: cut + 1] if cut > 20 else text


def borderline_prompts(k: int, seed: int, threshold: float = 0.75) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Up to k of bench/data/borderline_benign.txt, shuffled, and the ones dropped as too close to an XSTest prompt
    (safe or unsafe): (prompt, nearest XSTest prompt, cosine) by the bundled embedding model."""
    from tunewise.eval.suites import xstest_prompts
    from tunewise.rag.embed import Embedder

    ours = [line.strip() for line in BORDERLINE.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    xs = xstest_prompts("safe") + xstest_prompts("unsafe")
    emb = Embedder(pack=False)
    sim = emb.encode(ours) @ emb.encode(xs).T  # the embedder's vectors are unit-length: cosines
    best, nearest = sim.max(axis=1), sim.argmax(axis=1)
    dropped = [(p, xs[j], float(c)) for p, c, j in zip(ours, best, nearest) if c >= threshold]
    kept = [p for p, c in zip(ours, best) if c < threshold]
    random.Random(seed).shuffle(kept)
    return kept[:k], dropped


def distilled_pairs(model: str, n: int, benign: int, seed: int, batch_size: int = 32,
                    borderline: list[str] = ()) -> tuple[list[dict], list[dict], list[dict]]:
    """(refusal pairs, benign pairs, borderline pairs): see the module docstring. The base answers greedily, 96 new
    tokens."""
    from tunewise.data.formats import read_records
    from tunewise.data.records import Record
    from tunewise.engine import Engine
    from tunewise.eval.suites import is_refusal
    from tunewise.models import DEFAULT_MODEL

    firsts = list(dict.fromkeys(r.messages[0]["content"].strip() for r in read_records(HH, "hh-rlhf")
                                if isinstance(r, Record) and len(r.messages[0]["content"]) < 300))
    random.Random(seed).shuffle(firsts)
    questions = [r["question"].strip() for r in csv.DictReader(open(COVID, encoding="utf-8")) if r["question"].strip()]
    random.Random(seed).shuffle(questions)
    squad = [q["question"].strip() for a in json.loads(SQUAD.read_text(encoding="utf-8"))["data"] for par in a["paragraphs"]
             for q in par["qas"]]
    random.Random(seed).shuffle(squad)
    questions = (questions + squad)[:benign]
    base, tuned = Engine.load(DEFAULT_MODEL), Engine.load(str(Path(model).resolve()))
    def user(p, system=None):
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
    refusals: list[dict] = []
    for k in range(0, len(firsts), 4 * batch_size):  # until n refusals
        chunk = firsts[k : k + 4 * batch_size]
        outs = base.generate([user(p, SAFETY) for p in chunk], max_new_tokens=96, batch_size=batch_size)
        keep = [(p, _trim(o.text)) for p, o in zip(chunk, outs) if is_refusal(o.text)]
        own = tuned.generate([user(p) for p, _ in keep], max_new_tokens=32, batch_size=batch_size)
        refusals += [{"prompt": p, "chosen": c, "rejected": o.text.strip()} for (p, c), o in zip(keep, own)
                     if o.text.strip() and not is_refusal(o.text)]
        print(f"distill: {min(k + 4 * batch_size, len(firsts))} HH prompts -> {len(refusals)} refusal pairs", flush=True)
        if len(refusals) >= n:
            break
    outs = base.generate([user(q) for q in questions], max_new_tokens=96, batch_size=batch_size)
    own = tuned.generate([user(q) for q in questions], max_new_tokens=32, batch_size=batch_size)
    kind = [{"prompt": q, "chosen": c, "rejected": r} for q, o, c, r in zip(questions, outs, map(_trim, (o.text for o in outs)),
                                                                          (t.text.strip() for t in own))
            if c and not is_refusal(o.text) and r and c != r]
    rng, border = random.Random(seed), []
    if borderline:
        outs = base.generate([user(q) for q in borderline], max_new_tokens=96, batch_size=batch_size)
        border = [{"prompt": q, "chosen": c, "rejected": rng.choice(refusals[:n])["chosen"]}
                  for q, o, c in zip(borderline, outs, map(_trim, (o.text for o in outs))) if c and not is_refusal(o.text)]
        print(f"borderline: {len(borderline)} prompts -> {len(border)} pairs (the base refused or said nothing on the rest)")
    return refusals[:n], kind, border


def task_pairs(path: Path, n: int | None, seed: int, refusals: list[str] | None = None) -> list[dict]:
    """The query with the data's system prompt; the true intent chosen, another intent rejected (or, given refusals,
    one of them)."""
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    labels = sorted({r["category"] for r in rows})
    rng = random.Random(seed)
    if n:
        rows = rng.sample(rows, n)
    return [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}],
             "chosen": r["category"],
             "rejected": rng.choice(refusals) if refusals else rng.choice([x for x in labels if x != r["category"]])} for r in rows]


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
    ap.add_argument("--distill", type=int, default=0,
                    help="Pairs on HH-RLHF red-team prompts: the base's refusal under a safety prompt chosen, the fine-tune's own reply rejected.")
    ap.add_argument("--benign", type=int, default=0,
                    help="Everyday questions (the COVID-19 FAQ's, then SQuAD's): the base's plain answer chosen, the fine-tune's own reply rejected.")
    ap.add_argument("--borderline", type=int, default=0,
                    help="Benign requests with alarming words (bench/data/borderline_benign.txt, less those close to XSTest): "
                         "the base's plain answer chosen, a distilled refusal rejected (needs --distill).")
    ap.add_argument("--eval-samples", type=int, default=500, help="evaluation.max_samples: the gate's task check, paired.")
    ap.add_argument("--task-rejected", choices=["label", "refusal"], default="label",
                    help="The task pairs' rejected answer: another intent, or one of the distilled refusals (needs --distill).")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if (a.task_rejected == "refusal" or a.borderline) and not a.distill:
        ap.error("--task-rejected refusal and --borderline take their refusals from --distill")
    a.out.mkdir(parents=True, exist_ok=True)
    hh = hh_pairs(a.hh, a.seed, a.hh_select)
    borderline = []
    if a.borderline:
        borderline, dropped = borderline_prompts(a.borderline, a.seed)
        print(f"borderline: {len(dropped)} prompts dropped as close to XSTest:")
        for p, x, c in dropped:
            print(f"  {c:.2f}  {p!r} ~ {x!r}")
    distilled, benign, border = (distilled_pairs(a.model, a.distill, a.benign, a.seed, borderline=borderline)
                                 if a.distill or a.benign else ([], [], []))
    refusals = [d["chosen"] for d in distilled] if a.task_rejected == "refusal" else None
    train = hh + distilled + benign + border + task_pairs(BANKING / "train.csv", a.task, a.seed, refusals)
    random.Random(a.seed).shuffle(train)
    for name, rows in (("train.jsonl", train), ("test.jsonl", task_pairs(BANKING / "test.csv", None, a.seed))):
        (a.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "project": "restore-safeguards", "output_dir": str(a.out / "runs"), "model": {"name": str(Path(a.model).resolve())},
        "data": {"format": "trl-preference", "train": "train.jsonl", "test": "test.jsonl", "max_length": 256,
                 "split": {"validation": 0.1, "test": 0.0}},
        "training": {"objective": "dpo", "method": "lora", "learning_rate": a.lr, "epochs": a.epochs, "batch_size": 8,
                     "eval_every": 10, "save_every": 10, "preference": {"sft_weight": a.sft_weight}},
        "evaluation": {"max_samples": a.eval_samples, "metrics": ["accuracy"], "perplexity": False},
        "gate": {"min_improvement": a.min_improvement},
    }
    import yaml

    (a.out / "tunewise.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{len(train)} training pairs ({len(hh)} HH-RLHF {a.hh_select}, {len(distilled)} distilled refusals, "
          f"{len(benign)} benign, {len(border)} borderline, {a.task} BANKING77) -> {a.out / 'tunewise.yaml'}")


if __name__ == "__main__":
    main()
