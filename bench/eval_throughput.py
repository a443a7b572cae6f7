"""Generation throughput: tunewise's batched engine vs one-at-a-time `model.generate` on the same items.

Same model, same prompts (BANKING77 test items with the example's system prompt, a seeded sample),
greedy decoding, the same max_new_tokens; prints items/s and generated tokens/s side by side and
checks that both produce the same answers.

    python bench/eval_throughput.py --items 300 --batch-size 64 128
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64], help="One or more engine batch sizes.")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--variant", default=None, help="Use this configured variant's system prompt (e.g. zero-shot-labels).")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import torch
    from rich.console import Console
    from rich.table import Table

    from tunewise.config import load_config
    from tunewise.data.formats import read_records
    from tunewise.data.split import sample_records
    from tunewise.engine import Engine
    from tunewise.eval.evaluate import build_prompt

    cfg = load_config(ROOT / "examples" / "support-intents" / "tunewise.yaml")
    recs = [r for r in read_records(cfg.path(cfg.data.test), "csv", cfg.data.columns) if hasattr(r, "messages")]
    items = sample_records(recs, args.items)
    system = cfg.data.system_prompt
    if args.variant:
        system = next(v for v in cfg.evaluation.variants if v.name == args.variant).system_prompt or system
    convs = [build_prompt(r, system, None) for r in items]
    from tunewise.models import load_model

    eng = Engine.load(args.model)
    plain = load_model(args.model)  # the baseline: the model as transformers loads it, nothing of ours
    tok, model = plain.tokenizer, plain.model

    t0 = time.time()
    single_text, single_tokens = [], 0
    with torch.no_grad():
        for c in convs:
            ids = tok.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            gen = out[0, ids["input_ids"].shape[1]:].tolist()
            eos = model.generation_config.eos_token_id
            gen = gen[: gen.index(eos)] if eos in gen else gen
            single_tokens += len(gen)
            single_text.append(tok.decode(gen, skip_special_tokens=True).strip())
    single_s = time.time() - t0

    from tunewise.engine.prefill import _common_prefix

    prompts = eng._prompts(convs)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    peak = peak_tokens_per_s(eng)
    table = Table(title=f"{args.model}: {len(items)} items ({args.variant or 'default'} prompt, "
                        f"{sum(map(len, prompts)) / len(prompts):.0f} prompt tokens), greedy, "
                        f"max_new_tokens={args.max_new_tokens}, {torch.get_num_threads()} CPU threads")
    for col in ("implementation", "items/s", "generated tokens/s", "wall s", "speed-up", "identical answers"):
        table.add_column(col, justify="right")
    table.add_row("model.generate, one at a time", f"{len(items) / single_s:.2f}", f"{single_tokens / single_s:.1f}", f"{single_s:.1f}", "1.00x", "")
    for bs in args.batch_size:
        t0 = time.time()
        outs = eng.generate(convs, max_new_tokens=args.max_new_tokens, batch_size=bs)
        batched_s = time.time() - t0
        same = sum(a == b.text for a, b in zip(single_text, outs)) / len(outs)
        gen_tokens = sum(o.completion_tokens for o in outs)
        table.add_row(f"tunewise engine, batch {bs}", f"{len(items) / batched_s:.2f}", f"{gen_tokens / batched_s:.1f}", f"{batched_s:.1f}",
                      f"{single_s / batched_s:.2f}x", f"{same:.1%}")
        # The compute floor: every token the engine must run (each batch's shared prefix once, each row's own
        # prompt tokens, each generated token) at the peak rate of one large batched forward on this machine.
        must = gen_tokens
        for k in range(0, len(order), bs):
            batch = [prompts[i] for i in order[k : k + bs]]
            must += sum(len(p) for p in batch) - (len(batch) - 1) * max(_common_prefix(batch) - 1, 0)
        floor_s = must / peak
        table.add_row(f"  compute floor, batch {bs} ({must} tokens at {peak:.0f} tok/s)", f"{len(items) / floor_s:.2f}",
                      f"{gen_tokens / floor_s:.1f}", f"{floor_s:.1f}", f"{single_s / floor_s:.2f}x", "")
        # what evaluation.perplexity adds: the reference answers' teacher-forced NLL, with the batch's shared prefix run
        # once (as decoding does) and, for comparison, every prompt whole; "speed-up" is against this batch's generation
        import tunewise.engine.prefill as engine_module

        refs = [r.label or r.answer for r in items]
        default_min = engine_module.MIN_SHARED_PREFIX
        for how, min_shared in (("shared prefix", default_min), ("whole prompts", 10**9)):
            engine_module.MIN_SHARED_PREFIX = min_shared
            t0 = time.time()
            eng.reference_nll(convs, refs, batch_size=bs)
            nll_s = time.time() - t0
            table.add_row(f"  reference NLL, {how}, batch {bs}", f"{len(items) / nll_s:.2f}", "", f"{nll_s:.1f}",
                          f"{batched_s / nll_s:.2f}x of generation", "")
        engine_module.MIN_SHARED_PREFIX = default_min
    Console(width=160).print(table)


def peak_tokens_per_s(eng) -> float:
    """Tokens/s of a large batched forward (8 x 128 tokens, output head on the last position only)."""
    import torch

    ids = torch.randint(1000, 20000, (8, 128))
    with torch.no_grad():
        eng.model(input_ids=ids, logits_to_keep=1)
        t0 = time.time()
        for _ in range(2):
            eng.model(input_ids=ids, logits_to_keep=1)
    return 2 * ids.numel() / (time.time() - t0)


if __name__ == "__main__":
    main()
