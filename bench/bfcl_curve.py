"""BFCL learning curve of one training run: the adapter at each kept checkpoint, and the final one, scored on the BFCL
suite as `tunewise eval --suite bfcl` scores a variant.

Train with checkpoints kept along the way, then score them:

    tunewise train examples/tool-calling/tunewise.yaml --set project=tool-calling-irr \
        --set training.save_every=6 --set training.keep_checkpoints=6 --set training.eval_every=6
    python bench/bfcl_curve.py examples/tool-calling/tunewise.yaml --set project=tool-calling-irr --samples 40

Each checkpoint's trainable tensors (the LoRA matrices) are written as a PEFT adapter beside a copy of the final
model's adapter config and tokenizer (the same run, so the same rank, targets and chat template), under
bench/out/bfcl_curve/<project>/step-N. Each point is decoded freely and with calls held to the functions' schemas
(tool_choice auto, as `serve` does); `--choices` picks. Rows are appended to bench/out/bfcl_curve.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def adapter_at(checkpoint: Path, final: Path, dst: Path) -> Path:
    """A PEFT adapter directory holding a checkpoint's LoRA tensors, with the final model's config and tokenizer."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(final, dst, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    saved = load_file(str(final / "adapter_model.safetensors"))
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(checkpoint / "trainable.safetensors")).items()}
    if set(tensors) != set(saved):
        raise SystemExit(f"{checkpoint}: its tensors are not the final adapter's ({len(set(tensors) ^ set(saved))} names differ)")
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--choices", default="free,auto", help="free (no grammar) and/or auto (calls held, as serve does)")
    ap.add_argument("--steps", default=None, help="only these steps (comma-separated; the last is the trained model)")
    a = ap.parse_args()

    from tunewise.config import VariantConfig, load_config
    from tunewise.eval.bfcl import AST_CATEGORIES, CATEGORIES, run_bfcl
    from tunewise.train.checkpoint import list_checkpoints

    cfg = load_config(a.config, a.sets)
    final = Path(cfg.trained_model)
    logged = [json.loads(x) for x in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epoch = {r["step"]: r.get("epoch") for r in logged if "epoch" in r}
    kept = [(json.loads((c / "state.json").read_text())["step"], c) for c in list_checkpoints(cfg.run_dir / "train" / "checkpoints")]
    last = max(epoch, default=None)  # the final model's step: its checkpoint, if kept, is the same weights
    points = [(n, epoch.get(n), c) for n, c in kept if n != last]
    points.append((last, epoch.get(last), final))
    wanted = set(a.steps.split(",")) if a.steps else None
    work = OUT / "bfcl_curve" / cfg.project
    for step, epoch, src in points:
        if wanted and str(step) not in wanted:
            continue
        adapter = final if src == final else adapter_at(src, final, work / f"step-{step}")
        for choice in a.choices.split(","):
            v = VariantConfig(name=f"step-{step}-{choice}", kind="fine-tuned", adapter=adapter, tool_choice=None if choice == "free" else choice)
            s = run_bfcl(cfg, v, CATEGORIES, a.samples, a.max_new_tokens, out_root=work / "eval")
            row = {"project": cfg.project, "step": step, "epoch": epoch, "choice": choice, "samples": a.samples,
                   "ast_mean": s.non_live_ast_mean, "irrelevance": s.irrelevance, "wall_s": s.wall_s,
                   **{c: s.categories[c].mean for c in CATEGORIES}}
            OUT.mkdir(parents=True, exist_ok=True)
            with open(OUT / "bfcl_curve.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step} ({choice}): AST mean {s.non_live_ast_mean:.3f} "
                  + " ".join(f"{c} {s.categories[c].mean:.3f}" for c in AST_CATEGORIES) + f" irrelevance {s.irrelevance:.3f}", flush=True)


if __name__ == "__main__":
    main()
