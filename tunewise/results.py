"""The typed results of the stages that judge and maintain a model: what `run_gate`, `run_monitor` and `retrain`
return, with the JSON they write (`to_json`) and read back (`read`).

Each is a pydantic model whose fields are the keys of the JSON file the stage writes (gate.json, monitor.json), so
the shape of a result is written down here, a typo is an AttributeError at the line that makes it, and a file
written by an older version still opens: unknown keys are kept (extra="allow") and keys added later have
defaults. Training's result is `train.loop.TrainResult` (a dataclass, train_summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=False)

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate(json.loads(Path(path).read_text()))


class GateCheck(Result):
    """One check of the gate: the reference's and the candidate's value, the rule and whether it held."""

    check: str
    reference: float
    candidate: float
    diff: float
    passed: bool
    rule: str
    p_value: float | None = None  # the task check's paired test
    diff_ci95: list[float] | None = None
    ci95: dict[str, list[float]] = {}

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)  # p_value and diff_ci95 only where they are measured

    def reason(self) -> str:
        """Why the check failed, in one line."""
        return (f"{self.check}: {self.reference:.3f} -> {self.candidate:.3f} ({self.diff:+.3f}); needs {self.rule}"
                + (f" (p={self.p_value:.4f})" if self.p_value is not None else ""))


class GateVerdict(Result):
    """`tunewise gate`: the checks, the registry action and where the evidence is (gate.json)."""

    name: str
    action: str  # "promoted" | "promoted (forced)" | "blocked"
    passed: bool
    forced: bool = False
    candidate: str  # the candidate's registry reference (NAME:VERSION)
    reference: str  # what it was compared with
    reasons: list[str] = []
    checks: list[GateCheck]
    metric: str
    production: str | None = None  # the production model after the gate
    task: dict[str, Any] = {}  # per role: the task evaluation's metrics, items, latency and cost
    suites: dict[str, Any] = {}  # per role and suite (advbench, xstest-safe, xstest-unsafe, mmlu): its summary
    examples: dict[str, list] = {}
    timings_s: dict[str, float] = {}
    wall_s: float = 0.0
    registry: str = ""
    report: str | None = None  # gate.html

    def to_json(self) -> dict:
        return {**self.model_dump(mode="json"), "checks": [c.to_json() for c in self.checks]}

    @property
    def blocked(self) -> bool:
        return self.action == "blocked"


class MonitorReport(Result):
    """`tunewise monitor`: production queries against the training data (monitor.json)."""

    log: str
    requests: int
    queries: int
    alerts: list[str] = []
    verdict: str  # "ok" | "alert" | why nothing could be told
    drift: dict[str, Any] | None = None  # mmd2, p_value, test, production, training
    far: dict[str, Any] | None = None  # threshold, share, count, clusters
    surges: dict[str, Any] | None = None  # count, share, neighbours, clusters
    labels: dict[str, Any] | None = None  # total_variation, p_value, unknown_share, ...
    service: dict[str, Any] | None = None  # abstention_rate, error_rate, latency_p50_s, latency_p95_s
    report: str | None = None

    @property
    def measured(self) -> bool:
        """Whether there were enough queries to measure anything."""
        return self.drift is not None


class RetrainOutcome(Result):
    """`tunewise retrain`: what happened this time, and the journal row that records it."""

    action: str  # "nothing to do" | the gate's action
    reason: str | None = None  # why there was nothing to do
    gate: GateVerdict | None = None
    journal: dict[str, Any]
