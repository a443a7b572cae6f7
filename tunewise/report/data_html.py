"""The data report: one self-contained HTML page beside the prepared data (inline SVG, no scripts).

Counts at every step, PII found by type, quality-score distribution, token-length histograms and label
distribution per split, near-duplicate clusters, leakage, and the quarantined records with reasons.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from ..util import atomic_write_text
from .html import COLORS
from .page import document, table

SPLITS = ("train", "validation", "test")


def _histogram_svg(title: str, edges: list[float], counts: list[int], color: str = COLORS[0]) -> str:
    w, h, pad = 560, 170, 30
    top = max(counts, default=0) or 1
    bw = (w - pad) / max(1, len(counts))
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="0" y="14" font-weight="bold">{html.escape(title)}</text>']
    for i, c in enumerate(counts):
        bh = c / top * (h - 2 * pad)
        out.append(f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{color}"><title>{edges[i]}-{edges[i + 1]}: {c}</title></rect>')
    out.append(f'<text x="{pad}" y="{h - 10}" font-size="11">{edges[0]}</text>')
    out.append(f'<text x="{w - 40}" y="{h - 10}" font-size="11">{edges[-1]}</text>')
    out.append(f'<text x="0" y="{pad + 4}" font-size="11">{top}</text>')
    return "".join(out) + "</svg>"


def _hbars(title: str, items: list[tuple[str, int]], color: str = COLORS[2]) -> str:
    w, left, bh, gap = 640, 260, 14, 3
    top = max((n for _, n in items), default=0) or 1
    h = 24 + len(items) * (bh + gap)
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="0" y="14" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, n) in enumerate(items):
        y = 22 + i * (bh + gap)
        out.append(f'<text x="0" y="{y + 11}" font-size="11">{html.escape(name[:40])}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{n / top * (w - left - 60):.1f}" height="{bh}" fill="{color}"/>')
        out.append(f'<text x="{left + n / top * (w - left - 60) + 4:.1f}" y="{y + 11}" font-size="11">{n}</text>')
    return "".join(out) + "</svg>"


def data_report(data_dir: Path, summary: dict, label_counts: dict[str, Counter], quarantine: list) -> Path:
    """label_counts: a Counter of labels per split; quarantine: the first records set aside (up to 100 shown)."""
    s = summary
    parts = [f"<h1>tunewise data report</h1><p>{html.escape(str(data_dir))}</p>"]
    read, c = s["read"], s.get("cleaning", {})
    rows = [["records read and valid", read["valid"]]]
    for name, st in c.get("steps", {}).items():
        rows.append([f"{name}", f"{st['changed']} changed" if st["changed"] else f"{st['dropped']} dropped"])
    lk = s["leaks"]
    if lk.get("dropped"):
        rows.append(["leakage (--drop-leaks)", f"{lk['dropped']} dropped"])
    q = s.get("quality", {})
    if q.get("selected"):
        rows.append(["--select", q["selected"]["text"]])
    rows += [[f"split: {n}", s["outputs"][n]["records"]] for n in SPLITS]
    rows.append(["quarantined (all reasons)", read["quarantined"]])
    parts.append("<h2>Counts at every step</h2>" + table(["step", "records"], rows))
    if c.get("pii_found"):
        parts.append(_hbars("PII redacted, by type", sorted(c["pii_found"].items(), key=lambda x: -x[1]), COLORS[3]))
    if q.get("histogram"):
        parts.append(_histogram_svg(f"quality score of training records (mean {q['mean']:.3f})", [round(i / 10, 1) for i in range(11)], q["histogram"], COLORS[4]))
        if q.get("lowest"):
            parts.append("<h3>Lowest-scoring training records</h3>" + table(["source", "score", "signals"], [[x["source"], x["score"], {k: v for k, v in x.items() if k not in ("source", "score")}] for x in q["lowest"]]))
    parts.append("<h2>Token lengths (after the chat template)</h2>")
    for i, name in enumerate(SPLITS):
        hist = s.get("tokens", {}).get(name, {}).get("length_histogram")
        if hist:
            parts.append(_histogram_svg(f"{name}: tokens per example", hist["edges"], hist["counts"], COLORS[i]))
    labelled = {n: label_counts.get(n, Counter()) for n in SPLITS}
    if any(labelled.values()):
        parts.append("<h2>Labels</h2>")
        for n in SPLITS:
            if labelled[n]:
                parts.append(_hbars(f"{n}: {len(labelled[n])} labels (top 25)", labelled[n].most_common(25)))
    clusters = c.get("near_duplicate_clusters") or []
    if clusters:
        parts.append("<h2>Near-duplicate clusters (first 50)</h2>" + table(["kept", "dropped", "Jaccard", "label conflict", "kept text", "dropped text"],
                     [[x["kept"], x["dropped"], x.get("jaccard", ""), "yes" if x["label_conflict"] else "", x["kept_text"], x["dropped_text"]] for x in clusters]))
    if lk["count"] or lk.get("near_duplicates"):
        parts.append(f"<h2>Leakage</h2><p>{lk['count']} prompts in more than one split; {lk.get('near_duplicates', 0)} training prompts nearly duplicate an evaluation prompt.</p>")
        parts.append(table(["prompt", "where"], [[x["prompt"][:100], json.dumps(x["splits"])] for x in lk["examples"]]))
        if lk.get("near_examples"):
            parts.append(table(["train", "evaluation", "Jaccard", "prompt"], [[x["train"], x["other"], x["jaccard"], x["prompt"][:100]] for x in lk["near_examples"]]))
    reasons = s.get("quarantine_reasons", {})
    parts.append("<h2>Quarantine</h2>" + table(["reason (numbers elided)", "records"], [[k, v] for k, v in reasons.items()]))
    if read["quarantined"] > len(quarantine[:100]):
        parts.append(f"<p>The first {len(quarantine[:100])} of {read['quarantined']}; all are in quarantine.jsonl.</p>")
    parts.append(table(["file", "where", "reason"], [[b.file, b.where, b.reason] for b in quarantine[:100]]))
    out = data_dir / "report.html"
    atomic_write_text(out, document("tunewise data report", "".join(parts)))
    return out
