"""What the dashboard's modules share: the error they raise, a project as the UI sees it, the page shell, and looking a
project up by its index (app.py holds the app and its routes, pages.py the reading pages; both import this)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse

from ..config import ProjectConfig, load_config
from ..report.page import Markup, document, escape

REPORTS = {"data": "data/report.html", "compare": "eval/report.html", "gate": "gate/gate.html", "decision": "run/report.html",
           "tune": "tune/report.html", "monitor": "monitor/report.html"}

class UiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Project:
    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.cfg: ProjectConfig = load_config(self.path)

    def runs(self) -> dict[str, Path]:
        """Training runs by name: train, retrain-NNNN, tune-trial-N (each a directory with metrics.jsonl)."""
        rd = self.cfg.run_dir
        out = {}
        if (self.cfg.train_dir / "metrics.jsonl").exists():
            out["train"] = self.cfg.train_dir
        for d in sorted((rd / "retrain").glob("*/train")):
            out[f"retrain-{d.parent.name}"] = d
        for d in sorted((rd / "tune").glob("trial-*"), key=lambda p: int(p.name.split("-")[1])):
            out[f"tune-{d.name}"] = d
        return out

    def reports(self) -> dict[str, Path]:
        return {k: self.cfg.run_dir / v for k, v in REPORTS.items() if (self.cfg.run_dir / v).exists()}


def page(title: str, body: str, csrf: str | None = None) -> HTMLResponse:
    """A dashboard page: the one page shell and stylesheet (report.page), the navigation and the title."""
    nav = '<nav><a href="/">projects</a><a href="/jobs">jobs</a></nav>'
    meta = Markup('<meta name="csrf" content="{}">').format(csrf) if csrf else ""
    return HTMLResponse(document(f"{title} - tunewise", f"{nav}<h1>{escape(title)}</h1>{body}", head=meta))


def project(request: Request, pid: int) -> Project:
    ps = request.app.state.projects
    if not 0 <= pid < len(ps):
        raise UiError(404, f"no project {pid}; the UI was started with {len(ps)}")
    return ps[pid]
