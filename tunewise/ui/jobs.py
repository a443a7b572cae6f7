"""Background jobs of `tunewise ui`: tunewise commands run as their own processes, listed in the workspace.

A job is `python -m tunewise COMMAND CONFIG [args]` started in its own process group, under a small parent that
writes the exit status to `<workspace>/jobs/<id>.rc` when the command ends, so the job list (`jobs.json`) stays
true across a restart of the UI: a job whose process is gone has either its exit status or is marked lost. Stop
sends SIGINT to the group: training checkpoints at the next step boundary and exits (resume with --resume).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

COMMANDS = {"prepare": ["data", "prepare"], "train": ["train"], "resume": ["train", "--resume"], "compare": ["compare"],
            "gate": ["gate"], "run": ["run"], "tune": ["tune"], "monitor": ["monitor"], "harvest": ["data", "harvest"], "retrain": ["retrain"]}


# The job's parent: it outlives a Ctrl-C to the group (its handler does nothing; the command, whose handlers are
# reset by exec, gets the signal as usual) and writes the command's exit status when it ends.
WRAPPER = ("import signal, subprocess, sys\n"
           "signal.signal(signal.SIGINT, lambda *a: None)\n"
           "rc = subprocess.Popen(sys.argv[2:]).wait()\n"
           "open(sys.argv[1], 'w').write(str(rc))\n")


class Jobs:
    def __init__(self, workspace: Path):
        self.dir = Path(workspace) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = Path(workspace) / "jobs.json"
        self.lock = threading.Lock()
        self.jobs: list[dict] = json.loads(self.file.read_text()) if self.file.exists() else []

    def _save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jobs, indent=1))
        os.replace(tmp, self.file)

    def start(self, project: str, config: Path, command: str, extra: list[str] | None = None) -> dict:
        if command not in COMMANDS:
            raise ValueError(f"command {command!r}: one of {', '.join(COMMANDS)}")
        jid = uuid.uuid4().hex[:10]
        log, rc = self.dir / f"{jid}.log", self.dir / f"{jid}.rc"
        argv = [sys.executable, "-m", "tunewise", *COMMANDS[command], str(config), *(extra or [])]
        with open(log, "wb") as out:
            p = subprocess.Popen([sys.executable, "-c", WRAPPER, str(rc), *argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "TUNEWISE_JOB": jid})
        job = {"id": jid, "project": project, "command": command, "argv": argv, "pid": p.pid, "state": "running",
               "started": time.time(), "ended": None, "rc": None, "log": str(log)}
        with self.lock:
            self.jobs.append(job)
            self._save()
        return job

    def refresh(self) -> list[dict]:
        with self.lock:
            for j in self.jobs:
                if j["state"] not in ("running", "stopping"):
                    continue
                rc = self.dir / f"{j['id']}.rc"
                if rc.exists() and rc.read_text().strip():
                    j["rc"] = int(rc.read_text().strip())
                    j["state"] = "done" if j["rc"] == 0 else ("stopped" if j["state"] == "stopping" or j["rc"] == 130 else "failed")
                    j["ended"] = rc.stat().st_mtime
                elif not _alive(j["pid"]):
                    j["state"], j["ended"] = "lost", time.time()  # killed with no exit status (the machine restarted?)
            self._save()
            return [dict(j) for j in self.jobs]

    def get(self, jid: str) -> dict | None:
        return next((j for j in self.refresh() if j["id"] == jid), None)

    def stop(self, jid: str) -> dict:
        job = self.get(jid)
        if job is None:
            raise KeyError(jid)
        if job["state"] == "running":
            try:
                os.killpg(job["pid"], signal.SIGINT)
            except ProcessLookupError:
                pass
            with self.lock:
                next(j for j in self.jobs if j["id"] == jid)["state"] = "stopping"
                self._save()
        return self.get(jid)

    def log_tail(self, jid: str, chars: int = 6000) -> str:
        job = self.get(jid)
        if job is None:
            raise KeyError(jid)
        text = Path(job["log"]).read_text(errors="replace") if Path(job["log"]).exists() else ""
        return text[-chars:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
