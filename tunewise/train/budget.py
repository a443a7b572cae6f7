"""training.max_minutes: a wall-clock budget that holds.

The number of optimizer steps is planned from the time the steps are measured to take, and re-planned as
measurements come in; the learning-rate schedule is a function of (step, planned total), so it still
decays to the last step that will run. Steps that fill the frozen-layer cache (the first epoch of a
cached `freeze` run) cost more than the steps that read it; both rates are kept. Validation passes and
the final save are budgeted too. The loop stops before a step that would end past the budget, so a run
ends within the budget plus at most one step.
"""

from __future__ import annotations

import math
import time


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning-rate multiplier for the step about to run (0-based), for a schedule ending at `total`."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Plan:
    """The planned number of steps; with a budget, re-planned from measured step and validation times."""

    def __init__(self, natural: int, seconds: float | None, started: float, fresh_steps: int, cached_ratio: float,
                 eval_every: int, has_validation: bool):
        self.natural, self.total = natural, natural
        self.seconds, self.started = seconds, started
        self.fresh_steps = fresh_steps  # steps before every example is in the frozen cache (0: no cache)
        self.cached_ratio = cached_ratio  # predicted cost of a cached step relative to a fresh one
        self.eval_every, self.has_validation = eval_every, has_validation
        self.times: dict[bool, list[float]] = {True: [], False: []}  # fresh? -> step seconds
        self.eval_s: list[float] = []
        self.save_s: list[float] = []
        self.notes: list[str] = []

    def elapsed(self) -> float:
        return time.time() - self.started

    def step_seconds(self, fresh: bool) -> float | None:
        """A step's expected time: the larger of the median of the last 20 and the mean of the last 5, so a
        slowdown (another process on the machine) shows at once and the plan errs on the short side."""
        own = self.times[fresh][-20:]
        if own:
            return max(sorted(own)[len(own) // 2], sum(own[-5:]) / len(own[-5:]))
        other = self.times[not fresh][-20:]
        if not other:
            return None
        t = sorted(other)[len(other) // 2]
        return t * self.cached_ratio if not fresh else t / max(self.cached_ratio, 1e-6)

    def observe(self, seconds: float, fresh: bool) -> None:
        if len(self.times[fresh]) == 1 and self.times[fresh][0] > 2 * seconds:
            self.times[fresh].clear()  # the first step was warm-up (allocation, kernel selection): not the pace
        self.times[fresh].append(seconds)

    def observe_eval(self, seconds: float) -> None:
        self.eval_s.append(seconds)

    def observe_save(self, seconds: float) -> None:
        self.save_s.append(seconds)

    def _end_seconds(self) -> float:
        """What the end of training costs after the last step: the final validation and checkpoint."""
        return self._eval_seconds() + (max(self.save_s[-3:]) if self.save_s else 0.0)

    def _eval_seconds(self) -> float:
        if not self.has_validation:
            return 0.0
        if self.eval_s:
            return max(self.eval_s[-3:])
        t = self.step_seconds(False) or self.step_seconds(True) or 0.0
        return t  # before the first one: about one step's time

    def _affordable(self, step: int, seconds: float) -> int:
        """How many more steps fit in `seconds`, fresh ones first."""
        tf, tc = self.step_seconds(True), self.step_seconds(False)
        fresh_left = max(0, self.fresh_steps - step)
        n = 0
        if fresh_left and tf:
            k = min(fresh_left, int(seconds // tf))
            n, seconds = k, seconds - k * tf
            if k < fresh_left:
                return n
        return n + (int(seconds // tc) if tc else 0)

    def replan(self, step: int) -> int:
        if not self.seconds or self.step_seconds(True) is None and self.step_seconds(False) is None:
            return self.total
        left = 0.98 * self.seconds - self.elapsed()  # 2% of the budget kept as a margin
        total = self.total
        for _ in range(4):  # the validations to come depend on the total, and the total on their time
            evals = max(0, total // self.eval_every - step // self.eval_every)
            fit = self._affordable(step, left - evals * self._eval_seconds() - self._end_seconds())
            total = max(step, min(self.natural, step + fit))
        if step >= 20 and self.total < total < self.total + max(3, 0.02 * self.total):
            total = self.total  # a small gain is not worth un-decaying the schedule near its end
        self.total = total  # == step: nothing more fits, the loop ends here
        return total

    def must_stop(self, step: int) -> bool:
        """Stop before a step that would end past the budget (leaving time for the final validation and save)."""
        if not self.seconds:
            return False
        fresh = step < self.fresh_steps
        t = self.step_seconds(fresh) or 0.0
        return self.elapsed() + t + self._end_seconds() > self.seconds
