"""Batched fixed-point solvers, chosen by name from one registry; every solve returns ``(x, SolveStats)``.

:data:`SOLVERS` maps each name of :data:`engine.solver_names.SOLVER_NAMES` (the
list :mod:`engine.config` validates against) to its solve function; the
solver modules enter themselves with :func:`~engine.solvers.base.register_solver`.
:func:`solve` runs the solver ``options.name`` (an
:class:`engine.config.SolverConfig`) and, for samples that diverged or went
non-finite, restarts them from their best iterate with the configured
fallback (damped iteration by default); the fallback is logged in the stats.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from engine.config import SolverConfig
from engine.errors import ConfigError
from engine.events import RunControl
from engine.solver_names import FAILURE_REASONS, SOLVER_NAMES
from engine.solvers import anderson as _anderson, broyden as _broyden, fixed_point as _fixed_point  # noqa: F401
from engine.solvers.base import SOLVERS, FixedPointMap, Solver
from engine.solvers.stats import SolveStats

if set(SOLVERS) != set(SOLVER_NAMES):  # register_solver refuses unknown names; none may be missing either
    raise ImportError(f"engine.solvers registers {sorted(SOLVERS)}, engine.solver_names lists {list(SOLVER_NAMES)}")

#: damping of the fallback iteration: a Krasnosel'skii-Mann average survives mild expansiveness
FALLBACK_DAMPING = 0.5


def get_solver(name: str) -> Solver:
    """The registered solve function ``name`` (:class:`~engine.errors.ConfigError` naming the known ones if none)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ConfigError(f"unknown solver '{name}' (known: {', '.join(SOLVERS)})") from None


def solve(f: FixedPointMap, x0: torch.Tensor, options: SolverConfig,
          control: Optional[RunControl] = None, recorder=None) -> tuple[torch.Tensor, SolveStats]:
    """Solve ``x = f(x)`` per sample with ``options.name``; fall back on failed samples.

    ``recorder`` (an :class:`engine.diagnostics.SolveRecorder`) sees every iteration of
    both solvers, told where the fallback took over.
    """
    solver = get_solver(options.name)
    with torch.no_grad():
        x, stats = solver(f, x0, options, control, recorder=recorder)
        stats.max_iter = int(options.max_iter)
        failed = torch.tensor([r in FAILURE_REASONS for r in stats.stop_reasons], device=x.device)
        finite_start = torch.isfinite(x.flatten(1)).all(1)
        retry = failed & finite_start
        if options.fallback and bool(retry.any()):
            fallback_options = dataclasses.replace(options, name=options.fallback, damping=FALLBACK_DAMPING,
                                                   fallback="")
            used = stats.f_evals
            if recorder is not None:
                recorder.mark_fallback(options.fallback)
            x_fb, fb_stats = get_solver(options.fallback)(f, x, fallback_options, control, active=retry,
                                                          recorder=recorder)
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


__all__ = ["solve", "get_solver", "SOLVERS", "Solver", "SolveStats", "FixedPointMap", "FALLBACK_DAMPING"]
