"""The cost model against real training runs of the bundled model on this machine.

For LoRA, full and freeze fine-tuning: a few steps of BANKING77 (batch 8, 64 tokens) in a fresh process;
measured tokens/s and peak memory (RSS) side by side with what tunewise/advise/costs.py predicts from
the model's shape and the machine's measured matmul rate.

    python bench/cost_model.py [--steps 5] [--methods lora,full,freeze]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default="lora,full,freeze")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from tunewise.advise.check import measure_training

    t = Table(title=f"cost model vs measured ({args.model}, batch 8 x 64 tokens, {args.steps} steps)")
    for h in ("method", "probe TFLOP/s", "achieved TFLOP/s", "tok/s measured", "tok/s predicted", "ratio", "peak GB measured",
              "peak GB predicted", "ratio"):
        t.add_column(h)
    console = Console(width=200)
    work = Path(tempfile.mkdtemp(prefix="tw-cost-"))
    for m in args.methods.split(","):
        r = measure_training(work / m, ROOT / "examples" / "support-intents" / "data" / "train.csv", args.model, m, steps=args.steps)
        t.add_row(m, f"{r['probe_tflops']:.3f}", f"{r['achieved_tflops']:.3f}", f"{r['measured_tokens_per_s']:.0f}",
                  f"{r['predicted_tokens_per_s']:.0f}", f"{r['time_ratio']:.2f}", f"{r['measured_peak_gb']:.2f}",
                  f"{r['predicted_peak_gb']:.2f}", f"{r['memory_ratio']:.2f}")
        console.print(m, {k: round(v, 3) for k, v in r["memory_parts_gb"].items()}, f"padding {r['padding']:.2f}")
    console.print(t)


if __name__ == "__main__":
    main()
