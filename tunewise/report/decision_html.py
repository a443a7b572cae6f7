"""The decision report of `tunewise run`: one self-contained HTML file (inline SVG, no scripts).

The verdict, the evidence table per route (quality with CIs, latency, cost per 1k queries, training and
re-training cost, first-year cost), an accuracy-versus-cost plot, the ROI of the chosen route against
the cheapest route that fell short, the advice given before any run, and the steps taken.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..util import atomic_write_text
from .html import COLORS
from .page import document, table


def _usd(x) -> str:
    if x is None:
        return "-"
    return f"${x:,.2f}" if abs(x) >= 0.01 or x == 0 else f"${x:.2g}"


def _scatter(rows: list, threshold: float, metric: str) -> str:
    """Test-split quality (y) against first-year cost (x, log scale), the goal as a dashed line; rows: results.EvidenceRow."""
    w, h, left, bottom = 620, 300, 60, 40
    pts = [(max(r.first_year_usd, 1e-6), r.test or 0.0, r) for r in rows]
    if not pts:
        return ""
    lx = [math.log10(x) for x, _, _ in pts]
    x0, x1 = min(lx) - 0.5, max(lx) + 0.5
    sx = lambda v: left + (math.log10(v) - x0) / (x1 - x0) * (w - left - 20)  # noqa: E731
    sy = lambda v: h - bottom - v * (h - bottom - 20)  # noqa: E731
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{metric} versus first-year cost">',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#888"/>',
           f'<line x1="{left}" y1="10" x2="{left}" y2="{h - bottom}" stroke="#888"/>',
           f'<text x="{left}" y="{h - 8}" font-size="12">first-year cost (USD, log scale: {_usd(10 ** x0)} .. {_usd(10 ** x1)})</text>',
           f'<text x="4" y="16" font-size="12">{html.escape(metric)}</text><text x="30" y="{h - bottom}" font-size="12">0</text>'
           f'<text x="30" y="{sy(1.0) + 4:.0f}" font-size="12">1</text>',
           f'<line x1="{left}" x2="{w - 10}" y1="{sy(threshold):.1f}" y2="{sy(threshold):.1f}" stroke="#e15759" stroke-dasharray="5,4"/>',
           f'<text x="{w - 120}" y="{sy(threshold) - 4:.1f}" font-size="12" fill="#e15759">goal {threshold:g}</text>']
    for i, (x, y, r) in enumerate(pts):
        lo, hi = (r.test_ci95 or [y, y])
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" stroke="black"/>')
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{sx(x) + 9:.1f}" y="{sy(y) + 4:.1f}" font-size="12">{html.escape(r.route)} ({html.escape(r.variant)})</text>')
    return "".join(out) + "</svg>"


def step_sentence(s: dict) -> str:
    """One step of the workflow's journal as a sentence (the report's and the CLI's step list)."""
    name = s["step"]
    reused = " (reused: same inputs as the last run)" if s.get("reused") else ""
    if name == "data":
        o = s.get("outputs") or {}
        return "Prepared the data: " + ", ".join(f"{o[k]['records']:,} {k}" for k in ("train", "validation", "test") if k in o) + " records."
    if name == "advise":
        return f"Before measuring anything, the use case pointed to {s.get('recommendation')}."
    if name == "train":
        defaults = s.get("defaults") or []
        return (f"Fine-tuned for {s.get('steps')} steps in {float(s.get('wall_s') or 0):.0f} s{reused}"
                + (f"; settings: {'; '.join(defaults)}" if defaults else "") + ".")
    if name.startswith("validate "):
        v = s.get("value")
        return f"Scored {name[9:]} ({s.get('route')}) on the validation split: {'n/a' if v is None else f'{v:.3f}'}{reused}."
    if name == "goal met":
        return f"The goal was met by the {s.get('route')} route: {s.get('value'):.3f} >= {s.get('threshold'):g}."
    if name == "test compare":
        return f"Compared {', '.join(s.get('variants') or [])} side by side on the test split."
    if "skipped" in s:
        return f"Skipped {name}: {s['skipped']}."
    extra = {k: v for k, v in s.items() if k not in ("step", "at_s")}
    return f"{name}: " + ", ".join(f"{k} {v}" for k, v in extra.items()) + "."


