"""Training throughput: tunewise's loop vs TRL's SFTTrainer + PEFT vs LLaMA-Factory, same model, data and LoRA.

Each implementation runs in its own subprocess (so peak RSS is its own) on the same examples (chat
template, loss on the assistant answer only), same LoRA (r=16, alpha=32, dropout 0, all linear layers),
batch size, learning rate and number of steps, float32 on CPU. Two workloads:

- banking: BANKING77 with its system prompt (short examples that share a ~28-token prefix);
- squad: SQuAD v1.1 context + question -> answer, no system prompt (long single-turn chats, no shared
  prefix), from ../shared/data when it is there.

Throughput is *example tokens per second*: the non-padding tokens of the examples trained on (a shared
prefix counted once per example, as the peers count it: each of them computes it once per example),
over the timed optimizer steps (the first step is warm-up and is not timed), from the same tokenisation
for every implementation.

    make bench-peers                                  # installs TRL, and LLaMA-Factory into bench/.venv-llamafactory
    python bench/train_throughput.py                  # all three, both workloads, 12 timed steps of 16
    python bench/train_throughput.py --workload banking --steps 20 --impls tunewise,trl

LLaMA-Factory pins its own torch/transformers/peft/trl, so it lives in its own virtualenv; an
implementation that is not installed is reported as missing, not silently dropped.
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
SQUAD = ROOT.parent / "shared" / "data" / "squad_dev" / "squad_v1.1_dev_from_explorer.json"
SYSTEM = "Classify the online-banking customer message into its intent. Answer with the intent label only."
LF_PYTHON = ROOT / "bench" / ".venv-llamafactory" / "bin" / "python"
LR = 2e-4


def conversations(workload: str, n: int) -> list[list[dict]]:
    """The same n chats for every implementation."""
    if workload == "banking":
        import csv

        with open(DATA, newline="") as f:
            rows = list(csv.DictReader(f))[:n]
        return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]},
                 {"role": "assistant", "content": r["category"]}] for r in rows]
    data = json.loads(SQUAD.read_text())["data"]
    out = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"][:1]:  # one question per context: every example is a different long prompt
                out.append([{"role": "user", "content": f"{para['context']}\n\nQuestion: {qa['question']}"},
                            {"role": "assistant", "content": qa["answers"][0]["text"]}])
                if len(out) == n:
                    return out
    return out


def max_length(workload: str) -> int:
    return 128 if workload == "banking" else 384


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(times: list[float], n_examples: int, tokens_per_example: float, wall: float) -> dict:
    seconds = times[-1] - times[0]
    steps = len(times) - 1
    return {"tokens_per_s": steps * n_examples * tokens_per_example / seconds, "s_per_step": seconds / steps, "wall_s": wall,
            "peak_rss_mb": peak_mb()}


def run_tunewise(args) -> dict:
    import yaml

    from tunewise.config import load_config
    from tunewise.train.loop import train

    tmp = Path(tempfile.mkdtemp())
    convs = conversations(args.workload, args.steps * args.batch_size * 2)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    training = {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "batch_size": args.batch_size,
                "max_steps": args.steps + 1, "learning_rate": LR, "save_every": 10**6, "eval_every": 10**6, "warmup_ratio": 0.0}
    training.update(json.loads(args.tunewise_set or "{}"))
    cfg = {"output_dir": str(tmp / "runs"), "model": {"name": args.model},
           "data": {"format": "openai", "train": "train.jsonl", "split": {"validation": 0.0}, "max_length": max_length(args.workload),
                    "clean": {"near_dedup": False}}, "training": training}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    times = []
    t0 = time.time()
    train(load_config(tmp / "c.yaml"), on_step=lambda step, row, model: times.append(time.time()), progress=False)
    return timed(times, args.batch_size, args.tokens_per_example, time.time() - t0)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    convs = conversations(args.workload, args.steps * args.batch_size * 2)
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.time())

    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=args.steps + 1,
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=10**6, save_strategy="no", report_to=[],
                    use_cpu=True, bf16=False, max_length=max_length(args.workload), completion_only_loss=True,
                    train_sampling_strategy="group_by_length", dataloader_num_workers=0, seed=42)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(args.model_path),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    return timed(times, args.batch_size, args.tokens_per_example, time.time() - t0)


def run_llamafactory(args) -> dict:
    """LLaMA-Factory's own SFT workflow (run_exp), its smollm2 template, LoRA on all linear layers."""
    from transformers import TrainerCallback

    from llamafactory.train.tuner import run_exp

    tmp = Path(tempfile.mkdtemp())
    convs = conversations(args.workload, args.steps * args.batch_size * 2)
    rows = []
    for c in convs:
        system = next((m["content"] for m in c if m["role"] == "system"), None)
        rows.append({"messages": [m for m in c if m["role"] != "system"], **({"system": system} if system else {})})
    (tmp / "train.json").write_text(json.dumps(rows))
    columns = {"messages": "messages"} | ({"system": "system"} if any("system" in r for r in rows) else {})
    (tmp / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "train.json", "formatting": "sharegpt", "columns": columns,
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.time())

    t0 = time.time()
    run_exp(args={
        "model_name_or_path": args.model_path, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 16,
        "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all", "dataset": "bench", "dataset_dir": str(tmp), "template": "smollm2",
        "cutoff_len": max_length(args.workload), "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "max_steps": args.steps + 1, "learning_rate": LR, "lr_scheduler_type": "cosine", "warmup_steps": 0, "logging_steps": 10**6,
        "save_strategy": "no", "output_dir": str(tmp / "out"), "overwrite_output_dir": True, "report_to": "none", "bf16": False,
        "fp16": False, "use_cpu": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "seed": 42,
        "train_sampling_strategy": "group_by_length", "plot_loss": False, "overwrite_cache": True,
    }, callbacks=[Timer()])
    return timed(times, args.batch_size, args.tokens_per_example, time.time() - t0)


