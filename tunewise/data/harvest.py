"""`tunewise data harvest`: the production log and its feedback turned into training data.

From each logged chat response that got feedback (the last feedback on an id counts):
- a correction gives an SFT record (the conversation and the corrected answer), a preference pair (the correction
  preferred over the model's answer) and two KTO examples (the correction desirable, the model's answer not);
- a good rating (1) without a correction gives an SFT record and a desirable KTO example (the model's answer);
- a bad rating (-1) without a correction gives an undesirable KTO example;
- a neutral rating (0) gives nothing.
Each record carries its provenance (request id, time, model version, rating, feedback time). The records go
through the project's cleaning (normalisation, PII redaction, filters: data.clean) and are deduplicated within
the harvest (the latest wins) and against the existing training data (the same normalised prompt): what is set
aside goes to quarantine.jsonl with the reason. Raw-prompt completions (/v1/completions) have no conversation to
learn from and are counted apart. Outputs, each in a format `data.format` reads:
`sft.jsonl` (openai; `label` set to the answer when the project's data is labelled), `preference.jsonl`
(openai-preference), `kto.jsonl` (trl-kto).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..config import ProjectConfig
from ..results import HarvestReport
from ..util import atomic_write_json, write_jsonl
from .clean import Cleaner
from .formats import read_records
from .prodlog import RequestLog
from .records import BadRecord, Record, validate_messages


def _existing_prompts(cfg: ProjectConfig) -> set[str]:
    keys = set()
    for path in (cfg.data.train, cfg.data.validation, cfg.data.test):
        if path is not None and cfg.path(path).exists():
            keys |= {r.prompt_key for r in read_records(cfg.path(path), cfg.data.format, cfg.data.columns, cfg.data.system_prompt, cfg.data.reasoning)
                     if isinstance(r, Record)}
    return keys


def harvest(cfg: ProjectConfig, out_dir: Path | None = None, log_dir: Path | None = None) -> HarvestReport:
    """Write sft.jsonl, preference.jsonl, kto.jsonl, quarantine.jsonl and report.json; return the report."""
    out_dir = Path(out_dir or cfg.run_dir / "harvest")
    plog = RequestLog(Path(log_dir or cfg.serve_log_dir))
    feedback = {}
    for f in plog.feedback.rows():
        feedback[f["id"]] = f  # the last word on an id counts
    counts: Counter = Counter()
    bad: list[BadRecord] = []
    labelled = bool(cfg.data.columns.label) if cfg.data.format in ("csv", "parquet") else False
    sft, pairs, kto = {}, {}, {}
    for req in plog.requests.rows():
        counts["requests"] += 1
        fb = feedback.get(req["id"])
        if fb is None:
            continue
        counts["with_feedback"] += 1
        if req.get("kind") != "chat.completion" or not isinstance(req.get("input"), list):
            counts["raw_prompt_skipped"] += 1
            continue
        prompt = [t for t in req["input"] if t["role"] in ("system", "user", "assistant")]
        if cfg.data.system_prompt and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": cfg.data.system_prompt}] + prompt
        answer = (req.get("outputs") or [""])[0]
        meta = {"request_id": req["id"], "ts": req.get("ts"), "model_version": req.get("model_version"), "rating": fb["rating"],
                "feedback_ts": fb.get("ts")}
        source = f"{plog.requests.path.name}:{req['id']}"
        correction, rating = fb.get("correction"), fb["rating"]
        good = correction or (answer if rating == 1 else None)
        why = validate_messages(prompt + [{"role": "assistant", "content": good or answer or "-"}])
        if why:
            bad.append(BadRecord(str(plog.requests.path), f"id {req['id']}", f"not a trainable conversation: {why}", req))
            continue
        if good:
            sft[source] = Record(prompt + [{"role": "assistant", "content": good}], source, good if labelled else None, meta)
            kto[source + "#good"] = Record(prompt + [{"role": "assistant", "content": good}], source, None, {**meta, "desirable": True})
        corrected = bool(correction and answer.strip() and correction.strip() != answer.strip())  # the model's answer was wrong
        if corrected:
            pairs[source] = Record(prompt + [{"role": "assistant", "content": correction}], source, None, {**meta, "rejected": answer})
        if (rating == -1 or corrected) and answer.strip():
            kto[source + "#bad"] = Record(prompt + [{"role": "assistant", "content": answer}], source, None, {**meta, "desirable": False})
        if rating == 0 and not correction:
            counts["neutral"] += 1
    existing = _existing_prompts(cfg)
    cleaner = Cleaner(cfg.data.clean)
    kept = {}
    for name, records in (("sft", sft), ("preference", pairs), ("kto", kto)):
        seen, out = {}, []
        for r in cleaner.transform(list(records.values())):
            if not cleaner.keep(r, bad):
                continue
            if r.prompt_key in existing:
                bad.append(BadRecord.of(r, "already in the training data (the same prompt)"))
                continue
            key = (r.prompt_key, r.answer, r.meta.get("desirable"))
            if key in seen:  # the latest feedback on the same prompt and answer wins
                bad.append(BadRecord.of(out[seen[key]], "a later response with the same prompt and answer was harvested"))
                out[seen[key]] = r
                continue
            seen[key] = len(out)
            out.append(r)
        kept[name] = out
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "sft.jsonl", [{"messages": r.messages, **({"label": r.label} if r.label else {}), **r.meta} for r in kept["sft"]])
    write_jsonl(out_dir / "preference.jsonl", [{"input": {"messages": r.messages[:-1]},
                                                "preferred_output": [r.messages[-1]],
                                                "non_preferred_output": [{"role": "assistant", "content": r.meta["rejected"]}],
                                                **{k: v for k, v in r.meta.items() if k != "rejected"}} for r in kept["preference"]])
    write_jsonl(out_dir / "kto.jsonl", [{"prompt": r.messages[:-1], "completion": [r.messages[-1]], "label": r.meta["desirable"],
                                         **{k: v for k, v in r.meta.items() if k != "desirable"}} for r in kept["kto"]])
    write_jsonl(out_dir / "quarantine.jsonl", [b.to_json() for b in bad])
    report = HarvestReport(log=str(plog.requests.dir), out=str(out_dir), **{k: counts[k] for k in ("requests", "with_feedback", "neutral", "raw_prompt_skipped")},
                           written={k: len(v) for k, v in kept.items()}, set_aside=len(bad),
                           reasons=dict(Counter(b.reason for b in bad).most_common()), cleaning=cleaner.report()["steps"])
    atomic_write_json(out_dir / "report.json", report.to_json())
    return report
