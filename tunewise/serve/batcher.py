"""Dynamic batching: requests that arrive within a few milliseconds share one engine batch.

One worker thread owns the models (torch work and adapter switching are not shared between threads).
Requests wait in a bounded queue; the worker takes the first, waits up to `wait_s` for more (at most
`max_batch` rows), groups them by what must be equal inside one decode loop (model, adapter,
max_tokens, temperature, top_p, stop) and runs each group as one `Engine.generate` call. A full queue
raises QueueFull at submit, which the server answers with 429 and Retry-After.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    """One request: `prepare()` (run on the worker: load an adapter, retrieve context) returns
    (engine, adapter, prompts); each prompt is one choice. The future gets a list of Completions."""
    prepare: Callable[[], tuple[Any, str | None, list]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    group: str  # the model name as requested: jobs of one group can share a batch
    choices: tuple[str, ...] | None = None  # the closed answer set decoding is restricted to (None: free)
    grammar: tuple[str, str] | None = None  # or the grammar: (json | json_schema | regex | ebnf, source)
    on_token: Callable[[int, list[int]], None] | None = None
    seed: int | None = None  # a seeded request runs in a batch of its own, its generator seeded: the same request, the same answer
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    prepared: tuple | None = None

    @property
    def key(self) -> tuple:
        alone = id(self) if self.seed is not None else None  # another request's rows would change the random draws
        return (self.group, self.max_tokens, self.temperature, self.top_p, self.stop, self.choices, self.grammar, self.seed, alone)


@dataclass
class Call:
    """Any other work that must run on the model thread (embeddings)."""
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, max_batch: int = 32, wait_s: float = 0.005, queue_size: int = 256):
        self.max_batch, self.wait_s = max_batch, wait_s
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.batches = self.rows = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tunewise-batcher", daemon=True)
        self.thread.start()

    def submit(self, item: Job | Call) -> Future:
        try:
            self.q.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"{self.q.maxsize} requests are already waiting") from None
        return item.future

    def close(self) -> None:
        self._stop.set()
        self.q.put(None)
        self.thread.join(timeout=5)

    def _collect(self) -> list:
        first = self.q.get()
        if first is None:
            return []
        items, rows = [first], 1
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self.q.get(timeout=max(left, 0)) if left > 0 else self.q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            items.append(item)
            rows += 1
        return items

    def _run(self) -> None:
        while not self._stop.is_set():
            items = self._collect()
            groups: dict[tuple, list[Job]] = {}
            for item in items:
                if isinstance(item, Call):
                    self._settle(item.future, item.fn)
                    continue
                if item.cancelled or not item.future.set_running_or_notify_cancel():
                    continue
                try:
                    item.prepared = item.prepare()
                except BaseException as e:  # noqa: BLE001 - reported to the request, the worker goes on
                    item.future.set_exception(e)
                    continue
                groups.setdefault(item.key, []).append(item)
            for jobs in groups.values():
                self._run_group(jobs)

    @staticmethod
    def _settle(future: Future, fn) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001
            future.set_exception(e)

    def _run_group(self, jobs: list[Job]) -> None:
        engine = jobs[0].prepared[0]
        adapter = jobs[0].prepared[1]
        prompts, owner = [], []
        for j in jobs:
            for k, p in enumerate(j.prepared[2]):
                prompts.append(p)
                owner.append((j, k))

        def on_token(i, ids):
            job, k = owner[i]
            if job.on_token and not job.cancelled:
                job.on_token(k, ids)

        first = jobs[0]
        try:
            outs = engine.generate(prompts, max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p,
                                   stop=list(first.stop) or None, batch_size=len(prompts), adapter=adapter, on_token=on_token,
                                   choices=list(first.choices) if first.choices else None, grammar=first.grammar, seed=first.seed)
        except BaseException as e:  # noqa: BLE001
            for j in jobs:
                j.future.set_exception(e)
            return
        self.batches += 1
        self.rows += len(prompts)
        at = 0
        for j in jobs:
            n = len(j.prepared[2])
            j.future.set_result(outs[at : at + n])
            at += n
