"""The dashboard's reading pages and the playground: data (cleaning counts, quarantine, near-duplicates, leaks;
searchable), compare (variants with CIs, per-item answers filterable by label and disagreement, confusions),
the decision (routes, evidence, cost, ROI, quality against cost), and a playground that chats with two models side
by side through the project's own OpenAI-compatible server (mounted at /p/N/api, streaming, RAG citations).

Charts are Vega-Lite specs rendered by the vendored vega, vega-lite and vega-embed builds (static/, no CDN).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from ..results import Comparison, Decision, Estimate
from ..report.page import Markup, script_json, table
from .common import UiError, page, project

STATIC = Path(__file__).parent / "static"
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
SHOWN = 200  # rows of a long list shown at once (the count says how many matched)

router = APIRouter()


def chart(cid: str, spec: dict) -> str:
    """A Vega-Lite chart; its view is kept in window.views[cid] (the live page inserts rows into it)."""
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v6.json", **spec}
    return (f'<div id="{cid}" class="chart"></div><script>vegaEmbed("#{cid}", {script_json(spec)}, {{renderer: "svg", actions: false}})'
            f'.then(r => {{(window.views = window.views || {{}})["{cid}"] = r.view;}});</script>')


def scripts() -> str:
    return "".join(f'<script src="/static/{s}"></script>' for s in SCRIPTS)


@router.get("/static/{name}")
async def static(name: str):
    if name not in SCRIPTS:
        raise UiError(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _stage_file(p, rel: str, what: str, command: str, job: str) -> dict:
    """A stage's JSON output in the project's run directory; a 404 saying which stage writes it when it is not there."""
    path = p.cfg.run_dir / rel
    if not path.exists():
        raise UiError(404, f"{p.cfg.project} has no {what} yet (run `{command}` or start a {job} job)")
    return json.loads(path.read_text())


def _q(request: Request, key: str) -> str:
    return str(request.query_params.get(key, "")).strip()


def _search_form(fields: str) -> str:
    return f'<form method="get" class="filters">{fields}<button type=submit>filter</button></form>'


def _select(name: str, options: list[str], chosen: str, blank: str = "all") -> str:
    opts = f'<option value="">{blank}</option>' + "".join(
        f'<option{" selected" if o == chosen else ""}>{html.escape(o)}</option>' for o in options)
    return f'<label>{name} <select name="{name}">{opts}</select></label> '


def _text_of(raw) -> str:
    """The user turn of a quarantined record (its raw fields otherwise)."""
    if isinstance(raw, dict):
        for m in raw.get("messages") or []:
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content", ""))
    return json.dumps(raw, ensure_ascii=False)[:300] if raw is not None else ""


@router.get("/p/{pid}/data", response_class=HTMLResponse)
async def data_page(pid: int, request: Request):
    p = project(request, pid)
    s = _stage_file(p, "data/summary.json", "prepared data", "tunewise prepare", "prepare")
    q, reason = _q(request, "q").lower(), _q(request, "reason")
    read = s.get("read") or {}
    steps = [[k, str(v.get("changed", 0)), str(v.get("dropped", 0))] for k, v in ((s.get("cleaning") or {}).get("steps") or {}).items()]
    splits = [[k, f"{v.get('records', 0):,}"] for k, v in (s.get("outputs") or {}).items()]
    quarantine = _read_jsonl(p.cfg.run_dir / "data" / "quarantine.jsonl")
    reasons = sorted({r.get("reason", "").split(" of ")[0].split(":")[0] for r in quarantine})
    hits = [r for r in quarantine if (not reason or r.get("reason", "").startswith(reason))
            and (not q or q in (r.get("reason", "") + " " + r.get("where", "") + " " + r.get("file", "") + " " + _text_of(r.get("raw"))).lower())]
    qrows = [[f"{r.get('file', '')}:{r.get('where', '')}", r.get("reason", ""), _text_of(r.get("raw"))[:200]]
             for r in hits[:SHOWN]]
    clusters = [c for c in (s.get("cleaning") or {}).get("near_duplicate_clusters") or []
                if not q or q in (c.get("kept_text", "") + " " + c.get("dropped_text", "")).lower()]
    crows = [[c.get("kept", ""), c.get("kept_text", ""), c.get("dropped", ""), c.get("dropped_text", ""), f"{c.get('jaccard', 0):.2f}",
              "yes" if c.get("label_conflict") else ""] for c in clusters[:SHOWN]]
    leaks = s.get("leaks") or {}
    lrows = [[str(x.get("prompt", ""))[:200], "; ".join(f"{k}: {', '.join(v)}" for k, v in (x.get("splits") or {}).items())]
             for x in leaks.get("examples") or []]
    counts = Counter(r.get("label") for r in _read_jsonl(p.cfg.run_dir / "data" / "train.jsonl") if r.get("label") is not None)
    label_chart = ""
    if counts:
        label_chart = "<h2>Labels (training split)</h2>" + chart("labels", {
            "data": {"values": [{"label": k, "examples": v} for k, v in counts.items()]}, "width": 900, "height": 180,
            "mark": "bar", "encoding": {"x": {"field": "label", "type": "nominal", "sort": "-y", "axis": {"labelAngle": -60, "labelFontSize": 8}},
                                        "y": {"field": "examples", "type": "quantitative", "title": "examples"},
                                        "tooltip": [{"field": "label"}, {"field": "examples"}]}})
    body = (f"<p>read {read.get('valid', 0):,} valid records, kept {read.get('kept', 0):,}, quarantined {read.get('quarantined', 0):,}; "
            f'<a href="/p/{pid}/report/data">the full data report</a></p>'
            + table(["split", "records"], splits) + "<h2>Cleaning steps</h2>" + table(["step", "changed", "dropped"], steps)
            + "<h2>Search</h2>" + _search_form(f'<input name="q" value="{html.escape(q)}" placeholder="text, file, line or reason" size=40> '
                                                 + _select("reason", reasons, reason))
            + f"<h2>Quarantine ({len(hits):,} of {len(quarantine):,}{', first ' + str(SHOWN) if len(hits) > SHOWN else ''})</h2>"
            + (table(["where", "reason", "text"], qrows) if qrows else "<p>none</p>")
            + f"<h2>Near-duplicate clusters ({len(clusters):,})</h2>"
            + (table(["kept", "kept text", "dropped", "dropped text", "Jaccard", "label conflict"], crows) if crows else "<p>none</p>")
            + f"<h2>Leaks between splits ({leaks.get('count', 0):,} prompts in more than one split)</h2>"
            + (table(["prompt", "where"], lrows) if lrows else "<p>none</p>")
            + label_chart)
    return page(f"{p.cfg.project}: data", scripts() + body)


def _compare_source(p, which: str) -> tuple[Path, Comparison]:
    for name, d in (("eval", p.cfg.run_dir / "eval"), ("run", p.cfg.run_dir / "run" / "test")):
        if (not which or which == name) and (d / "compare.json").exists():
            return d, Comparison.read(d / "compare.json")
    raise UiError(404, f"{p.cfg.project} has no comparison yet (run `tunewise compare` or `tunewise run`)")


def _metric_cell(m: Estimate | None) -> str:
    return "-" if m is None else str(m)


@router.get("/p/{pid}/compare", response_class=HTMLResponse)
async def compare_page(pid: int, request: Request):
    p = project(request, pid)
    d, result = _compare_source(p, _q(request, "source"))
    summaries = result.variants
    variants = list(summaries)
    metric = next(iter(summaries[variants[0]].metrics or {"accuracy": None}), "accuracy") if variants else "accuracy"
    metrics = sorted({m for s in summaries.values() for m in s.metrics})
    rows = []
    for v in variants:
        s = summaries[v]
        paired = result.paired(v, metric)
        rows.append([v] + [_metric_cell(s.metrics.get(m)) for m in metrics]
                    + [f"{s.latency_s.get('p50', float('nan')):.2f}", f"{s.cost_per_1k_queries_usd:.4f}",
                       f"p = {paired.p_value:.3g}" if paired else "reference"])
    bars = [{"variant": v, "value": m.mean, "low": m.ci95[0], "high": m.ci95[1]}
            for v in variants if (m := summaries[v].metrics.get(metric)) is not None and m.ci95]
    ci_chart = chart("quality", {
        "data": {"values": bars}, "width": 420, "height": 40 * max(1, len(bars)),
        "layer": [{"mark": "bar", "encoding": {"y": {"field": "variant", "type": "nominal", "sort": None, "title": None},
                                               "x": {"field": "value", "type": "quantitative", "title": f"{metric} (test, 95% CI)", "scale": {"domain": [0, 1]}}}},
                  {"mark": {"type": "errorbar", "ticks": True}, "encoding": {"y": {"field": "variant", "type": "nominal", "sort": None},
                                                                            "x": {"field": "low", "type": "quantitative", "title": f"{metric} (test, 95% CI)"},
                                                                            "x2": {"field": "high"}}}]})
    items = {v: _read_jsonl(d / v / "items.jsonl") for v in variants}
    n = min((len(x) for x in items.values()), default=0)
    label, only, focus = _q(request, "label"), _q(request, "only"), _q(request, "variant") or (variants[-1] if variants else "")
    refs = sorted({str(items[variants[0]][i].get("reference")) for i in range(n)}) if variants else []
    shown, total = [], 0
    for i in range(n):
        row = [items[v][i] for v in variants]
        ref = str(row[0].get("reference"))
        if label and ref != label:
            continue
        outs = [str(r.get("output", "")).strip() for r in row]
        if only == "disagree" and len(set(outs)) == 1:
            continue
        if only == "wrong" and focus in variants and (row[variants.index(focus)].get("scores") or {}).get(metric, 1.0) >= 1.0:
            continue
        total += 1
        if len(shown) < SHOWN:
            cells = [Markup('<span class="{}">{}</span>').format("ok" if (r.get("scores") or {}).get(metric, 0) >= 1.0 else "bad", o[:160])
                     for r, o in zip(row, outs)]
            shown.append([str(row[0].get("i", i)), str(row[0].get("input", ""))[:240], ref[:160]] + cells)
    confusions = Counter()
    if focus in items:
        for r in items[focus]:
            if (r.get("scores") or {}).get(metric, 1.0) < 1.0:
                confusions[(str(r.get("reference")), str(r.get("output", "")).strip())] += 1
    crows = [[a, b[:120], str(c)] for (a, b), c in confusions.most_common(25)]
    filters = _search_form(_select("label", refs, label) + _select("only", ["disagree", "wrong"], only, "every item")
                           + _select("variant", variants, focus, variants[-1] if variants else "") +
                           (f'<input type=hidden name=source value="{html.escape(_q(request, "source"))}">' if _q(request, "source") else ""))
    body = (f'<p>{html.escape(str(d))}; <a href="/p/{pid}/report/{"compare" if d.name == "eval" else "decision"}">the HTML report</a></p>'
            + table(["variant"] + metrics + ["latency p50 s", "$ / 1k queries", f"{metric} vs {variants[0] if variants else ''}"], rows)
            + ci_chart + f"<h2>Items ({total:,} of {n:,} match{', first ' + str(SHOWN) if total > SHOWN else ''})</h2>" + filters
            + '<div id="items">' + table(["#", "input", "reference"] + variants, shown) + "</div>"
            + f"<h2>Confusions of {html.escape(focus)} (reference -> answer, most frequent)</h2>"
            + (table(["reference", "answer", "items"], crows) if crows else "<p>none</p>"))
    return page(f"{p.cfg.project}: compare", scripts() + body)


@router.get("/p/{pid}/decision", response_class=HTMLResponse)
async def decision_page(pid: int, request: Request):
    p = project(request, pid)
    dec = Decision.model_validate(_stage_file(p, "run/decision.json", "decision", "tunewise run", "run"))
    goal = dec.goal
    metric = goal.metric
    ev = dec.evidence
    rows = []
    for e in ev:
        ci = e.test_ci95
        rows.append([Markup("<b>{}</b> (chosen)").format(e.route) if e.variant == dec.chosen_variant else e.route, e.variant,
                     f"{e.validation:.3f}" if e.validation is not None else "-",
                     (f"{e.test:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")) if e.test is not None else "-",
                     Markup('<span class="ok">met</span>' if e.meets_goal else '<span class="bad">short</span>'),
                     f"{e.latency_p50_s or 0:.2f}", f"{e.per_1k_queries_usd:.4f}", f"${e.training_usd:,.2f}", f"${e.first_year_usd:,.2f}"])
    points = [{"variant": e.variant, "route": e.route, "quality": e.test, "low": (e.test_ci95 or [e.test] * 2)[0],
               "high": (e.test_ci95 or [e.test] * 2)[1], "cost": max(e.first_year_usd, 1e-3)}
              for e in ev if e.test is not None]
    plot = chart("tradeoff", {
        "data": {"values": points}, "width": 520, "height": 300,
        "layer": [{"mark": {"type": "rule"}, "encoding": {"x": {"field": "cost", "type": "quantitative"}, "y": {"field": "low", "type": "quantitative"},
                                                          "y2": {"field": "high"}, "color": {"field": "route"}}},
                  {"mark": {"type": "point", "filled": True, "size": 90},
                   "encoding": {"x": {"field": "cost", "type": "quantitative", "scale": {"type": "log"}, "title": "first-year cost (USD, log scale)"},
                                "y": {"field": "quality", "type": "quantitative", "scale": {"domain": [0, 1]}, "title": f"{metric} on test (95% CI)"},
                                "color": {"field": "route", "type": "nominal"}, "tooltip": [{"field": "variant"}, {"field": "quality"}, {"field": "cost"}]}},
                  {"mark": {"type": "text", "dx": 8, "align": "left"}, "encoding": {"x": {"field": "cost", "type": "quantitative"},
                                                                                   "y": {"field": "quality", "type": "quantitative"}, "text": {"field": "variant"}}},
                  {"data": {"values": [{"goal": goal.threshold}]}, "mark": {"type": "rule", "strokeDash": [4, 4], "color": "#888"},
                   "encoding": {"y": {"field": "goal", "type": "quantitative"}}}]})
    roi = dec.roi
    roi_text = (f"<p>ROI against {html.escape(roi.against)}: {roi.accuracy_gain:+.3f} {metric}, "
                f"${roi.extra_cost_usd_per_year:,.2f} a year more"
                + (f", ROI {roi.roi:,.0f}x at the configured value per correct answer" if roi.roi is not None else "") + "</p>" if roi else "")
    body = (f"<p>goal: {html.escape(metric)} &gt;= {goal.threshold:g}; chosen: <b>{html.escape(dec.chosen)} "
            f"({html.escape(dec.chosen_variant)})</b></p><p>{html.escape(dec.why)}</p>{roi_text}"
            + table(["route", "variant", "validation", "test [95% CI]", "goal", "latency p50 s", "$ / 1k queries", "training", "first year"], rows)
            + "<h2>Quality against cost</h2>" + plot
            + f'<p><a href="/p/{pid}/report/decision">the decision report</a> · <a href="/p/{pid}/compare?source=run">the items behind it</a></p>')
    return page(f"{p.cfg.project}: decision", scripts() + body)


@router.get("/p/{pid}/playground", response_class=HTMLResponse)
async def playground(pid: int, request: Request):
    p = project(request, pid)
    listing = request.app.state.serve[pid].app.state.models.listing()
    names = [m["id"] for m in listing]
    pick = lambda i: "".join(f'<option{" selected" if n == names[min(i, len(names) - 1)] else ""}>{html.escape(n)}</option>' for n in names)  # noqa: E731
    panes = "".join(
        f'<div class="pane"><label>model <select id="m{i}">{pick(i)}</select></label>'
        f'<div id="s{i}" class="status">idle</div><div id="o{i}" class="answer"></div><ol id="c{i}" class="cites"></ol></div>' for i in (0, 1))
    body = (f"<p>The same message to two models at once, answers streamed as they are generated (production is "
            f"{html.escape(next((m.get('tunewise_resolves_to', '') for m in listing if m['id'] == 'production'), 'base'))}; "
            "a name with +kb answers from the knowledge base and lists its citations).</p>"
            '<p><input id="system" size=80 placeholder="system prompt (optional)" value="' + html.escape(p.cfg.data.system_prompt or "") + '"></p>'
            '<p><textarea id="prompt" rows=3 cols=90 placeholder="your message"></textarea><br>'
            '<label>max tokens <input id="max" type=number value=64 min=1 max=2048></label> <button id="send">send to both</button></p>'
            f'<div class="panes">{panes}</div><script>{PLAYGROUND_JS % script_json(f"/p/{pid}/api")}</script>')
    return page(f"{p.cfg.project}: playground", body, request.app.state.csrf)


PLAYGROUND_JS = """
const API=%s;const CSRF=document.querySelector('meta[name=csrf]').content;
async function ask(i){const out=document.getElementById('o'+i),st=document.getElementById('s'+i),cites=document.getElementById('c'+i);
 out.textContent='';cites.innerHTML='';st.textContent='waiting...';const t0=performance.now();let n=0;
 const sys=document.getElementById('system').value.trim();const msgs=(sys?[{role:'system',content:sys}]:[]).concat([{role:'user',content:document.getElementById('prompt').value}]);
 let r;try{r=await fetch(API+'/v1/chat/completions',{method:'POST',headers:{'content-type':'application/json','x-csrf':CSRF},
  body:JSON.stringify({model:document.getElementById('m'+i).value,messages:msgs,stream:true,temperature:0,max_tokens:parseInt(document.getElementById('max').value)||64})});}
 catch(e){st.textContent='error: '+e;return;}
 if(!r.ok){let m=await r.text();try{m=JSON.parse(m).error.message;}catch(e){}st.textContent='error '+r.status+': '+m;return;}
 const rd=r.body.getReader(),dec=new TextDecoder();let buf='';
 while(true){const {done,value}=await rd.read();if(done)break;buf+=dec.decode(value,{stream:true});let k;
  while((k=buf.indexOf('\\n\\n'))>=0){const ev=buf.slice(0,k);buf=buf.slice(k+2);if(!ev.startsWith('data: '))continue;const d=ev.slice(6);
   if(d==='[DONE]'){st.textContent=`done: ${n} tokens in ${((performance.now()-t0)/1000).toFixed(1)} s`;continue;}
   const j=JSON.parse(d);if(j.error){st.textContent='error: '+j.error.message;continue;}
   const c=j.choices[0];if(c.delta&&c.delta.content){out.textContent+=c.delta.content;st.textContent='streaming...';}
   if(j.usage)n=j.usage.completion_tokens;
   (j.retrieved||[]).forEach(h=>{const li=document.createElement('li');li.textContent=`[${h.n}] ${h.source}`+((j.citations||[]).some(x=>x.n===h.n||x===h.n)?' (cited)':'');cites.appendChild(li);});}}}
document.getElementById('send').onclick=()=>{ask(0);ask(1);};
"""
