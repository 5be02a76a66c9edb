"""Plain and damped fixed-point (Picard / Krasnosel'skii-Mann) iteration.

``x_{k+1} = (1 - beta) x_k + beta f(x_k)``; converges linearly for a
contraction (rate ``1 - beta (1 - L)``), the robust baseline and the fallback
of the accelerated solvers.
"""

from __future__ import annotations

import torch

from engine.config import SolverConfig
from engine.solver_names import FIXED_POINT
from engine.solvers.base import FixedPointMap, Tracker, freeze, register_solver


@register_solver(FIXED_POINT)
def fixed_point_iteration(f: FixedPointMap, x0: torch.Tensor, options: SolverConfig, tracker: Tracker) -> None:
    """``x <- (1 - beta) x + beta f(x)`` from ``x0``, bookkept by ``tracker``."""
    beta = options.damping
    x = x0
    iteration = 0
    while True:
        fx = f(x)
        tracker.stats.f_evals += 1
        iteration += 1
        tracker.observe(x, fx)
        if tracker.check_control_and_cap(iteration):
            break
        x = freeze(tracker, fx if beta == 1.0 else (1 - beta) * x + beta * fx, x)