def tokens_per_example(model_path: str, workload: str, n: int) -> float:
    """Mean non-padding tokens of the examples, from the model's own chat template (the same count for all)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    convs = conversations(workload, n)
    lengths = [min(len(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]), max_length(workload)) for c in convs]
    return sum(lengths) / len(lengths)


IMPLS = {
    "tunewise": ("tunewise (prefix once per batch)", lambda a: run_tunewise(a), None),
    "tunewise-plain": ("tunewise (no prefix sharing)", lambda a: run_tunewise(a), '{"share_prefix": false}'),
    "trl": ("TRL SFTTrainer + PEFT", lambda a: run_trl(a), None),
    "llamafactory": ("LLaMA-Factory", lambda a: run_llamafactory(a), None),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workload", choices=["banking", "squad", "both"], default="both")
    ap.add_argument("--impls", default="tunewise,tunewise-plain,trl,llamafactory")
    ap.add_argument("--impl", help="(internal) run one implementation and print JSON")
    ap.add_argument("--model-path", help="(internal)")
    ap.add_argument("--tokens-per-example", type=float, help="(internal)")
    ap.add_argument("--tunewise-set", help="(internal)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.impl:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print("RESULT " + json.dumps(IMPLS[args.impl][1](args)))
        return
    import torch

    from tunewise.advise.costs import probe_matmul_tflops
    from tunewise.models import resolve_model

    path = str(resolve_model(args.model))
    workloads = ["banking", "squad"] if args.workload == "both" else [args.workload]
    if "squad" in workloads and not SQUAD.exists():
        print(f"squad workload skipped: {SQUAD} not found")
        workloads.remove("squad")
    tflops = probe_matmul_tflops()
    from rich.console import Console
    from rich.table import Table

    for workload in workloads:
        tpe = tokens_per_example(path, workload, args.steps * args.batch_size * 2)
        results = []
        for impl in args.impls.split(","):
            python = str(LF_PYTHON) if impl == "llamafactory" else sys.executable
            if impl == "llamafactory" and not LF_PYTHON.exists():
                results.append({"impl": IMPLS[impl][0], "missing": "not installed (make bench-peers)"})
                continue
            cmd = [python, __file__, "--impl", impl, "--model", args.model, "--model-path", path, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--workload", workload, "--tokens-per-example", str(tpe)]
            if IMPLS[impl][2]:
                cmd += ["--tunewise-set", IMPLS[impl][2]]
            path_ = [str(ROOT)] + ([str(ROOT / "bench" / "peer_shims")] if impl == "llamafactory" else [])
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(path_)})
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                results.append({"impl": IMPLS[impl][0], "missing": "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:120]})
                continue
            results.append({"impl": IMPLS[impl][0], **json.loads(line[7:])})
        table = Table(title=f"LoRA r=16 training throughput, {workload} ({tpe:.0f} tokens/example): {args.model}, {args.steps} timed "
                            f"steps x {args.batch_size} examples, float32, {torch.get_num_threads()} threads, {tflops:.3f} TFLOP/s matmul")
        for col in ("implementation", "example tokens/s", "s/step", "peak RSS MB", "wall s", "vs LLaMA-Factory", "vs TRL"):
            table.add_column(col, justify="right")
        ref = {r["impl"]: r.get("tokens_per_s") for r in results}
        for r in results:
            if "missing" in r:
                table.add_row(r["impl"], r["missing"], "", "", "", "", "")
                continue
            lf, trl = ref.get("LLaMA-Factory"), ref.get("TRL SFTTrainer + PEFT")
            table.add_row(r["impl"], f"{r['tokens_per_s']:.1f}", f"{r['s_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['wall_s']:.1f}",
                          f"{r['tokens_per_s'] / lf:.2f}x" if lf else "-", f"{r['tokens_per_s'] / trl:.2f}x" if trl else "-")
        Console(width=220).print(table)


if __name__ == "__main__":
    main()