def _roi_html(d) -> str:
    """The ROI against the cheapest route that fell short, and hosted against local where both were measured."""
    g, roi, hv = d.goal, d.roi, d.hosted_vs_local
    roi_html = "<p>No cheaper route fell short, so there is nothing to compare the cost against.</p>"
    if d.why and not roi:
        roi_html = f"<p>{html.escape(d.why)}</p>"
    if roi:
        roi_html = (f"<p>Against <b>{html.escape(roi.against)}</b> (the cheapest route that fell short): "
                    f"{roi.accuracy_gain:+.3f} {g.metric} for {_usd(roi.extra_cost_usd_per_year)} more per year, "
                    f"{roi.more_correct_answers_per_year:,.0f} more correct answers a year"
                    + (f", {_usd(roi.cost_per_extra_correct_answer_usd)} per extra correct answer" if roi.cost_per_extra_correct_answer_usd is not None else "")
                    + (f"; ROI {roi.roi:.1f}x at the configured value per correct answer" if roi.roi is not None else "") + ".</p>")
    if hv:
        be = hv.break_even_queries_per_day
        roi_html += (f"<p><b>Hosted or local.</b> {html.escape(hv.local)} (trained, ours) against {html.escape(hv.hosted)} (hosted): "
                     f"{hv.quality_diff:+.3f} {html.escape(g.metric)} on test; {_usd(hv.local_per_1k_usd)} against {_usd(hv.hosted_per_1k_usd)} "
                     f"per 1k queries; first year {_usd(hv.local_first_year_usd)} against {_usd(hv.hosted_first_year_usd)} at "
                     f"{hv.queries_per_day:,} queries/day. "
                     + (f"The trained model costs less above {be:,.0f} queries/day." if be is not None else
                        "The trained model never costs less per query, so the hosted one stays cheaper at any volume.") + "</p>")
    return roi_html


def decision_report(d, out: Path) -> Path:
    """report.html from a results.Decision."""
    g = d.goal
    ev = d.evidence
    headers = ["route", "variant", f"{g.metric} (validation)", f"{g.metric} (test) [95% CI]", "meets goal", "latency p50/p95 s",
               "items/s", "prompt tok", "$ / 1k queries", "training", "re-training / yr", "serving / yr", "first year"]
    rows = []
    for r in ev:
        ci = r.test_ci95 or [None, None]
        rows.append([r.route, r.variant, f"{r.validation:.3f}" if r.validation is not None else "-",
                     f"{r.test:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if r.test is not None else "-", "yes" if r.meets_goal else "no",
                     f"{r.latency_p50_s:.2f} / {r.latency_p95_s:.2f}", f"{r.items_per_s:.2f}", f"{r.prompt_tokens:.0f}",
                     _usd(r.per_1k_queries_usd) + (" (hosted)" if r.hosted else ""),
                     f"{_usd(r.training_usd)} ({r.training_hours * 60:.1f} min)" if r.training_hours else "-",
                     _usd(r.retraining_usd_per_year), _usd(r.serving_usd_per_year), _usd(r.first_year_usd)])
    for n in d.not_measured:
        rows.append([n["route"], n["variant"], "not measured: " + n["reason"]] + [""] * (len(headers) - 3))
    verdict = (f"<b>{html.escape(d.chosen)}</b> ({html.escape(d.chosen_variant)}) meets {g.metric} &ge; {g.threshold:g} "
               f"at the lowest first-year cost. {html.escape(d.why)}" if d.met else
               f"No route reached {g.metric} &ge; {g.threshold:g}; the best was <b>{html.escape(d.chosen)}</b>. "
               f"{html.escape(d.why)} Try more training steps, more or cleaner data, or a larger model.")
    roi_html = _roi_html(d)
    untried = d.estimates_for_untried
    untried_html = table(["route (not run)", "est. $ / 1k queries", "est. training", "est. first year"],
                          [[r, _usd(e["per_query_usd"] * 1000), f"{_usd(e['training_usd'])} ({e['training_hours'] * 60:.1f} min)", _usd(e["first_year_usd"])]
                           for r, e in untried.items()]) if untried else ""
    adv = d.advice_before
    adv_rows = [[r["route"], str(r["points"]), "; ".join(r["reasons"])] for r in adv["ranking"]]
    steps = "<ol>" + "".join(f"<li>{html.escape(step_sentence(s))} <small>({s['at_s']:.0f} s)</small></li>" for s in d.steps) + "</ol>"
    hw = d.hardware
    body = f"""<h1>tunewise decision</h1>
<p class="verdict">{verdict}</p>
<p>Goal: {html.escape(g.metric)} &ge; {g.threshold:g} on the validation split; the search stopped at
<b>{html.escape(str(d.met_at))}</b>. Test-split numbers below come from the same variants on held-out items.
Hardware: {html.escape(hw['name'])} ({hw['device']}, measured {hw['tflops']:.3f} matmul TFLOP/s, {_usd(hw['hour_usd'])}/h).
Volume: {d.use_case['queries_per_day']:,} queries/day. Wall time {d.wall_s:.0f} s.</p>
<h2>Evidence</h2>{table(headers, rows)}
<h2>Quality versus cost</h2>{_scatter(ev, g.threshold, g.metric)}
<h2>Return on investment</h2>{roi_html}
{"<h2>Routes not run (cost-model estimates)</h2>" + untried_html if untried_html else ""}
<h2>Advice before any run</h2><p>Recommended: <b>{html.escape(adv['recommendation'])}</b>.</p>{table(["route", "points", "reasons"], adv_rows)}
<h2>Steps</h2>{steps}
<p>Prices: {html.escape(json.dumps(d.prices))}. Config sha256 {d.config_sha256[:16]}.</p>
"""
    atomic_write_text(out, document("tunewise decision", body))
    return out
