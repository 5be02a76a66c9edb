"""Shared machinery of the batched fixed-point solvers: the registry, the common preamble, per-sample bookkeeping.

Every solver finds ``x = f(x)`` for a batch ``x`` of shape ``[B, ...]`` and
treats each sample on its own: a sample stops when *its* residual meets the
tolerance, when it diverges or turns non-finite, or at the iteration cap,
while the others go on. Stopped samples are frozen (their iterate no longer
changes) and their trace entries are NaN.

Residuals, per sample ``b``::

    abs_b = || f(x_b) - x_b ||_2          rel_b = abs_b / (|| f(x_b) ||_2 + 1e-12)

Divergence: the absolute residual rises above ``divergence_factor`` times its
running minimum, or the solver had to restart more than ``max_restarts``
times without progress. A non-finite residual is reported as ``non_finite``. Neither is ever
looped silently to the cap.

Solvers are chosen by name (torchdeq's style): :func:`register_solver` turns an
iteration body into a solve function with the common signature
``solver(f, x0, options, control=None, active=None) -> (x, SolveStats)`` and
enters it in :data:`SOLVERS` under one of :data:`engine.solver_names.SOLVER_NAMES`.
The options are an :class:`engine.config.SolverConfig`.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import torch

from engine.config import SolverConfig
from engine.events import RunControl
from engine.solver_names import CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, SOLVER_NAMES, STOPPED
from engine.solvers.stats import SolveStats

FixedPointMap = Callable[[torch.Tensor], torch.Tensor]

#: ``solver(f, x0, options, control=None, active=None) -> (x, stats)``; ``active`` masks the samples to solve.
Solver = Callable[..., tuple[torch.Tensor, SolveStats]]

#: The registry: solver name -> solve function (filled by :func:`register_solver`).
SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Callable], Solver]:
    """Decorator: register the iteration ``body(f, x0, options, tracker)`` as the solver ``name``.

    The registered function does what every solver does around its iteration:
    it starts the clock, creates the :class:`SolveStats` and the
    :class:`Tracker` (``active`` masks the samples to solve; the others are
    left as they are), runs ``body`` -- which iterates until
    :meth:`Tracker.check_control_and_cap` says stop, counting its map calls in
    ``tracker.stats.f_evals`` -- and returns the best iterate with the stats.
    ``name`` must be one of :data:`~engine.solver_names.SOLVER_NAMES` and not
    registered yet.
    """
    if name not in SOLVER_NAMES:
        raise ValueError(f"solver '{name}' is not in engine.solver_names.SOLVER_NAMES ({', '.join(SOLVER_NAMES)})")
    if name in SOLVERS:
        raise ValueError(f"solver '{name}' is registered twice")

    def decorate(body: Callable) -> Solver:
        @functools.wraps(body)
        def solver(f: FixedPointMap, x0: torch.Tensor, options: SolverConfig, control: Optional[RunControl] = None,
                   active: Optional[torch.Tensor] = None, recorder=None) -> tuple[torch.Tensor, SolveStats]:
            started = time.perf_counter()
            stats = SolveStats(solver=name, tolerance=options.tol, tolerance_mode=options.stop_mode)
            tracker = Tracker(x0, options, stats, control, active, recorder)
            body(f, x0, options, tracker)
            return tracker.finish(started), stats

        SOLVERS[name] = solver
        return solver

    return decorate


class Tracker:
    """Per-sample bookkeeping: residuals, traces, stop reasons, best iterate."""

    def __init__(self, x0: torch.Tensor, options: SolverConfig, stats: SolveStats,
                 control: Optional[RunControl], active: Optional[torch.Tensor] = None, recorder=None):
        batch = x0.shape[0]
        device = x0.device
        self.options = options
        self.stats = stats
        self.control = control
        #: an optional engine.diagnostics.SolveRecorder: sees every (x_k, F(x_k)) and, for Anderson,
        #: the conditioning of its least-squares system (the Solver Inspector's data)
        self.recorder = recorder
        self.active = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
        self.best_x = x0.detach().clone()
        self.best_residual = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.restarts = torch.zeros(batch, dtype=torch.long, device=device)
        self.lowest_abs = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.best_at_restart = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=device)
        self.reasons: list[Optional[str]] = [None] * batch  # stays None for samples not solved (inactive)

    @property
    def any_active(self) -> bool:
        return bool(self.active.any())

    def view(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, *([1] * (like.dim() - 1)))

    def observe(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """Record the residual of ``x``; decide which samples stop. Returns the residual used for stopping."""
        diff = (fx - x).flatten(1)
        abs_res = torch.linalg.vector_norm(diff, dim=1).double()
        rel_res = abs_res / (torch.linalg.vector_norm(fx.flatten(1), dim=1).double() + 1e-12)
        nan = torch.full_like(abs_res, float("nan"))
        if self.recorder is not None:
            self.recorder.observe(x, fx, self.active)
        self.stats.abs_residuals.append(torch.where(self.active, abs_res, nan))
        self.stats.rel_residuals.append(torch.where(self.active, rel_res, nan))
        monitored = rel_res if self.options.stop_mode == "rel" else abs_res
        finite = torch.isfinite(monitored) & torch.isfinite(x.flatten(1)).all(dim=1)
        self.iterations += self.active.long()

        improved = self.active & finite & (monitored < self.best_residual)
        self.best_x = torch.where(self.view(improved, x), x.detach(), self.best_x)
        self.best_residual = torch.where(improved, monitored, self.best_residual)

        # divergence is judged on the absolute residual: the relative one saturates
        # (e.g. at 1/3 for x -> 1.5 x + 1) while the iterate runs away
        self.lowest_abs = torch.where(self.active & finite, torch.minimum(self.lowest_abs, abs_res), self.lowest_abs)
        converged = self.active & finite & (monitored <= self.options.tol)
        non_finite = self.active & ~finite
        diverged = (self.active & finite & ~converged
                    & ((abs_res > self.options.divergence_factor * self.lowest_abs)
                       | (self.restarts > self.options.max_restarts)))
        self._stop(converged, CONVERGED)
        self._stop(non_finite, NON_FINITE)
        self._stop(diverged, DIVERGED)
        return monitored

    def _stop(self, mask: torch.Tensor, reason: str) -> None:
        if not bool(mask.any()):
            return
        for b in torch.nonzero(mask).flatten().tolist():
            self.reasons[b] = reason
        self.active = self.active & ~mask

    def check_control_and_cap(self, iteration: int) -> bool:
        """True when the loop must end: all stopped, cap reached, or the user asked."""
        if not self.any_active:
            return True
        if self.control is not None and self.control.should_stop_solve():
            self._stop(self.active.clone(), STOPPED)
            return True
        if iteration >= self.options.max_iter:
            self._stop(self.active.clone(), MAX_ITERATIONS)
            return True
        return False

    def needs_restart(self, monitored: torch.Tensor) -> torch.Tensor:
        """Samples whose residual rose far above their best: reset their history.

        A restart after real progress (best residual halved since the previous
        restart) is routine; only restarts without progress count towards
        ``options.max_restarts`` and so towards divergence.
        """
        mask = self.active & (monitored > self.options.restart_factor * self.best_residual)
        progressed = self.best_residual < 0.5 * self.best_at_restart
        self.restarts = torch.where(mask & progressed, torch.ones_like(self.restarts),
                                    self.restarts + mask.long())
        self.best_at_restart = torch.where(mask, self.best_residual, self.best_at_restart)
        return mask

    def finish(self, started: float) -> torch.Tensor:
        self.stats.iterations = self.iterations.clone()
        self.stats.stop_reasons = list(self.reasons)
        self.stats.seconds += time.perf_counter() - started
        return self.best_x


def freeze(tracker: Tracker, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Only active samples move."""
    return torch.where(tracker.view(tracker.active, new), new, old)
