"""The solver residuals' data: per-solve residual traces, iterations over training,
stop reasons, the problem list and the spectral radius of dF/dx. Qt-free.

A solve's trace is the residual of its *worst* sample per iteration (the
largest finite value across the batch, NaN-padded samples ignored): that is
the curve that decides when the batched solve ends.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from engine.solver_names import CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, STOPPED

DIRECTIONS = ("forward", "backward")
PROBLEM_REASONS = (NON_FINITE, DIVERGED, MAX_ITERATIONS)
_REASON_RANK = {NON_FINITE: 4, DIVERGED: 3, MAX_ITERATIONS: 2, STOPPED: 1, CONVERGED: 0}
MAX_PROBLEMS = 500
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

    @property
    def problem(self) -> bool:
        return self.reason in PROBLEM_REASONS

    def trace(self, mode: str) -> np.ndarray:
        return self.abs_trace if mode == "abs" else self.rel_trace


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
        )
        self.recent[d].append(rec)
        self.iter_x[d].append(rec.step)
        self.iter_y[d].append(n_iter)
        self.iter_problem[d].append(rec.problem)
        self.reasons[d].update(reasons)
        self.tolerance[d] = (rec.tolerance, rec.tolerance_mode)
        if rec.problem:
            self.problems.append(rec)
            del self.problems[:-MAX_PROBLEMS]
        self.version += 1
        return rec

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
