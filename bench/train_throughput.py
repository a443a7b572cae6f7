"""Training throughput: tunewise's loop vs TRL's SFTTrainer + PEFT on the same model, data and LoRA settings.

Each implementation runs in its own subprocess (so peak RSS is its own) on the same BANKING77 examples
(chat template, loss on the assistant answer only), same LoRA (r=16, alpha=32, dropout 0, all linear
layers), batch size, learning rate and number of steps, float32 on CPU. Tokens/s counts non-padding
tokens over the timed optimizer steps (the first step is warm-up and is not timed).

    python bench/train_throughput.py                 # both, default 12 steps of 8 examples
    python bench/train_throughput.py --steps 30 --model bundled:smollm2-135m-instruct

TRL is an optional bench dependency: pip install -r bench/requirements.txt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "support-intents" / "data" / "train.csv"
SYSTEM = "Classify the online-banking customer message into its intent. Answer with the intent label only."


def examples(n: int) -> list[dict]:
    import csv

    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [{"text": r["text"], "label": r["category"]} for r in rows]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tunewise(args) -> dict:
    import yaml

    from tunewise.config import load_config
    from tunewise.train.loop import train

    tmp = Path(tempfile.mkdtemp())
    rows = examples(args.steps * args.batch_size * 2)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]}) for r in rows))
    cfg = {
        "output_dir": str(tmp / "runs"), "model": {"name": args.model},
        "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.0}, "max_length": 128},
        "training": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "batch_size": args.batch_size,
                     "max_steps": args.steps + 1, "learning_rate": 2e-4, "save_every": 10**6, "eval_every": 10**6,
                     "group_by_length": not args.no_grouping, "warmup_ratio": 0.0},
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    times, tokens = [], []

    def on_step(step, row, model):
        times.append(time.time())
        tokens.append(row["tokens"])

    t0 = time.time()
    train(load_config(tmp / "c.yaml"), on_step=on_step, progress=False)
    wall = time.time() - t0
    # Timed window: from the end of step 1 to the end of the last step.
    return {"impl": "tunewise", "tokens_per_s": (tokens[-1] - tokens[0]) / (times[-1] - times[0]),
            "s_per_step": (times[-1] - times[0]) / (len(times) - 1), "wall_s": wall, "peak_rss_mb": peak_mb()}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunewise.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    rows = examples(args.steps * args.batch_size * 2)
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}],
                             "completion": [{"role": "assistant", "content": r["label"]}]} for r in rows])
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.time())
            tokens.append(state.num_input_tokens_seen)

    tmp = tempfile.mkdtemp()
    cfg = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps + 1, learning_rate=2e-4,
                    lr_scheduler_type="cosine", warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                    bf16=False, max_length=128, completion_only_loss=True, include_num_input_tokens_seen="non_padding",
                    train_sampling_strategy="random" if args.no_grouping else "group_by_length", dataloader_num_workers=0, seed=42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=load_tokenizer(args.model),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    return {"impl": "trl SFTTrainer+PEFT", "tokens_per_s": (tokens[-1] - tokens[0]) / (times[-1] - times[0]),
            "s_per_step": (times[-1] - times[0]) / (len(times) - 1), "wall_s": wall, "peak_rss_mb": peak_mb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-grouping", action="store_true", help="Turn length grouping off in both.")
    ap.add_argument("--impl", choices=["tunewise", "trl"], help="(internal) run one implementation and print JSON")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.impl:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print("RESULT " + json.dumps(run_tunewise(args) if args.impl == "tunewise" else run_trl(args)))
        return
    import torch

    results = []
    for impl in ("tunewise", "trl"):
        cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        if args.no_grouping:
            cmd.append("--no-grouping")
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl} failed:\n{p.stderr[-3000:]}")
            continue
        results.append(json.loads(line[7:]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoRA training throughput: {args.model}, {args.steps} timed steps x {args.batch_size} examples, "
                        f"float32, {torch.get_num_threads()} CPU threads")
    for col in ("implementation", "tokens/s", "s/step", "peak RSS MB", "wall s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["impl"], f"{r['tokens_per_s']:.1f}", f"{r['s_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['wall_s']:.1f}")
    Console().print(table)
    if len(results) == 2:
        print(f"speed-up tunewise / trl: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
