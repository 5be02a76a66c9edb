"""Statistics every fixed-point solve returns (forward and backward alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from engine.events import SolveFinished
from engine.solver_names import CONVERGED, FAILURE_REASONS


@dataclass
class SolveStats:
    """What happened in one batched solve.

    Residual traces are kept as device tensors while solving (one small vector
    per iteration, no host sync) and turned into NumPy only when asked, so
    recording costs nothing when nobody listens.

    Attributes:
        solver: name of the solver that ran (``anderson``...).
        abs_residuals: list of ``[batch]`` tensors, ``||F(x_k) - x_k||`` per sample;
            NaN once a sample has stopped.
        rel_residuals: same, divided by ``||F(x_k)||``.
        iterations: ``[batch]`` iterations used by each sample.
        stop_reasons: one of :data:`engine.solver_names.STOP_REASONS` per sample
            (None for a sample the solve was not asked to solve).
        f_evals: calls of the (batched) map.
        seconds: wall time.
        fallback: name of the solver that took over diverged samples, if any.
        max_iter: the iteration cap of the solve (set by :func:`engine.solvers.solve`);
            ``iterations`` include the fallback's, up to ``max_iter`` more.
        recording: the solve's :class:`engine.diagnostics.SolveRecording` when it was
            recorded (iterates, residual maps; the Solver Inspector's data), else None.
    """

    solver: str
    tolerance: float
    tolerance_mode: str
    abs_residuals: list = field(default_factory=list)
    rel_residuals: list = field(default_factory=list)
    iterations: Optional[torch.Tensor] = None
    stop_reasons: list = field(default_factory=list)
    f_evals: int = 0
    seconds: float = 0.0
    fallback: Optional[str] = None
    max_iter: Optional[int] = None
    recording: Any = field(default=None, repr=False)

    # -- summaries ---------------------------------------------------------------------
    @property
    def converged(self) -> bool:
        return all(r == CONVERGED for r in self.stop_reasons)

    @property
    def failed(self) -> bool:
        """True when some sample diverged or went non-finite."""
        return any(r in FAILURE_REASONS for r in self.stop_reasons)

    @property
    def max_iterations_used(self) -> int:
        return int(self.iterations.max()) if self.iterations is not None else 0

    def trace(self, kind: str = "abs") -> np.ndarray:
        """``[iterations, batch]`` residual trace as NumPy (NaN after a sample stopped)."""
        rows = self.abs_residuals if kind == "abs" else self.rel_residuals
        if not rows:
            return np.zeros((0, 0))
        return torch.stack([r.detach().double() for r in rows]).cpu().numpy()

    def final_residual(self, kind: str = "abs") -> np.ndarray:
        """Last finite residual of each sample."""
        trace = self.trace(kind)
        out = np.full(trace.shape[1], np.nan)
        for b in range(trace.shape[1]):
            finite = trace[:, b][~np.isnan(trace[:, b])]
            if finite.size:
                out[b] = finite[-1]
        return out

    def summary(self) -> str:
        reasons = {r: self.stop_reasons.count(r) for r in dict.fromkeys(self.stop_reasons)}
        text = ", ".join(f"{n} {r}" for r, n in reasons.items())
        extra = f", fallback {self.fallback}" if self.fallback else ""
        return (f"{self.solver}: {self.max_iterations_used} it, {self.f_evals} F-evals, "
                f"{self.seconds * 1e3:.0f} ms ({text}{extra})")

    def to_event(self, direction: str, step: Optional[int] = None, tag: str = "") -> SolveFinished:
        return SolveFinished(
            direction=direction,
            solver=self.solver,
            abs_residuals=self.trace("abs"),
            rel_residuals=self.trace("rel"),
            iterations=self.iterations.cpu().numpy() if self.iterations is not None else np.zeros(0, int),
            stop_reasons=list(self.stop_reasons),
            f_evals=self.f_evals,
            seconds=self.seconds,
            tolerance=self.tolerance,
            tolerance_mode=self.tolerance_mode,
            fallback=self.fallback,
            max_iter=self.max_iter,
            step=step,
            tag=tag,
        )
