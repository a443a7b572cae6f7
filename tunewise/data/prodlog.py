"""The production log of `tunewise serve`: every answered request, and the feedback users give on it.

Two append-only JSON-lines files in `serve.log_dir` (default `<run>/serve-log/`):
- `requests.jsonl`: one line per answered request: its id (the response's `id`), time, the model name asked
  for and the model version that answered (registry `name:version`, or the base model's reference), the
  conversation (or raw prompt), the answers, finish reasons, token counts and latency;
- `feedback.jsonl`: one line per `POST /v1/feedback`: the request id, a rating (-1 bad, 0 neutral, 1 good)
  and an optional corrected answer.

Every text is PII-redacted by our own redactor (data/pii.py, the types of `data.clean.pii_types`) *before* it
is written: raw PII never reaches the disk. Durability: each line is written whole, flushed, and (with
`serve.log_fsync`, the default) fsynced before the response is sent, so a killed server (kill -9, power loss)
loses no answered request; a torn last line from a crash mid-write is skipped by readers. When a file passes
`serve.log_max_bytes` it is renamed `requests.<n>.jsonl` (n counting up) and a new one is started; readers read
the rotated files in order, then the current one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

from .pii import redact

_ROTATED = re.compile(r"^(requests|feedback)\.(\d+)\.jsonl$")


class LogFile:
    """One append-only JSONL stream with size rotation."""

    def __init__(self, directory: Path, stem: str, max_bytes: int, fsync: bool):
        self.dir, self.stem, self.max_bytes, self.fsync = Path(directory), stem, max_bytes, fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.path = self.dir / f"{stem}.jsonl"
        if self.path.exists() and self.path.stat().st_size:  # a line torn by a crash: end it, so the next one stays whole
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes and self.path.stat().st_size:
                os.replace(self.path, self.dir / f"{self.stem}.{self._next_index()}.jsonl")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)  # one write of the whole line: O_APPEND keeps concurrent lines apart
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _next_index(self) -> int:
        return 1 + max((int(m.group(2)) for p in self.dir.iterdir() if (m := _ROTATED.match(p.name)) and m.group(1) == self.stem),
                       default=0)

    def files(self) -> list[Path]:
        rotated = sorted(((int(m.group(2)), p) for p in self.dir.iterdir() if (m := _ROTATED.match(p.name)) and m.group(1) == self.stem))
        return [p for _, p in rotated] + ([self.path] if self.path.exists() else [])

    def rows(self) -> Iterator[dict]:
        for f in self.files():
            with open(f, "rb") as fh:
                for raw in fh:
                    try:
                        yield json.loads(raw)
                    except ValueError:  # a line torn by a crash mid-write
                        continue


class RequestLog:
    """Requests and feedback, redacted; `known(id)` says whether a request id was logged (for feedback)."""

    def __init__(self, directory: Path, max_bytes: int = 64 * 2**20, fsync: bool = True, pii_types: tuple[str, ...] | None = None):
        self.requests = LogFile(directory, "requests", max_bytes, fsync)
        self.feedback = LogFile(directory, "feedback", max_bytes, fsync)
        self.types = tuple(pii_types) if pii_types else None
        self._ids: set | None = None  # answered requests' ids, read on the first known(): readers of the log never need them

    def _redact(self, text: str) -> str:
        return redact(text, self.types)[0] if self.types else redact(text)[0]

    def log_request(self, rid: str, model: str, version: str, kind: str, conversation, outs, latency_s: float, extra: dict | None = None) -> None:
        if isinstance(conversation, str):
            conv: object = self._redact(conversation)
        else:
            conv = [{"role": t["role"], "content": self._redact(t["content"])} for t in conversation]
        self.requests.append({"id": rid, "ts": round(time.time(), 3), "model": model, "model_version": version, "kind": kind,
                              "input": conv, "outputs": [self._redact(o.text) for o in outs],
                              "finish_reasons": [o.finish_reason for o in outs],
                              "prompt_tokens": outs[0].prompt_tokens if outs else 0,
                              "completion_tokens": sum(o.completion_tokens for o in outs), "latency_ms": round(latency_s * 1000, 1),
                              **(extra or {})})
        if self._ids is not None:
            self._ids.add(rid)

    def log_error(self, rid: str, model: str, version: str, kind: str, error: str, latency_s: float) -> None:
        """A request that got no answer (timeout, generation failure): counted by the monitor's error rate."""
        self.requests.append({"id": rid, "ts": round(time.time(), 3), "model": model, "model_version": version, "kind": kind,
                              "error": error, "latency_ms": round(latency_s * 1000, 1)})

    def known(self, rid: str) -> bool:
        """Whether an answered request has this id (a failed one has nothing to rate)."""
        if self._ids is None:
            self._ids = {r.get("id") for r in self.requests.rows() if "error" not in r}
        return rid in self._ids

    def log_feedback(self, rid: str, rating: int, correction: str | None, comment: str | None = None) -> None:
        self.feedback.append({"id": rid, "ts": round(time.time(), 3), "rating": rating,
                              "correction": self._redact(correction) if correction else None,
                              "comment": self._redact(comment) if comment else None})
