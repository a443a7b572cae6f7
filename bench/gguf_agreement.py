"""A trained model against its GGUF exports: greedy answers on test items through the trained model (our engine) and
through each GGUF as an implementation that is not ours loads it (transformers' GGUF loader, which dequantises; and
llama.cpp itself through llama-cpp-python when it is installed). Prints agreement and accuracy side by side.

    python bench/gguf_agreement.py runs/support-intents/train/model runs/support-intents/data/test.jsonl --items 200

For a LoRA model, with --llama-cpp, llama.cpp also answers with the base model's GGUF and the adapter's LoRA GGUF
(`llama-server -m BASE.gguf --lora ADAPTER.gguf`), the base exported by the same writer at the same quantisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


LLAMA_CPP = """
import json, sys
from llama_cpp import Llama
path, convs, max_tokens = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
lora = sys.argv[4] if len(sys.argv) > 4 else None
# n_batch=1: llama-cpp-python 0.3.36 built here (AVX512/AMX CPU) segfaults in batched prompt evaluation of quantised
# files, llama.cpp's own Q4_1 SmolLM2 included; one token at a time it runs
llm = Llama(model_path=path, n_ctx=1024, verbose=False, n_threads=2, n_batch=1, lora_path=lora)
out = []
for c in convs:  # the GGUF's own chat template (its metadata), greedy
    r = llm.create_chat_completion(messages=c, max_tokens=max_tokens, temperature=0.0, top_k=1)
    out.append((r["choices"][0]["message"]["content"] or "").strip())
print(json.dumps(out))
"""


def _llama_cpp(python: str, path: Path, convs: list, max_tokens: int, work: Path, lora: str | None = None) -> list[str]:
    import subprocess

    (work / "convs.json").write_text(json.dumps(convs))
    done = subprocess.run([python, "-c", LLAMA_CPP, str(path), str(work / "convs.json"), str(max_tokens), *([lora] if lora else [])],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("test", type=Path, help="prepared test split (JSONL records)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--quants", default="f16,q8_0")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--llama-cpp", metavar="PYTHON", help="also answer through llama.cpp: a Python interpreter that has llama-cpp-python "
                                                        "(run in its own process: llama.cpp and torch in one process can crash)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewise.data.records import Record
    from tunewise.engine import Engine, model_ref_of
    from tunewise.metrics import normalize_label
    from tunewise.models import Loaded, load_model, resolve_model
    from tunewise.serve.export import export_gguf

    records = [Record.from_json(json.loads(x))
               for x in args.test.read_text().splitlines()[: args.items]]
    convs = [r.messages[:-1] for r in records]
    refs = [r.label or r.answer for r in records]
    t = time.time()
    base_ref, adapter_dir = model_ref_of(args.model_dir)
    trained = Engine.load(base_ref, str(args.model_dir), device="cpu", dtype="float32") if adapter_dir else \
        Engine(load_model(str(args.model_dir), device="cpu", dtype="float32"))
    ours = [o.text for o in trained.generate(convs, max_new_tokens=args.max_new_tokens, batch_size=16, adapter="default" if adapter_dir else None)]
    rows = [("trained model (tunewise engine)", ours, None, time.time() - t)]
    out = Path(tempfile.mkdtemp(prefix="gguf-agreement-"))
    for quant in args.quants.split(","):
        done = export_gguf(args.model_dir, out / quant, "model", quant=quant)
        path = Path(done.gguf.path)
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        eng = Engine(Loaded(model, tok, str(path), torch.device("cpu"), torch.float32))
        got = [o.text for o in eng.generate(convs, max_new_tokens=args.max_new_tokens, batch_size=16)]
        rows.append((f"{quant} GGUF via transformers' loader ({done.gguf.bytes / 2**20:.0f} MiB)", got, path, time.time() - t))
        if args.llama_cpp:
            t = time.time()
            got = _llama_cpp(args.llama_cpp, path, convs, args.max_new_tokens, out)
            rows.append((f"{quant} GGUF via llama.cpp (llama-cpp-python)", got, path, time.time() - t))
            if done.lora_gguf is not None:  # the base GGUF at the same quantisation, the adapter on top
                base = export_gguf(Path(resolve_model(base_ref)), out / f"base-{quant}", "base", quant=quant,
                                   pre=done.gguf.pre)
                t = time.time()
                got = _llama_cpp(args.llama_cpp, Path(base.gguf.path), convs, args.max_new_tokens, out, done.lora_gguf.path)
                rows.append((f"{quant} base GGUF + LoRA GGUF via llama.cpp ({done.lora_gguf.bytes / 2**20:.0f} MiB adapter)", got, path,
                             time.time() - t))
    print(f"{len(records)} test items, greedy, max {args.max_new_tokens} new tokens\n")
    print("| answered by | agrees with the trained model | accuracy | wall s |\n|---|---:|---:|---:|")
    for name, answers, _, wall in rows:
        agree = sum(a == b for a, b in zip(answers, ours)) / len(ours)
        acc = sum(normalize_label(a) == normalize_label(r) for a, r in zip(answers, refs)) / len(refs)
        print(f"| {name} | {agree:.3f} | {acc:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
