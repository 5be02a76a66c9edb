"""Batched fixed-point solvers, chosen by name; each returns ``(x, SolveStats)``.

``solve`` runs the named solver and, for samples that diverged or went
non-finite, restarts them from their best iterate with the configured
fallback (damped iteration by default); the fallback is logged in the stats.
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.events import RunControl
from engine.solvers.anderson import anderson
from engine.solvers.base import FixedPointMap, SolverOptions
from engine.solvers.broyden import broyden
from engine.solvers.fixed_point import fixed_point_iteration
from engine.solvers.stats import (CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, STOP_REASONS,
                                  STOPPED, SolveStats)

SOLVERS = {"fixed_point": fixed_point_iteration, "anderson": anderson, "broyden": broyden}

#: damping of the fallback iteration: a Krasnosel'skii-Mann average survives mild expansiveness
FALLBACK_DAMPING = 0.5


def solve(f: FixedPointMap, x0: torch.Tensor, options: SolverOptions,
          control: Optional[RunControl] = None) -> tuple[torch.Tensor, SolveStats]:
    """Solve ``x = f(x)`` per sample with ``options.name``; fall back on failed samples."""
    try:
        solver = SOLVERS[options.name]
    except KeyError:
        raise ValueError(f"unknown solver '{options.name}' (known: {', '.join(SOLVERS)})") from None
    with torch.no_grad():
        x, stats = solver(f, x0, options, control)
        failed = torch.tensor([r in (DIVERGED, NON_FINITE) for r in stats.stop_reasons], device=x.device)
        finite_start = torch.isfinite(x.flatten(1)).all(1)
        retry = failed & finite_start
        if options.fallback and bool(retry.any()):
            fallback_options = SolverOptions(**{**vars(options), "name": options.fallback,
                                                "damping": FALLBACK_DAMPING, "fallback": ""})
            used = stats.f_evals
            x_fb, fb_stats = SOLVERS[options.fallback](f, x, fallback_options, control, active=retry)
            stats.fallback = options.fallback
            stats.f_evals = used + fb_stats.f_evals
            stats.seconds += fb_stats.seconds
            stats.abs_residuals.extend(fb_stats.abs_residuals)
            stats.rel_residuals.extend(fb_stats.rel_residuals)
            stats.iterations = stats.iterations + fb_stats.iterations
            for b, ok in enumerate(retry.tolist()):
                if ok:
                    stats.stop_reasons[b] = fb_stats.stop_reasons[b]
            x = torch.where(retry.view(-1, *([1] * (x.dim() - 1))), x_fb, x)
    return x, stats


__all__ = ["solve", "SolverOptions", "SolveStats", "SOLVERS", "anderson", "broyden",
           "fixed_point_iteration", "CONVERGED", "DIVERGED", "MAX_ITERATIONS", "NON_FINITE",
           "STOPPED", "STOP_REASONS", "FixedPointMap"]
