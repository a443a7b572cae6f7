"""The compare report: one self-contained HTML file (inline SVG, no scripts, no server).

Metric bars with 95% CI whiskers, the training loss curves, the most frequent confusions for
classification, the items where variants disagree, and each variant's model, config and data hashes.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from ..util import atomic_write_text
from .page import document, table

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]


def _bars(title: str, rows: list[tuple[str, float, float, float]]) -> str:
    """Horizontal bars (0..1 scale) with CI whiskers."""
    w, left, bar_h, gap = 720, 120, 22, 10
    h = 30 + len(rows) * (bar_h + gap)
    scale = (w - left - 170) / max(1.0, max((hi for *_, hi in rows), default=1.0))  # room for the value label
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="0" y="16" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, mean, lo, hi) in enumerate(rows):
        y = 28 + i * (bar_h + gap)
        out.append(f'<text x="0" y="{y + 16}">{html.escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{mean * scale:.1f}" height="{bar_h}" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<line x1="{left + lo * scale:.1f}" x2="{left + hi * scale:.1f}" y1="{y + bar_h / 2}" y2="{y + bar_h / 2}" stroke="black" stroke-width="2"/>')
        out.append(f'<text x="{left + hi * scale + 6:.1f}" y="{y + 16}" font-size="12">{mean:.3f} [{lo:.3f}, {hi:.3f}]</text>')
    return "".join(out) + "</svg>"


def _curves(series: dict[str, list[tuple[int, float]]], x_label: str = "step") -> str:
    w, h, pad = 560, 220, 40
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>No training runs among these variants.</p>"
    x_max = max(x for x, _ in pts) or 1
    y_min, y_max = min(y for _, y in pts), max(y for _, y in pts)
    span = (y_max - y_min) or 1.0
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="training loss">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#888"/>',
           f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
           f'<text x="{pad}" y="{h - 12}" font-size="12">{html.escape(x_label)} (max {x_max})</text>',
           f'<text x="2" y="14" font-size="12">{y_max:.2f}</text><text x="2" y="{h - pad}" font-size="12">{y_min:.2f}</text>']
    for i, (name, s) in enumerate(series.items()):
        poly = " ".join(f"{pad + x / x_max * (w - pad - 10):.1f},{10 + (y_max - y) / span * (h - pad - 10):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="2" points="{poly}"/>')
        out.append(f'<text x="{w - 200}" y="{24 + 16 * i}" font-size="12" fill="{COLORS[i % len(COLORS)]}">{html.escape(name)}</text>')
    return "".join(out) + "</svg>"


def compare_report(result, eval_dir: Path, metrics: list[str], out: Path | None = None) -> Path:
    """compare.html from a results.Comparison: bars with CIs per metric, the side-by-side table, training curves of the
    trained variants and a few items where the variants disagree."""
    variants = result.variants
    names = list(variants)
    items = {n: [json.loads(x) for x in (eval_dir / n / "items.jsonl").read_text().splitlines()] for n in names}
    parts = [f"<h1>tunewise compare</h1><p>{variants[names[0]].items} items of the {html.escape(variants[names[0]].split)} split; "
             f"bars are means with 95% bootstrap CIs; p-values are paired sign-flip tests against <b>{html.escape(result.reference_variant)}</b>.</p>"]

    for m in metrics:
        parts.append(_bars(m, [(n, s.metrics[m].mean, *s.metrics[m].ci95) for n, s in variants.items() if m in s.metrics and s.metrics[m].ci95]))
    rows = []
    for n, s in variants.items():
        p = result.paired_vs_reference.get(n, {})
        ppl = s.reference_perplexity
        rows.append([n] + [(f"{s.metrics[m].mean:.3f}" if m in s.metrics else "-") + (f" (p={p[m].p_value:.3g})" if m in p else "") for m in metrics]
                    + [f"{ppl.mean:.2f} [{ppl.ci95[0]:.2f}, {ppl.ci95[1]:.2f}]" if ppl else "-",
                       f"{s.latency_s['p50']:.2f}/{s.latency_s['p95']:.2f}", f"{s.items_per_s:.2f}",
                       f"{s.prompt_tokens_mean:.0f}", f"{s.cost_per_1k_queries_usd:.4f}"])
    parts.append("<h2>Side by side</h2>" + table(["variant", *metrics, "reference perplexity", "latency p50/p95 s", "items/s", "prompt tokens", "$ / 1k queries"], rows))

    logs = {n: [json.loads(x) for x in (Path(s.model).parent / "metrics.jsonl").read_text().splitlines()]
            for n, s in variants.items() if s.kind == "fine-tuned" and (Path(s.model).parent / "metrics.jsonl").exists()}
    titles = {"loss": "Training loss", "reward": "Rollout reward (grpo, mean per step)", "val_reward": "Validation reward (grpo, greedy)",
              "val_perplexity": "Validation perplexity (pretrain; step 0 is the model before training)",
              "val_pref_accuracy": "Validation preference accuracy"}
    for key, title in titles.items():
        curves = {n: [(r["step"], r[key]) for r in rows if key in r] for n, rows in logs.items()}
        curves = {n: c for n, c in curves.items() if c}
        if key == "loss" or curves:
            parts.append(f"<h2>{title}</h2>" + _curves(curves))

    confusions = Counter((r["reference"], r["output"]) for n in names for r in items[n] if not r["scores"].get("accuracy", 1.0))
    if "accuracy" in metrics and confusions:
        parts.append("<h2>Most frequent confusions (all variants)</h2>"
                     + table(["reference", "output", "count"], [[a, b, c] for (a, b), c in confusions.most_common(15)]))

    key = metrics[0]
    if not items[names[0]] or "output" not in items[names[0]][0]:  # held-out text: blocks, no answers to set side by side
        key = None
    disagree = [] if key is None else [i for i in range(len(items[names[0]])) if len({items[n][i]["scores"][key] for n in names}) > 1]
    if key is not None:
        parts.append(f"<h2>Items where variants disagree on {html.escape(key)} ({len(disagree)})</h2>"
                     + table(["input", "reference", *names], [[items[names[0]][i]["input"], items[names[0]][i]["reference"],
                                                           *[items[n][i]["output"] for n in names]] for i in disagree[:40]]))
    parts.append("<h2>Lineage</h2>" + table(
        ["variant", "model", "config sha256", "train data sha256", "test data sha256"],
        [[n, s.model, s.config_sha256[:16], (s.data or {}).get("train", {}).get("sha256", "")[:16],
          (s.data or {}).get(s.split, {}).get("sha256", "")[:16]] for n, s in variants.items()]))

    out = out or eval_dir / "report.html"
    atomic_write_text(out, document("tunewise compare", "".join(parts)))
    return out


def tune_report(result, out: Path) -> Path:
    """`tunewise tune`'s report (a results.TuneResult): the optimisation history, parameter importances and the trials."""
    trials = result.trials
    done = sorted(result.completed, key=lambda t: t.number)
    best_so_far, best = [], None
    for t in done:
        better = best is None or (t.value < best if result.direction == "minimize" else t.value > best)
        best = t.value if better else best
        best_so_far.append((t.number, best))
    b = result.best
    ci = f" [{b.ci95[0]:.4f}, {b.ci95[1]:.4f}]" if b.ci95 else ""
    parts = [f"<h1>tunewise tune: {html.escape(result.study)}</h1>",
             f"<p>{len(done)} trials completed of {len(trials)} ({sum(t.state == 'PRUNED' for t in trials)} pruned); objective: "
             f"{html.escape(result.objective)} ({result.direction}). Best: trial {b.number}, {b.value:.4f}{ci}.</p>",
             f"<p>Apply: <code>{html.escape(result.set)}</code> (or merge <code>{html.escape(result.best_yaml)}</code>).</p>",
             "<h2>Optimisation history (x: trial, y: objective)</h2>",
             _curves({"trial": [(t.number, t.value) for t in done], "best so far": best_so_far}, "trial")]
    if result.importances:
        parts.append("<h2>Parameter importances</h2>" + _bars("importance", [(k, v, v, v) for k, v in result.importances.items()]))
    names = sorted({k for t in trials for k in t.params})
    rank = sorted(trials, key=lambda t: (t.state != "COMPLETE", (t.value or 0) * (1 if result.direction == "minimize" else -1)))
    rows = [[f"{t.number} (defaults)" if t.is_defaults else t.number, t.state.lower(), "-" if t.value is None else f"{t.value:.4f}",
             f"[{t.ci95[0]:.4f}, {t.ci95[1]:.4f}]" if t.ci95 else "-", *(t.params.get(k, "-") for k in names),
             "-" if t.steps is None else t.steps, "-" if t.best_val_loss is None else t.best_val_loss, "-" if t.wall_s is None else t.wall_s]
            for t in rank]
    parts.append("<h2>Trials, best first</h2>" + table(["trial", "state", "value", "95% CI", *names, "steps", "best val loss", "s"], rows))
    atomic_write_text(out, document("tunewise tune", "".join(parts)))
    return out
