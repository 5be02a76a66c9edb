"""Plain and damped fixed-point (Picard / Krasnosel'skii-Mann) iteration.

``x_{k+1} = (1 - beta) x_k + beta f(x_k)``; converges linearly for a
contraction (rate ``1 - beta (1 - L)``), the robust baseline and the fallback
of the accelerated solvers.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from engine.events import RunControl
from engine.solvers.base import FixedPointMap, SolverOptions, Tracker, freeze
from engine.solvers.stats import SolveStats


def fixed_point_iteration(f: FixedPointMap, x0: torch.Tensor, options: SolverOptions,
                          control: Optional[RunControl] = None, active: Optional[torch.Tensor] = None,
                          stats: Optional[SolveStats] = None) -> tuple[torch.Tensor, SolveStats]:
    started = time.perf_counter()
    stats = stats or SolveStats(solver="fixed_point", tolerance=options.tol, tolerance_mode=options.stop_mode)
    tracker = Tracker(x0, options, stats, control, active)
    beta = options.damping
    x = x0
    iteration = 0
    while True:
        fx = f(x)
        stats.f_evals += 1
        iteration += 1
        tracker.observe(x, fx)
        if tracker.check_control_and_cap(iteration):
            break
        x = freeze(tracker, fx if beta == 1.0 else (1 - beta) * x + beta * fx, x)
    return tracker.finish(started), stats
