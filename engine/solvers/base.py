"""Shared machinery of the batched fixed-point solvers.

Every solver finds ``x = f(x)`` for a batch ``x`` of shape ``[B, ...]`` and
treats each sample on its own: a sample stops when *its* residual meets the
tolerance, when it diverges or turns non-finite, or at the iteration cap,
while the others go on. Stopped samples are frozen (their iterate no longer
changes) and their trace entries are NaN.

Residuals, per sample ``b``::

    abs_b = || f(x_b) - x_b ||_2          rel_b = abs_b / (|| f(x_b) ||_2 + 1e-12)

Divergence: the absolute residual rises above ``divergence_factor`` times its
running minimum, or the solver had to restart more than ``max_restarts``
times. A non-finite residual is reported as ``non_finite``. Neither is ever
looped silently to the cap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from engine.events import RunControl
from engine.solvers.stats import (CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, STOPPED,
                                  SolveStats)

FixedPointMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolverOptions:
    """How to solve; mirrors :class:`engine.config.SolverConfig`."""

    name: str = "anderson"
    tol: float = 1e-4
    stop_mode: str = "rel"
    max_iter: int = 60
    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-4
    divergence_factor: float = 1e4
    fallback: str = "fixed_point"
    max_restarts: int = 3
    #: restart Anderson/Broyden history when the residual exceeds this multiple of its best
    restart_factor: float = 10.0

    @classmethod
    def from_config(cls, cfg) -> "SolverOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(cfg).items() if k in names})


class Tracker:
    """Per-sample bookkeeping: residuals, traces, stop reasons, best iterate."""

    def __init__(self, x0: torch.Tensor, options: SolverOptions, stats: SolveStats,
                 control: Optional[RunControl], active: Optional[torch.Tensor] = None):
        batch = x0.shape[0]
        device = x0.device
        self.options = options
        self.stats = stats
        self.control = control
        self.active = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
        self.best_x = x0.detach().clone()
        self.best_residual = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.restarts = torch.zeros(batch, dtype=torch.long, device=device)
        self.lowest_abs = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.best_at_restart = torch.full((batch,), float("inf"), device=device, dtype=torch.float64)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=device)
        self.reasons: list[Optional[str]] = [None] * batch
        for b in range(batch):
            if not bool(self.active[b]):
                self.reasons[b] = "inactive"

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
        ``max_restarts`` and so towards divergence.
        """
        mask = self.active & (monitored > self.options.restart_factor * self.best_residual)
        progressed = self.best_residual < 0.5 * self.best_at_restart
        self.restarts = torch.where(mask & progressed, torch.ones_like(self.restarts),
                                    self.restarts + mask.long())
        self.best_at_restart = torch.where(mask, self.best_residual, self.best_at_restart)
        return mask

    def finish(self, started: float) -> torch.Tensor:
        self.stats.iterations = self.iterations.clone()
        self.stats.stop_reasons = [r if r != "inactive" else None for r in self.reasons]
        self.stats.seconds += time.perf_counter() - started
        return self.best_x


def freeze(tracker: Tracker, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Only active samples move."""
    return torch.where(tracker.view(tracker.active, new), new, old)
