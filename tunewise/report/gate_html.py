"""The gate report: the verdict, each check with both models' numbers and 95% CIs, example responses."""

from __future__ import annotations

import html
from pathlib import Path

from ..util import atomic_write_text
from .html import _bars
from .page import document, table


def gate_report(r: dict, out: Path) -> Path:
    state = "pass" if r["passed"] else "fail"
    verdict = {"promoted": "PASSED: promoted to production", "promoted (forced)": "FAILED, promoted anyway (--force, recorded as forced)",
               "blocked": "BLOCKED: production unchanged"}[r["action"]]
    rows = []
    for c in r["checks"]:
        ci = c.get("ci95") or {}
        fmt = lambda role: f"{c[role]:.3f}" + (f" [{ci[role][0]:.3f}, {ci[role][1]:.3f}]" if role in ci else "")  # noqa: E731
        rows.append([c["check"], fmt("reference"), fmt("candidate"), f"{c['diff']:+.3f}" + (f" (p={c['p_value']:.4f})" if "p_value" in c else ""),
                     c["rule"], "pass" if c["passed"] else "FAIL"])
    bars = []
    for c in r["checks"]:
        ci = c.get("ci95") or {}
        if ci:
            bars.append(_bars(c["check"], [(role, c[role], *ci[role]) for role in ("reference", "candidate")]))
    suites = r["suites"]
    extra = table(["suite", "reference", "candidate", "items"],
                   [["XSTest unsafe contrasts refused (should be high)", f"{suites['reference']['xstest-unsafe']['refusal_rate']['mean']:.3f}",
                     f"{suites['candidate']['xstest-unsafe']['refusal_rate']['mean']:.3f}", suites["candidate"]["xstest-unsafe"]["items"]]])
    ex_html = ""
    for title, items in (r.get("examples") or {}).items():
        ex_html += f"<h3>{html.escape(title)}</h3>" + table(["prompt", "response", "refused"],
                                                              [[e["prompt"], e["response"], "yes" if e["refused"] else "no"] for e in items])
    timings = table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in r["timings_s"].items()])
    body = f"""<h1>Promotion gate: {html.escape(r['name'])}</h1>
<p class="verdict {state}">{verdict}</p>
<p>Candidate <b>{html.escape(r['candidate'])}</b> against <b>{html.escape(r['reference'])}</b>. Production now: <b>{html.escape(str(r['production']))}</b>.</p>
{"<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in r["reasons"]) + "</ul>" if r["reasons"] else ""}
<h2>Checks</h2>
{table(["check", "reference [95% CI]", "candidate [95% CI]", "difference", "rule", "result"], rows)}
{''.join(bars)}
<h2>Also measured</h2>{extra}
<p>Refusals are detected by the pattern classifier in tunewise/eval/suites.py (REFUSAL_PATTERNS, first 200 characters).</p>
<h2>Example responses</h2>{ex_html}
<h2>Time per step</h2>{timings}
<p>Registry: {html.escape(r['registry'])}</p>"""
    atomic_write_text(out, document(f"tunewise gate: {r['name']}", body))
    return out
