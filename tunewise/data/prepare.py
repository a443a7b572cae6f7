"""`tunewise data prepare`: read -> validate -> quarantine -> split -> leakage check -> write.

Every input record is accounted for: it lands in a split or in quarantine.jsonl with its reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import ProjectConfig
from ..util import atomic_write_json, read_jsonl, sha256_file, write_jsonl
from .formats import read_records
from .records import BadRecord, Record
from .split import find_leaks, split_records

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    dir: Path
    splits: dict[str, list[Record]]
    summary: dict


def _read(cfg: ProjectConfig, path: Path, limit: int | None, bad: list[BadRecord]) -> list[Record]:
    good = []
    for item in read_records(path, cfg.data.format, cfg.data.columns, cfg.data.system_prompt):
        if isinstance(item, BadRecord):
            bad.append(item)
        else:
            good.append(item)
            if limit and len(good) >= limit:
                break
    return good


def prepare_data(cfg: ProjectConfig, out_dir: Path | None = None, tokenizer=None) -> Prepared:
    out_dir = out_dir or cfg.run_dir / "data"
    bad: list[BadRecord] = []
    inputs = {}
    train_path = cfg.path(cfg.data.train)
    inputs["train"] = {"path": str(train_path), "sha256": sha256_file(train_path)}
    from .clean import Cleaner

    cleaner = Cleaner(cfg.data.clean)
    raw = _read(cfg, train_path, cfg.data.limit, bad)
    read_counts = {"train": len(raw)}
    records = cleaner.run(raw, bad)
    fixed: dict[str, list[Record]] = {}
    for name in ("validation", "test"):
        p = cfg.path(getattr(cfg.data, name))
        if p is not None:
            inputs[name] = {"path": str(p), "sha256": sha256_file(p)}
            raw = _read(cfg, p, None, bad)
            read_counts[name] = len(raw)
            fixed[name] = cleaner.run(raw, bad, drop=False)  # evaluation files are normalised, never thinned

    s = cfg.data.split
    splits = split_records(
        records,
        validation=0.0 if "validation" in fixed else s.validation,
        test=0.0 if "test" in fixed else s.test,
        seed=s.seed,
        stratify=s.stratify,
    )
    for name, recs in fixed.items():
        splits[name] = recs
    leaks = find_leaks(splits)
    near = cleaner.near_leaks(splits) if cfg.data.clean.near_dedup else []
    exact_train = {src for leak in leaks for src in leak["splits"].get("train", [])}
    near = [n for n in near if n["train"] not in exact_train]  # reported once, as exact
    dropped_leaks = 0
    if cfg.data.clean.drop_leaks:
        leaking = exact_train | {n["train"] for n in near}
        why = {n["train"]: f"leaks into {n['split']}: near-duplicate (Jaccard {n['jaccard']}) of {n['other']}" for n in near}
        kept = []
        for r in splits["train"]:
            if r.source in leaking:
                file, _, where = r.source.rpartition(":")
                bad.append(BadRecord(file, where, why.get(r.source, "leaks into an evaluation split: same prompt"), r.to_json()))
                dropped_leaks += 1
            else:
                kept.append(r)
        splits["train"] = kept
        leaks = find_leaks(splits)
        near = []

    from .clean import quality_scores

    scores = quality_scores(splits["train"], signatures=cleaner.signatures(splits["train"]) if cfg.data.clean.num_perm == 128 else None)
    selected = None
    if cfg.data.clean.select and cfg.data.clean.select < len(splits["train"]):
        order = sorted(range(len(scores)), key=lambda i: (-scores[i]["score"], i))
        keep = set(order[: cfg.data.clean.select])
        cut = scores[order[cfg.data.clean.select - 1]]["score"]
        kept = []
        for i, r in enumerate(splits["train"]):
            if i in keep:
                kept.append(r)
            else:
                file, _, where = r.source.rpartition(":")
                bad.append(BadRecord(file, where, f"not selected: quality score {scores[i]['score']:.3f} below the cut {cut:.3f} ({scores[i]})", r.to_json()))
        splits["train"] = kept
        scores = [scores[i] for i in sorted(keep)]
        selected = {"kept": len(kept), "cut": cut}
    import numpy as np

    score_values = np.array([s_["score"] for s_ in scores]) if scores else np.zeros(0)
    quality = {"selected": selected, "histogram": np.histogram(score_values, bins=10, range=(0, 1))[0].tolist() if len(score_values) else [],
               "mean": float(score_values.mean()) if len(score_values) else None,
               "lowest": sorted(({"source": r.source, **q} for r, q in zip(splits["train"], scores)), key=lambda x: x["score"])[:10]}

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name in SPLITS:
        write_jsonl(out_dir / f"{name}.jsonl", (r.to_json() for r in splits[name]))
        outputs[name] = {"records": len(splits[name]), "sha256": sha256_file(out_dir / f"{name}.jsonl")}
    write_jsonl(out_dir / "quarantine.jsonl", (b.to_json() for b in bad))

    # Group reasons by their shape (numbers elided) so the summary counts kinds of problems.
    reasons = Counter(re.sub(r"\d+", "N", b.reason) for b in bad)
    summary = {
        "inputs": inputs,
        "outputs": outputs,
        "read": {"valid": sum(read_counts.values()), "kept": len(records) + sum(len(v) for v in fixed.values()), "quarantined": len(bad)},
        "cleaning": cleaner.report(),
        "quality": quality,
        "quarantine_reasons": dict(reasons.most_common()),
        "quarantine_examples": [str(b) for b in bad[:20]],
        "labels": {name: len({r.label for r in splits[name] if r.label is not None}) for name in SPLITS},
        "leaks": {"count": len(leaks), "examples": leaks[:20], "near_duplicates": len(near),
                  "near_examples": [{k: v for k, v in n.items() if k != "record"} for n in near[:20]], "dropped": dropped_leaks},
        "config": cfg.resolved()["data"],
    }
    if tokenizer is not None:
        from .tokenize import tokenize_records

        summary["tokens"] = {name: tokenize_records(tokenizer, splits[name], cfg.data.max_length)[1].summary() for name in SPLITS if splits[name]}
    from ..report.data_html import data_report

    summary["report"] = str(data_report(out_dir, summary, splits, bad))
    atomic_write_json(out_dir / "summary.json", summary)
    return Prepared(out_dir, splits, summary)


def load_prepared(data_dir: Path) -> Prepared | None:
    if not (data_dir / "summary.json").exists():
        return None
    import json

    summary = json.loads((data_dir / "summary.json").read_text())
    splits = {name: [Record.from_json(r) for r in read_jsonl(data_dir / f"{name}.jsonl")] for name in SPLITS}
    return Prepared(data_dir, splits, summary)


def prepared_is_current(cfg: ProjectConfig, prepared: Prepared) -> bool:
    """Prepared data is reused only if the inputs and the data config are unchanged."""
    s = prepared.summary
    if s.get("config") != cfg.resolved()["data"]:
        return False
    for name, info in s.get("inputs", {}).items():
        p = Path(info["path"])
        if not p.exists() or sha256_file(p) != info["sha256"]:
            return False
    return True


def ensure_prepared(cfg: ProjectConfig, tokenizer=None) -> Prepared:
    data_dir = cfg.run_dir / "data"
    existing = load_prepared(data_dir)
    if existing is not None and prepared_is_current(cfg, existing):
        return existing
    return prepare_data(cfg, data_dir, tokenizer)
