"""The solver residuals' data: per-solve residual traces, iterations over training,
stop reasons, the problem list, the spectral radius of dF/dx and the divergence alarm. Qt-free.

A solve's trace is the residual of its *worst* sample per iteration (the
largest finite value across the batch, NaN-padded samples ignored): that is
the curve that decides when the batched solve ends.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from engine.solver_names import CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, STOPPED

DIRECTIONS = ("forward", "backward")
PROBLEM_REASONS = (NON_FINITE, DIVERGED, MAX_ITERATIONS)
_REASON_RANK = {NON_FINITE: 4, DIVERGED: 3, MAX_ITERATIONS: 2, STOPPED: 1, CONVERGED: 0}
MAX_PROBLEMS = 500
MAX_RECORDED = 4  # recorded Reconstruct solves kept for the Solver Inspector (iterates: a few MB each)
REASON_LABELS = {MAX_ITERATIONS: "max iter", NON_FINITE: "non-finite"}


def worst_trace(residuals) -> np.ndarray:
    """[iterations, batch] -> [iterations]: largest finite residual per iteration, trailing NaNs cut."""
    arr = np.asarray(residuals, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.size == 0:
        return np.zeros(0)
    arr = np.where(np.isfinite(arr), arr, np.nan)
    trace = np.fmax.reduce(arr, axis=1) if arr.shape[1] else np.full(arr.shape[0], np.nan)
    finite = np.flatnonzero(np.isfinite(trace))
    return trace[: finite[-1] + 1] if finite.size else trace[:0]


def worst_reason(reasons) -> str:
    reasons = list(reasons) or [CONVERGED]
    return max(reasons, key=lambda r: _REASON_RANK.get(r, 1))


@dataclass
class SolveRecord:
    index: int  # running number of this direction's solves
    direction: str
    step: Optional[int]
    abs_trace: np.ndarray
    rel_trace: np.ndarray
    iterations: int
    reason: str
    reasons: list
    tolerance: float
    tolerance_mode: str
    solver: str
    seconds: float
    tag: str = ""
    #: the recorded solve with what replays it (panels.inspector_model.SolveSource), for solves
    #: the Solver Inspector opens from this record itself (Reconstruct); training solves are
    #: fetched from the run by step and tag
    source: Any = field(default=None, repr=False)
    fallback: str = ""  # the solver that took over failed samples ("" = none)
    max_iter: Optional[int] = None  # the solve's iteration cap (the fallback may add as many again)

    @property
    def problem(self) -> bool:
        """Failed, capped, or rescued by the fallback (the configured solver failed)."""
        return self.reason in PROBLEM_REASONS or bool(self.fallback)

    def solver_label(self) -> str:
        """``anderson`` or ``anderson → fixed_point fallback``."""
        return f"{self.solver} \u2192 {self.fallback} fallback" if self.fallback else self.solver

    def iterations_label(self) -> str:
        """``51`` or, when the cap is known, ``51 (max 40)``."""
        return f"{self.iterations} (max {self.max_iter})" if self.max_iter else str(self.iterations)

    def trace(self, mode: str) -> np.ndarray:
        return self.abs_trace if mode == "abs" else self.rel_trace


@dataclass
class AlarmNote:
    """The divergence alarm the residual panel shows (from ``engine.events.SolveAlarm``)."""

    step: int
    direction: str
    tag: str
    sample: int
    stop_reason: str
    paused: bool
    count: int = 1  # alarms this run
    run_end: str = ""  # "failed" / "stopped" / "completed" once the run is over: the banner stops asking to resume

    def text(self) -> str:
        reason = REASON_LABELS.get(self.stop_reason, self.stop_reason).replace("_", " ")
        if self.run_end:
            state = f"the step was not applied and the run has {self.run_end}: Inspect still shows the solve"
        elif self.paused:
            state = "training paused: inspect it, then Resume or Stop"
        else:
            state = "the step was not applied"
        more = f" ({self.count} failed steps this run)" if self.count > 1 else ""
        return f"Step {self.step}: the {self.direction} solve ({self.tag}) {reason}, {state}{more}."



class ResidualsModel:
    """Everything the residual panel shows, fed with SolveFinished events."""

    def __init__(self, overlay: int = 8) -> None:
        self.overlay = overlay
        self.recent = {d: deque(maxlen=overlay) for d in DIRECTIONS}
        self.iter_x = {d: [] for d in DIRECTIONS}
        self.iter_y = {d: [] for d in DIRECTIONS}
        self.iter_problem = {d: [] for d in DIRECTIONS}
        self.counts = {d: 0 for d in DIRECTIONS}
        self.reasons = {d: Counter() for d in DIRECTIONS}
        self.problems: list[SolveRecord] = []
        self.last_step = 0
        self.tolerance: dict = {}
        self.radius_x: list[int] = []
        self.radius_y: list[float] = []
        self.radius_acted: list[bool] = []
        self.radius_limit = float("nan")
        self.alarm: Optional[AlarmNote] = None  # the latest failed training step's solve
        self.recorded: deque = deque(maxlen=MAX_RECORDED)  # records whose solve the inspector opens (Reconstruct)
        self.version = 0

    def clear(self) -> None:
        self.__init__(self.overlay)

    def set_overlay(self, n: int) -> None:
        n = max(1, int(n))
        for d in DIRECTIONS:
            self.recent[d] = deque(self.recent[d], maxlen=n)
        self.overlay = n
        self.version += 1

    def add(self, event) -> SolveRecord:
        d = "backward" if str(event.direction).startswith("back") else "forward"
        if event.step is not None:
            self.last_step = int(event.step)
        iterations = np.asarray(event.iterations).reshape(-1)
        n_iter = int(iterations.max()) if iterations.size else int(np.asarray(event.abs_residuals).shape[0])
        reasons = list(event.stop_reasons or [])
        self.counts[d] += 1
        rec = SolveRecord(
            index=self.counts[d], direction=d, step=event.step if event.step is not None else self.last_step,
            abs_trace=worst_trace(event.abs_residuals), rel_trace=worst_trace(event.rel_residuals),
            iterations=n_iter, reason=worst_reason(reasons), reasons=reasons,
            tolerance=float(event.tolerance), tolerance_mode=str(event.tolerance_mode),
            solver=str(event.solver), seconds=float(event.seconds), tag=str(getattr(event, "tag", "") or ""),
            source=getattr(event, "source", None), fallback=str(getattr(event, "fallback", None) or ""),
            max_iter=getattr(event, "max_iter", None),
        )
        self.recent[d].append(rec)
        self.iter_x[d].append(rec.step)
        self.iter_y[d].append(n_iter)
        self.iter_problem[d].append(rec.problem)
        self.reasons[d].update(reasons)
        self.tolerance[d] = (rec.tolerance, rec.tolerance_mode)
        if rec.source is not None:
            self.recorded.append(rec)
        if rec.problem:
            self.problems.append(rec)
            del self.problems[:-MAX_PROBLEMS]
        self.version += 1
        return rec

    def set_alarm(self, event) -> AlarmNote:
        """An ``engine.events.SolveAlarm``: a step failed on a solve (and the run may have paused)."""
        count = self.alarm.count + 1 if self.alarm is not None else 1
        self.alarm = AlarmNote(int(event.step), str(event.direction), str(event.tag), int(event.sample),
                               str(event.stop_reason), bool(event.paused), count)
        self.version += 1
        return self.alarm

    def run_ended(self, reason: str) -> None:
        """The run is over: an alarm still shown no longer invites Resume."""
        if self.alarm is not None and not self.alarm.run_end:
            self.alarm.run_end = reason
            self.version += 1

    def dismiss_alarm(self) -> None:
        if self.alarm is not None:
            self.alarm = None
            self.version += 1

    def add_stability(self, event) -> None:
        """A ``StabilityChecked`` event: one spectral-radius estimate (and what the safeguard did)."""
        self.radius_x.append(int(event.step))
        self.radius_y.append(float(event.spectral_radius))
        self.radius_acted.append(str(event.action) != "none")
        self.radius_limit = float(event.limit)
        self.version += 1

    def radius_title(self) -> str:
        if not self.radius_y:
            return "Spectral radius of dF/dx"
        last = self.radius_y[-1]
        state = "contractive" if last < 1 else "not contractive"
        return f"\u03c1(dF/dx) at x* = {last:.3f}, {state}"

    def reason_summary(self) -> str:
        parts = []
        for d in DIRECTIONS:
            if self.counts[d]:
                c = self.reasons[d]
                text = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
                parts.append(f"{d}: {self.counts[d]} solves ({text})")
        return "   ".join(parts) or "no solves yet"
