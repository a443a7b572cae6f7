"""Cleaning throughput and memory: N records through the whole `tunewise data prepare` pipeline.

The records are BANKING77 training queries made into a harder mix: every fifth one gets PII (email,
phone, card, IBAN or IP), 5% are exact copies and 5% near-copies (a word dropped or doubled) of earlier
ones, a few have broken whitespace. With --answer-chars C every answer also carries ~C characters of
SQuAD passage text (examples/knowledge-qa/kb), so the file grows with C while the record count stays.

Each prepare runs in a fresh child process; the table gives wall time per stage, records/s, the input
file's size, and the child's peak memory: peak RSS (which also counts the spool and signature files'
pages while they are mapped or cached by the process) and the peak of anonymous memory (RssAnon,
sampled every 20 ms: what the process itself holds). --data-limit-mb caps the child's data segment
(RLIMIT_DATA: heap and private mappings, not the file cache) to show that a file larger than the
memory allowed goes through.

    python bench/data_prep.py                                # 100,000 records, the speed target
    python bench/data_prep.py --records 100000,400000        # memory vs records
    python bench/data_prep.py --records 300000 --answer-chars 4000 --data-limit-mb 800   # 1.3 GB file
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PII = ["write to {n}.smith@example.com", "call +44 20 7946 {d:04d}", "card 4111 1111 1111 1111", "IBAN GB82 WEST 1234 5698 7654 32",
       "from 10.0.{a}.{b}"]


def make(path: Path, n: int, seed: int = 0, answer_chars: int = 0) -> None:
    """Write n records; duplicates are drawn from the last 50,000 made, so making the file needs little memory."""
    rng = random.Random(seed)
    rows = list(csv.DictReader(open(ROOT / "examples" / "support-intents" / "data" / "train.csv", encoding="utf-8")))
    prose = ""
    if answer_chars:
        prose = " ".join(json.loads(x)["text"] for x in open(ROOT / "examples" / "knowledge-qa" / "kb" / "passages.jsonl", encoding="utf-8"))
    out: list[tuple[str, str]] = []
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
            if len(out) > 50_000:
                out[rng.randrange(len(out))] = out.pop()
            answer = label
            if answer_chars:
                at = rng.randrange(len(prose) - answer_chars)
                answer = f"{label}\n\n{prose[at : at + answer_chars]}"
            f.write(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}], "label": label},
                               ensure_ascii=False) + "\n")


def child(config: str, data_limit_mb: int | None) -> None:
    """Run one prepare and print a JSON line with what was measured."""
    if data_limit_mb:
        resource.setrlimit(resource.RLIMIT_DATA, (data_limit_mb << 20, data_limit_mb << 20))
    peak_anon = [0]
    by_stage: dict[str, int] = {}
    stage = ["start"]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    kb = int(line.split()[1])
                    peak_anon[0] = max(peak_anon[0], kb)
                    by_stage[stage[0]] = max(by_stage.get(stage[0], 0), kb)
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from tunewise.config import load_config
    from tunewise.data.prepare import prepare_data

    cfg = load_config(config)
    t0 = time.time()
    p = prepare_data(cfg, progress=lambda name, n: stage.__setitem__(0, name))
    wall = time.time() - t0
    stop.set()
    s = p.summary
    print(json.dumps({"wall": wall, "timings": p.timings, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_anon_mb": peak_anon[0] / 1024, "anon_mb_by_stage": {k: round(v / 1024) for k, v in by_stage.items()}, "read": s["read"], "pii": s["cleaning"]["pii_found"],
                      "steps": {k: (v["changed"], v["dropped"]) for k, v in s["cleaning"]["steps"].items()},
                      "outputs": {k: v["records"] for k, v in s["outputs"].items()}}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="100000", help="Record counts, comma-separated: one run each.")
    ap.add_argument("--answer-chars", type=int, default=0, help="Characters of passage text added to every answer.")
    ap.add_argument("--data-limit-mb", type=int, default=None, help="RLIMIT_DATA for the prepare process.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args.child, args.data_limit_mb)
    import yaml
    from rich.console import Console
    from rich.table import Table

    rows = []
    for n in [int(x) for x in args.records.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix="tw-dataprep-"))
        t0 = time.time()
        make(tmp / "train.jsonl", n, answer_chars=args.answer_chars)
        gen_s = time.time() - t0
        (tmp / "tunewise.yaml").write_text(yaml.safe_dump({"project": "bench", "output_dir": "runs", "data": {
            "format": "openai", "train": "train.jsonl", "split": {"validation": 0.02, "test": 0.02}}}))
        cmd = [sys.executable, __file__, "--child", str(tmp / "tunewise.yaml")] + (["--data-limit-mb", str(args.data_limit_mb)] if args.data_limit_mb else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-3000:])
            sys.exit(f"prepare failed on {n} records (exit {res.returncode})")
        m = json.loads(res.stdout.strip().splitlines()[-1])
        m.update(n=n, file_mb=(tmp / "train.jsonl").stat().st_size / 2**20, gen_s=gen_s)
        rows.append(m)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    console = Console(width=140)
    for m in rows:
        t = Table(title=f"data prepare on {m['n']:,} records, {m['file_mb']:,.0f} MB ({os.cpu_count()} CPUs; making the file took {m['gen_s']:.0f} s)")
        t.add_column("stage")
        t.add_column("seconds", justify="right")
        for name, sec in m["timings"].items():
            t.add_row(name, f"{sec:.1f}")
        t.add_row("whole prepare", f"{m['wall']:.1f}")
        console.print(t)
        print(f"peak anonymous MB by stage: {m['anon_mb_by_stage']}")
        print(f"kept {m['read']['kept']:,} of {m['read']['valid']:,}; splits {m['outputs']}; steps (changed, dropped): {m['steps']}; PII: {m['pii']}")
    t = Table(title="memory vs input" + (f" (RLIMIT_DATA {args.data_limit_mb} MB)" if args.data_limit_mb else ""))
    for col in ("records", "file MB", "wall s", "records/s", "peak RSS MB", "peak anonymous MB", "anonymous bytes/record"):
        t.add_column(col, justify="right")
    for m in rows:
        t.add_row(f"{m['n']:,}", f"{m['file_mb']:,.0f}", f"{m['wall']:.1f}", f"{m['n'] / m['wall']:,.0f}", f"{m['peak_rss_mb']:,.0f}",
                  f"{m['peak_anon_mb']:,.0f}", f"{m['peak_anon_mb'] * 2**20 / m['n']:,.0f}")
    console.print(t)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"growth: {(b['peak_anon_mb'] - a['peak_anon_mb']) * 2**20 / (b['n'] - a['n']):,.0f} anonymous bytes per extra record "
              f"(the input grows by {(b['file_mb'] - a['file_mb']) * 2**20 / (b['n'] - a['n']):,.0f} bytes per record)")
    first = next((m for m in rows if m["n"] == 100_000), None)
    if first and not args.answer_chars:
        print(f"target: <= 60 s for 100,000 records: {'met' if first['wall'] <= 60 else 'NOT met'} ({first['wall']:.1f} s)")


if __name__ == "__main__":
    main()
