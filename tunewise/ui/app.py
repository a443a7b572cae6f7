"""`tunewise ui`: a local web dashboard over projects, their runs, reports, registry and jobs.

Server-rendered pages with no external script or stylesheet (it works with no internet): projects and their
training runs; a training run's loss, validation loss, learning rate and tokens/s drawn live from
`metrics.jsonl` through server-sent events, with a stop button for the job that runs it; the reports the
stages write (data, compare, gate, decision, tune, monitor); the registry with its gate verdicts, promote (only
with a passing verdict, or forced with a reason that is recorded) and rollback; background jobs (prepare, train,
compare, gate, run, tune, monitor, harvest, retrain) that survive a restart of the UI.

Security: bound to anything but loopback it needs a token (`--token` or TUNEWISE_UI_TOKEN; sent once as
`?token=`, then kept in an HttpOnly cookie); every state-changing request carries the page's CSRF token and, when
the browser sends an Origin, the same origin; the browser never sends a path, only names the UI lists
(project index, run name, report kind), so nothing outside the projects' run directories is served.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import re
import secrets
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from ..config import ConfigError, ProjectConfig, load_config
from ..report.page import Markup, escape, script_json, table
from .common import REPORTS, Project, UiError, page, project
from .jobs import COMMANDS, Jobs

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_PATH = re.compile(r"^/p/\d+/api/")
def _form(action: str, csrf: str, fields: str, label: str) -> str:
    return (f'<form method="post" action="{escape(action)}" style="display:inline"><input type="hidden" name="csrf" value="{escape(csrf)}">'
            f"{fields}<button type=submit>{escape(label)}</button></form>")


def create_ui(configs: list[Path], workspace: Path, token: str | None = None) -> FastAPI:
    """The app: state (projects, jobs, token, CSRF secret), the guard middleware, the error page and the routes
    (module-level handlers reading request.app.state)."""
    app = FastAPI(title="tunewise ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.projects = [Project(c) for c in configs]
    app.state.jobs = Jobs(workspace)
    app.state.token = token
    app.state.csrf = secrets.token_urlsafe(24)
    app.state.serve = [_PlaygroundServer(p.cfg) for p in app.state.projects]
    app.middleware("http")(_guard)
    app.add_exception_handler(UiError, _ui_error)
    from .pages import router as pages

    app.include_router(router)
    app.include_router(pages)
    for i, served in enumerate(app.state.serve):  # the playground talks to the project's own OpenAI-compatible server
        app.mount(f"/p/{i}/api", served)
    return app


class _PlaygroundServer:
    """The project's `tunewise serve` app for the playground, built on first use (it imports torch and the engine,
    which the rest of the UI does not need at start-up); models load on the first message. Behind the UI's token
    and CSRF guard instead of API keys; playground chats are not production traffic, so they are not logged."""

    def __init__(self, cfg: ProjectConfig):
        self.cfg, self._app = cfg, None

    @property
    def app(self):
        if self._app is None:
            from ..config import replace
            from ..serve.app import create_app

            self._app = create_app(replace(self.cfg, "serve", log_requests=False, api_keys=[]))
            self._app.state.keys = []  # TUNEWISE_API_KEYS guards the real server, not the UI's
        return self._app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


router = APIRouter()

async def _guard(request: Request, call_next):
    tok = request.app.state.token
    if tok:
        given = request.query_params.get("token") or request.cookies.get("tunewise_ui") or \
            request.headers.get("authorization", "").removeprefix("Bearer ")
        if not given or not hmac.compare_digest(given.encode(), tok.encode()):
            return PlainTextResponse("401: a token is needed (open the URL tunewise ui printed, with ?token=...)", status_code=401)
    if request.method == "POST":
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return PlainTextResponse(f"403: cross-site request from {origin} refused", status_code=403)
        if API_PATH.match(request.url.path) and not hmac.compare_digest(request.headers.get("x-csrf", "").encode(), request.app.state.csrf.encode()):
            return PlainTextResponse("403: the playground request's CSRF header is missing or wrong (reload the page)", status_code=403)
    response = await call_next(request)
    if tok and request.query_params.get("token"):
        response.set_cookie("tunewise_ui", tok, httponly=True, samesite="strict")
    return response

async def _ui_error(request: Request, e: UiError):
    return HTMLResponse(page("error", f'<p class="bad">{html.escape(e.message)}</p><p><a href="javascript:history.back()">back</a></p>').body,
                        status_code=e.status)

async def check_csrf(request: Request) -> dict:
    form = dict(await request.form())
    if not hmac.compare_digest(str(form.get("csrf", "")).encode(), request.app.state.csrf.encode()):
        raise UiError(403, "the form's CSRF token is missing or wrong (reload the page and try again)")
    return form

@router.get("/", response_class=HTMLResponse)
async def index(request: Request):
    rows = []
    for i, p in enumerate(request.app.state.projects):
        reports = Markup(" ").join(Markup('<a href="/p/{}/report/{}">{}</a>').format(i, k, k) for k in p.reports())
        rows.append([Markup('<a href="/p/{}">{}</a>').format(i, p.cfg.project), str(p.path), str(len(p.runs())), reports or "-"])
    return page("projects", table(["project", "config", "training runs", "reports"], rows))

@router.get("/p/{pid}", response_class=HTMLResponse)
async def project_page(pid: int, request: Request):
    p, csrf = project(request, pid), request.app.state.csrf
    runs = []
    for name, d in p.runs().items():
        rows = _metrics(d)
        last = next((r for r in reversed(rows) if "loss" in r), {})
        val = next((r for r in reversed(rows) if "val_loss" in r), {})
        runs.append([Markup('<a href="/p/{}/run/{}">{}</a>').format(pid, name, name), str(last.get("step", "-")), f"{last.get('loss', float('nan')):.4f}" if last else "-",
                     f"{val['val_loss']:.4f}" if val else "-"])
    jobs = [j for j in request.app.state.jobs.refresh() if j["project"] == p.cfg.project]
    options = "".join(f"<option>{c}</option>" for c in COMMANDS)
    start = _form(f"/p/{pid}/jobs", csrf, f'<select name="command">{options}</select> ', "start job")
    body = (f"<p>config: {html.escape(str(p.path))}; runs in {html.escape(str(p.cfg.run_dir))}</p>"
            f"<h2>Training runs</h2>{table(['run', 'step', 'loss', 'val loss'], runs) if runs else '<p>none yet</p>'}"
            f'<h2>Pages</h2><p><a href="/p/{pid}/data">data</a> <a href="/p/{pid}/compare">compare</a> <a href="/p/{pid}/decision">decision</a> '
            f'<a href="/p/{pid}/playground">playground</a></p>'
            "<h2>Reports</h2><p>" + (" ".join(f'<a href="/p/{pid}/report/{k}">{k}</a>' for k in p.reports()) or "none yet") + "</p>"
            f'<h2>Registry</h2><p><a href="/p/{pid}/registry">models, gate verdicts, promote and rollback</a></p>'
            f"<h2>Jobs</h2><p>{start}</p>{_jobs_table(jobs, csrf)}")
    return page(p.cfg.project, body, csrf)

@router.get("/p/{pid}/run/{name}", response_class=HTMLResponse)
async def run_page(pid: int, name: str, request: Request):
    p = project(request, pid)
    if name not in p.runs():
        raise UiError(404, f"no training run {name!r} in {p.cfg.project} (runs: {', '.join(p.runs()) or 'none'})")
    running = [j for j in request.app.state.jobs.refresh() if j["project"] == p.cfg.project and j["state"] == "running" and j["command"] in ("train", "resume")]
    stop = "".join(_form(f"/jobs/{j['id']}/stop", request.app.state.csrf, "", f"stop job {j['id']} (checkpoints)") for j in running)
    from .pages import chart, scripts

    def curve(cid: str, layers: list[tuple[str, str, str]], title: str) -> str:  # (field, mark, legend) per layer
        return chart(cid, {"data": {"name": "rows"}, "width": 640, "height": 190, "autosize": {"type": "pad", "resize": True}, "layer": [
            {"transform": [{"filter": f"isValid(datum.{f})"}, {"calculate": f"'{legend}'", "as": "series"}], "mark": {"type": mark},
             "encoding": {"x": {"field": "step", "type": "quantitative", "title": "step", "axis": {"format": "d", "tickMinStep": 1}},
                          "y": {"field": f, "type": "quantitative", "title": title, "scale": {"zero": False}},
                          "color": {"field": "series", "type": "nominal", "title": None}, "tooltip": [{"field": "step"}, {"field": f}]}}
            for f, mark, legend in layers]})

    body = (f"<p>{stop}</p><p id=status>connecting...</p>" + scripts()
            + "<h3>loss</h3>" + curve("loss", [("loss", "line", "training"), ("val_loss", "point", "validation")], "loss (nats per loss token)")
            + "<h3>learning rate</h3>" + curve("lr", [("lr", "line", "learning rate")], "learning rate")
            + "<h3>throughput</h3>" + curve("tokens_per_s", [("tokens_per_s", "line", "tokens/s")], "tokens per second")
            + f"<script>{LIVE_JS % script_json(f'/p/{pid}/run/{name}/events')}</script>")
    return page(f"{p.cfg.project}: {name}", body, request.app.state.csrf)

@router.get("/p/{pid}/run/{name}/events")
async def run_events(pid: int, name: str, request: Request, once: bool = False):
    p = project(request, pid)
    runs = p.runs()
    if name not in runs:
        raise UiError(404, f"no training run {name!r}")
    path = runs[name] / "metrics.jsonl"

    async def stream():
        sent = 0
        summary = runs[name] / "train_summary.json"
        while True:
            rows = _metrics(runs[name])
            for r in rows[sent:]:
                yield f"data: {json.dumps(r)}\n\n"
            sent = len(rows)
            done = summary.exists() and summary.stat().st_mtime >= (path.stat().st_mtime if path.exists() else 0)
            if once or done:
                yield f"event: end\ndata: {json.dumps({'rows': sent, 'finished': done})}\n\n"
                return
            if await request.is_disconnected():
                return
            yield ": heartbeat\n\n"
            await asyncio.sleep(1.0)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

@router.get("/p/{pid}/report/{kind}")
async def report(pid: int, kind: str, request: Request):
    p = project(request, pid)
    if kind not in REPORTS:
        raise UiError(404, f"no report kind {kind!r}; one of {', '.join(REPORTS)}")
    path = p.reports().get(kind)
    if path is None:
        raise UiError(404, f"{p.cfg.project} has no {kind} report yet (run the stage that writes it)")
    return FileResponse(path, media_type="text/html")

@router.get("/p/{pid}/registry", response_class=HTMLResponse)
async def registry_page(pid: int, request: Request):
    from ..registry import Registry, registry_path

    p, csrf = project(request, pid), request.app.state.csrf
    name = p.cfg.gate.name or p.cfg.project
    reg = Registry(registry_path(p.cfg))
    try:
        prod = reg.production(name)
        rows = []
        for m in reg.models(name):
            checks = reg.last_gate(m.id)
            verdict = "not gated" if checks is None else ("passed" if all(c["passed"] for c in checks) else
                                                         "failed: " + "; ".join(c["check"] for c in checks if not c["passed"]))
            actions = _form(f"/p/{pid}/registry/promote", csrf, f'<input type=hidden name=version value="{m.version}">'
                            f'<input name=reason placeholder="reason to force" size=18> <label><input type=checkbox name=force value=1>force</label> ',
                            "promote")
            rows.append([escape(m.ref) + (Markup(' <b class="ok">production</b>') if prod and prod.id == m.id else ""),
                         m.base_model, "adapter" if m.adapter else "full", verdict,
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created)), Markup(actions)])
        history = [[h["ref"], h["action"] + (" (forced)" if h["forced"] else ""),
                    str((h["verdict"] or {}).get("reason") or "; ".join((h["verdict"] or {}).get("reasons", [])) or "-"),
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(h["created"]))] for h in reg.promotions(name)]
        retrains = [[str(r["id"]), r["trigger"], r["state"], str(r["decision"] or "-"), str(r["details"].get("reason", ""))]
                    for r in reg.retrains(name)]
    finally:
        reg.close()
    body = (f"<p>production: <b>{html.escape(prod.ref) if prod else 'none (the base model)'}</b> "
            + _form(f"/p/{pid}/registry/rollback", csrf, "", "rollback") + "</p>"
            + table(["model", "base", "kind", "last gate verdict", "registered", ""], rows)
            + "<h2>Promotions</h2>" + table(["model", "action", "reason", "when"], history)
            + "<h2>Re-training journal</h2>" + table(["#", "trigger", "state", "decision", "why"], retrains))
    return page(f"registry: {name}", body, csrf)

@router.post("/p/{pid}/registry/promote")
async def promote(pid: int, request: Request):
    from ..registry import Registry, RegistryError, registry_path

    form = await check_csrf(request)
    p = project(request, pid)
    name = p.cfg.gate.name or p.cfg.project
    reg = Registry(registry_path(p.cfg))
    try:
        try:
            entry = reg.get(f"{name}:{int(form.get('version', 0))}")
        except (RegistryError, ValueError) as e:
            raise UiError(404, str(e)) from None
        checks = reg.last_gate(entry.id)
        passed = checks is not None and all(c["passed"] for c in checks)
        force, reason = form.get("force") == "1", str(form.get("reason", "")).strip()
        if not passed and not (force and reason):
            why = "it was never gated" if checks is None else "its last gate verdict failed (" + "; ".join(c["check"] for c in checks if not c["passed"]) + ")"
            raise UiError(409, f"refused: {entry.ref} cannot be promoted: {why}. Run the gate, or tick force and give a reason (it is recorded).")
        reg.promote(entry.id, {"passed": passed, "reason": reason or None, "by": "tunewise ui"}, forced=not passed)
    finally:
        reg.close()
    return RedirectResponse(f"/p/{pid}/registry", status_code=303)

@router.post("/p/{pid}/registry/rollback")
async def rollback(pid: int, request: Request):
    from ..registry import Registry, RegistryError, registry_path

    await check_csrf(request)
    p = project(request, pid)
    reg = Registry(registry_path(p.cfg))
    try:
        reg.rollback(p.cfg.gate.name or p.cfg.project)
    except RegistryError as e:
        raise UiError(409, f"refused: {e}") from None
    finally:
        reg.close()
    return RedirectResponse(f"/p/{pid}/registry", status_code=303)

@router.post("/p/{pid}/jobs")
async def start_job(pid: int, request: Request):
    form = await check_csrf(request)
    p = project(request, pid)
    command = str(form.get("command", ""))
    if command not in COMMANDS:
        raise UiError(400, f"command {command!r}: one of {', '.join(COMMANDS)}")
    try:
        load_config(p.path)  # the config may have changed since the UI started: a bad one is refused here
    except ConfigError as e:
        raise UiError(400, f"the config does not validate, no job started: {e}") from None
    job = request.app.state.jobs.start(p.cfg.project, p.path, command)
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)

@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request):
    return page("jobs", _jobs_table(request.app.state.jobs.refresh(), request.app.state.csrf), request.app.state.csrf)

@router.get("/jobs/{jid}", response_class=HTMLResponse)
async def job_page(jid: str, request: Request):
    job = request.app.state.jobs.get(jid)
    if job is None:
        raise UiError(404, f"no job {jid}")
    stop = _form(f"/jobs/{jid}/stop", request.app.state.csrf, "", "stop") if job["state"] == "running" else ""
    body = (f"<p>{html.escape(' '.join(job['argv'][2:]))}: <b>{job['state']}</b>"
            + (f" (exit {job['rc']})" if job["rc"] is not None else "") + f" {stop}</p><pre>{html.escape(request.app.state.jobs.log_tail(jid))}</pre>"
            + ("<script>setTimeout(()=>location.reload(),2000)</script>" if job["state"] in ("running", "stopping") else ""))
    return page(f"job {jid}", body, request.app.state.csrf)

@router.get("/api/jobs/{jid}")
async def job_json(jid: str, request: Request):
    job = request.app.state.jobs.get(jid)
    if job is None:
        raise UiError(404, f"no job {jid}")
    return JSONResponse(job)

@router.post("/jobs/{jid}/stop")
async def stop_job(jid: str, request: Request):
    await check_csrf(request)
    try:
        request.app.state.jobs.stop(jid)
    except KeyError:
        raise UiError(404, f"no job {jid}") from None
    return RedirectResponse(f"/jobs/{jid}", status_code=303)



def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def _jobs_table(jobs: list[dict], csrf: str) -> str:
    if not jobs:
        return "<p>no jobs</p>"
    rows = [[Markup('<a href="/jobs/{}">{}</a>').format(j["id"], j["id"]), j["project"], j["command"], j["state"] + (f" ({j['rc']})" if j["rc"] is not None else ""),
             time.strftime("%H:%M:%S", time.localtime(j["started"])),
             Markup(_form(f"/jobs/{j['id']}/stop", csrf, "", "stop")) if j["state"] == "running" else ""] for j in reversed(jobs)]
    return table(["job", "project", "command", "state", "started", ""], rows)


LIVE_JS = """
const src=new EventSource(%s);const st=document.getElementById('status');let n=0;const pending=[];
function flush(){if(!window.views)return;const ids=['loss','lr','tokens_per_s'];if(!ids.every(k=>window.views[k]))return;
 const rows=pending.splice(0);ids.forEach(k=>window.views[k].insert('rows',rows).run());}
setInterval(flush,300);
src.onmessage=e=>{const r=JSON.parse(e.data);n++;pending.push(r);
 st.textContent=`${n} rows; step ${r.step}`+(r.loss!==undefined?`, loss ${r.loss}`:'');};
src.addEventListener('end',e=>{st.textContent+=' (finished)';src.close();});
"""
