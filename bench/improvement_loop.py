"""The improvement loop end to end on BANKING77, through the CLI a user runs, with 5 intents held back.

Stages (each one skipped when its output is there, so a stopped run goes on where it was):
1. build:    a project in OUT/ from the example's data (PolyAI BANKING77, CC BY 4.0): 5 seeded intents are
             held back from training; a production pool of queries (`--new-per-intent` of each held-back
             intent and `--known-per-intent` of each of the 72 others) is taken out of the training file;
             the test file is the whole BANKING77 test split (77 intents).
2. train:    `tunewise train OUT/tunewise.yaml` (the automatic defaults within training.max_minutes).
3. gate:     `tunewise gate OUT/tunewise.yaml` against the base (promoted with --force if a safety check blocks:
             the first model has no production model to beat on the task).
4. replay:   `tunewise serve` on loopback; the pool's queries go through /v1/chat/completions with the 77 labels
             as `structured_outputs.choice` (the routing app knows its intents, old and new), 8 clients at once.
5. feedback: a seeded `--correct-share` of the wrong answers get rating -1 with the true intent as correction,
             `--praise-share` of the right ones rating +1.
6. monitor:  `tunewise monitor` (drift, far queries clustered: are the clusters the held-back intents?).
7. harvest:  `tunewise data harvest`, then the harvest's sft.jsonl added to data.include in the config.
8. retrain:  `tunewise retrain OUT/tunewise.yaml` (data changed: trains from the production model, gates, promotes).
9. report:   from the re-training gate's per-item scores (both models on the same 3,080 test items, the same
             label set): accuracy on the 5 new intents and on the 72 others, before and after, with 95% CIs.

    python bench/improvement_loop.py --out /tmp/loop [--minutes 8] [--retrain-minutes 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "support-intents" / "data"
EXAMPLE = ROOT / "examples" / "support-intents" / "tunewise.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, start_server, stop_server  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNEWISE_API_KEYS": ""}


def tw(*args: str, ok=(0,)) -> int:
    cmd = [sys.executable, "-m", "tunewise.cli", *args]
    print("$ tunewise " + " ".join(args), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, env=ENV)
    print(f"  -> exit {rc} in {time.time() - t0:.0f} s", flush=True)
    if rc not in ok:
        raise SystemExit(f"tunewise {args[0]} failed with exit {rc}")
    return rc


def read_csv(p: Path) -> list[dict]:
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(p: Path, rows: list[dict]) -> None:
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)


def build(out: Path, a) -> dict:
    rows = read_csv(DATA / "train.csv")
    labels = sorted({r["category"] for r in rows})
    rng = random.Random(a.seed)
    new = sorted(rng.sample(labels, a.new_intents))
    by = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r)
    train, pool = [], []
    for lab in labels:
        rs = by[lab][:]
        rng.shuffle(rs)
        k = a.new_per_intent if lab in new else a.known_per_intent
        pool += rs[:k]
        if lab not in new:
            train += rs[k:]
    rng.shuffle(pool)
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_csv(out / "data" / "train.csv", train)
    shutil.copy(DATA / "test.csv", out / "data" / "test.csv")
    with open(out / "data" / "pool.jsonl", "w") as f:
        for r in pool:
            f.write(json.dumps({"text": r["text"], "category": r["category"]}) + "\n")
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["project"] = "loop"
    cfg["output_dir"] = "runs"
    cfg["data"]["train"], cfg["data"]["test"] = "data/train.csv", "data/test.csv"
    cfg["training"]["max_minutes"] = a.minutes
    cfg["evaluation"]["variants"] = [{"name": "fine-tuned", "kind": "fine-tuned"}]
    (out / "tunewise.yaml").write_text("# BANKING77 with 5 intents held back (bench/improvement_loop.py)\n" + yaml.safe_dump(cfg, sort_keys=False))
    meta = {"new_intents": new, "labels": labels, "train": len(train), "pool": len(pool),
            "pool_new": sum(r["category"] in new for r in pool), "seed": a.seed}
    (out / "build.json").write_text(json.dumps(meta, indent=1))
    print(f"built {out}: held back {new}; {len(train)} training rows, {len(pool)} production queries ({meta['pool_new']} of new intents)")
    return meta


def replay(out: Path, meta: dict, a) -> None:
    import httpx2 as httpx

    cfg = yaml.safe_load((out / "tunewise.yaml").read_text())
    system = cfg["data"]["system_prompt"]
    pool = [json.loads(x) for x in (out / "data" / "pool.jsonl").read_text().splitlines()]
    port = free_port()
    proc = start_server(out / "tunewise.yaml", port, 32, ENV)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()

    def ask(r: dict) -> dict:
        body = {"model": "production", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": r["text"]}],
                "structured_outputs": {"choice": meta["labels"]}}
        for attempt in range(5):
            resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
            if resp.status_code == 429:
                time.sleep(1 + attempt)
                continue
            resp.raise_for_status()
            j = resp.json()
            return {"id": j["id"], "text": r["text"], "category": r["category"], "answer": j["choices"][0]["message"]["content"],
                    "model": j["model"]}
        raise RuntimeError("429 five times")

    try:
        with cf.ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(ask, pool))
        wall = time.time() - t0
        rng = random.Random(a.seed + 1)
        sent = {"corrections": 0, "praise": 0}
        for r in answers:
            wrong = r["answer"] != r["category"]
            if wrong and rng.random() < a.correct_share:
                fb = {"id": r["id"], "rating": -1, "correction": r["category"]}
                sent["corrections"] += 1
            elif not wrong and rng.random() < a.praise_share:
                fb = {"id": r["id"], "rating": 1}
                sent["praise"] += 1
            else:
                continue
            resp = httpx.post(url + "/v1/feedback", json=fb, timeout=60)
            resp.raise_for_status()
            r["feedback"] = fb
    finally:
        stop_server(proc, 30)
    new = set(meta["new_intents"])
    acc = lambda rs: sum(r["answer"] == r["category"] for r in rs) / max(1, len(rs))  # noqa: E731
    summary = {"queries": len(answers), "wall_s": round(wall, 1), "qps": round(len(answers) / wall, 2),
               "accuracy_new": acc([r for r in answers if r["category"] in new]),
               "accuracy_known": acc([r for r in answers if r["category"] not in new]),
               "answered_new_labels": sum(r["answer"] in new for r in answers), **sent,
               "corrections_new": sum(1 for r in answers if r.get("feedback", {}).get("rating") == -1 and r["category"] in new)}
    with open(out / "replay.jsonl", "w") as f:
        for r in answers:
            f.write(json.dumps(r) + "\n")
    (out / "replay.json").write_text(json.dumps(summary, indent=1))
    print("replay:", summary)


def add_harvest(out: Path) -> None:
    p = out / "tunewise.yaml"
    text = p.read_text()
    cfg = yaml.safe_load(text)
    cfg["data"]["include"] = [{"format": "openai", "path": "runs/loop/harvest/sft.jsonl"}]
    p.write_text(text.split("\n", 1)[0] + "\n" + yaml.safe_dump(cfg, sort_keys=False))


def ci(xs: list[float]) -> tuple[float, float, float]:
    from tunewise.eval.stats import bootstrap_ci

    e = bootstrap_ci(xs)
    return e.mean, e.low, e.high


def report(out: Path, meta: dict) -> dict:
    task = out / "runs" / "loop" / "gate" / "task"
    test = read_csv(out / "data" / "test.csv")
    new = set(meta["new_intents"])

    def items(variant: str) -> list[dict]:
        return [json.loads(x) for x in (task / variant / "items.jsonl").read_text().splitlines()]

    before, after = items("production"), items("candidate")
    assert [b["input"] for b in before] == [c["input"] for c in after], "the two models were not scored on the same items"
    res = {}
    for part, keep in (("new intents (5)", lambda r: r["reference"] in new), ("other intents (72)", lambda r: r["reference"] not in new),
                       ("all (77)", lambda r: True)):
        b = [x["scores"]["accuracy"] for x in before if keep(x)]
        c = [x["scores"]["accuracy"] for x in after if keep(x)]
        d = [cc - bb for bb, cc in zip(b, c)]
        res[part] = {"n": len(b), "before": ci(b), "after": ci(c), "diff": ci(d)}
    gate = json.loads((out / "runs" / "loop" / "gate" / "gate.json").read_text())
    res["gate"] = {"action": gate["action"], "reasons": gate["reasons"],
                   "checks": [{k: c[k] for k in ("check", "reference", "candidate", "passed")} for c in gate["checks"]]}
    res["test_items"] = len(test)
    (out / "loop.json").write_text(json.dumps(res, indent=1))
    print("\n| test items | n | before [95% CI] | after [95% CI] | after - before [95% CI] |\n|---|---|---|---|---|")
    for part in ("new intents (5)", "other intents (72)", "all (77)"):
        r = res[part]
        f = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"  # noqa: E731
        print(f"| {part} | {r['n']} | {f(r['before'])} | {f(r['after'])} | {f(r['diff'])} |")
    print("\ngate:", res["gate"]["action"], res["gate"]["reasons"])
    for c in res["gate"]["checks"]:
        print(f"  {c['check']}: {c['reference']:.3f} -> {c['candidate']:.3f} {'pass' if c['passed'] else 'FAIL'}")
    return res


def monitor_summary(out: Path, meta: dict) -> dict:
    """What the monitor said, and whether its far-query and surge clusters are the held-back intents."""
    from collections import Counter

    m = json.loads((out / "runs" / "loop" / "monitor" / "monitor.json").read_text())
    pool = {json.loads(x)["text"]: json.loads(x)["category"] for x in (out / "data" / "pool.jsonl").read_text().splitlines()}
    new = set(meta["new_intents"])
    res = {"alerts": m["alerts"], "drift": m.get("drift"), "pool_new": meta["pool_new"]}
    print("\nmonitor alerts:", *res["alerts"], sep="\n  ")
    print(f"drift: {json.dumps(res['drift'], default=str)[:300]}")
    for kind in ("far", "surges"):
        if kind not in m:
            continue
        clusters = []
        for c in m[kind]["clusters"]:
            top, k = Counter(pool.get(q, "?") for q in c["queries"]).most_common(1)[0]
            clusters.append({"size": c["size"], "top_intent": top, "top_share": round(k / c["size"], 3), "new": top in new,
                             "example": c["examples"][0]})
        of_new = sum(pool.get(q) in new for c in m[kind]["clusters"] for q in c["queries"])
        led = sorted({c["top_intent"] for c in clusters if c["new"] and c["size"] >= 3})
        res[kind] = {"count": m[kind]["count"], "share": m[kind]["share"], "of_new_intents": of_new, "clusters": clusters[:12],
                     "clusters_led_by_new": led}
        print(f"{kind}: {m[kind]['count']} queries ({m[kind]['share']:.1%}), {of_new} of them from the new intents "
              f"(of {meta['pool_new']} new-intent queries); clusters led by a new intent (size >= 3): {led}")
        for c in clusters[:8]:
            print(f"  {c['size']:4d}  {c['top_intent']}{' (new)' if c['new'] else ''} {c['top_share']:.0%}  {c['example'][:70]!r}")
    (out / "monitor-summary.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-intents", type=int, default=5)
    ap.add_argument("--new-per-intent", type=int, default=60, help="Production queries of each held-back intent.")
    ap.add_argument("--known-per-intent", type=int, default=6, help="Production queries of each known intent.")
    ap.add_argument("--minutes", type=float, default=8, help="training.max_minutes of the first training.")
    ap.add_argument("--retrain-minutes", type=float, default=8, help="training.max_minutes of the re-training.")
    ap.add_argument("--correct-share", type=float, default=0.5, help="Share of wrong answers that get a correction.")
    ap.add_argument("--praise-share", type=float, default=0.2, help="Share of right answers rated +1.")
    ap.add_argument("--first-gate-samples", type=int, default=500, help="Test items of the first gate (against the base).")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfgp = str(out / "tunewise.yaml")
    t_start = time.time()
    stamps = json.loads((out / "stamps.json").read_text()) if (out / "stamps.json").exists() else {}

    def stage(name: str, fn) -> None:
        if name in stamps:
            print(f"[{name}] done before ({stamps[name]:.0f} s)")
            return
        print(f"[{name}]", flush=True)
        t0 = time.time()
        fn()
        stamps[name] = time.time() - t0
        (out / "stamps.json").write_text(json.dumps(stamps, indent=1))

    stage("build", lambda: build(out, a))
    meta = json.loads((out / "build.json").read_text())
    stage("train", lambda: tw("train", cfgp))

    def first_gate():
        rc = tw("gate", cfgp, "--set", f"evaluation.max_samples={a.first_gate_samples}", ok=(0, 1))
        if rc == 1:
            tw("models", "promote", cfgp, "loop:1", "--force")
        shutil.copytree(out / "runs" / "loop" / "gate", out / "first-gate", dirs_exist_ok=True)

    stage("gate", first_gate)
    stage("replay", lambda: replay(out, meta, a))
    stage("monitor", lambda: tw("monitor", cfgp, ok=(0, 3)))
    stage("harvest", lambda: (tw("data", "harvest", cfgp), add_harvest(out)))
    stage("retrain", lambda: tw("retrain", cfgp, "--set", f"training.max_minutes={a.retrain_minutes}", ok=(0, 1)))
    monitor_summary(out, meta)
    report(out, meta)
    print(f"stages (s): {json.dumps({k: round(v) for k, v in stamps.items()})}; this call {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
