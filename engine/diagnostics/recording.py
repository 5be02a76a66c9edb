"""A bounded record of one fixed-point solve, for the Solver Inspector and ``equideq diagnose``.

The solvers call :meth:`SolveRecorder.observe` at every iteration with the
iterate ``x_k`` and ``F(x_k)`` (the same two tensors their residual uses).
The recorder keeps, per sample:

* the residual traces (from the solve's :class:`SolveStats`, every iteration),
* the cosine between successive steps ``d_k = x_k - x_{k-1}``: a period-2
  oscillation shows as ``cos(d_k, d_{k-1}) ~ -1``,
* every ``k``-th iterate and its residual map ``|x_k - x_{k-1}|`` (channel
  magnitude), at most ``max_frames`` of them: when the budget is full every
  other frame is dropped and ``k`` doubles, so a long solve is still covered
  from its first to its last iteration in bounded memory,
* the first non-finite value: iteration, sample, pixel and whether it was in
  ``x_k`` or ``F(x_k)``,
* Anderson's least-squares condition number per iteration (when Anderson ran),
* where a fallback solver took over.

:meth:`SolveRecorder.finish` turns it into a :class:`SolveRecording` of NumPy
arrays (no tensors, no graph): safe to hand to another thread or to JSON.
The inputs needed to replay the solve (``y``, the start, the adjoint's
right-hand side) are kept as detached tensors in :attr:`SolveRecording.replay`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from engine.solver_names import DIVERGED, MAX_ITERATIONS, NON_FINITE

#: default cap on stored frames per solve (iterates + residual maps of every sample)
MAX_FRAMES = 48


@dataclass
class NonFinite:
    """Where a NaN/Inf first appeared: iteration (1-based), sample, pixel and in which tensor."""

    iteration: int
    sample: int
    channel: int
    row: int
    col: int
    where: str  # "iterate" (x_k) or "map" (F(x_k))

    def describe(self) -> str:
        place = "the iterate x_k" if self.where == "iterate" else "the map's output F(x_k)"
        return (f"first at iteration {self.iteration}, sample {self.sample}, pixel (row {self.row}, "
                f"col {self.col}, channel {self.channel}) of {place}")


@dataclass
class SolveRecording:
    """What one solve did, as NumPy (see the module docstring).

    Shapes: ``trace_abs``/``trace_rel`` ``[K, B]`` (NaN after a sample stopped),
    ``step_cosine`` ``[K, B]`` (NaN for k < 3), ``conditioning`` ``[K, B]`` (NaN
    when not measured), ``frames`` ``[R]`` (1-based iterations stored),
    ``iterates`` ``[R, B, C, H, W]``, ``residual_maps`` ``[R, B, H, W]``.
    """

    direction: str  # "forward" or "backward"
    solver: str
    options: dict
    dtype: str
    trace_abs: np.ndarray
    trace_rel: np.ndarray
    step_cosine: np.ndarray
    conditioning: np.ndarray
    frames: np.ndarray
    iterates: np.ndarray
    residual_maps: np.ndarray
    iterations: np.ndarray
    stop_reasons: list
    f_evals: int = 0
    fallback: Optional[str] = None
    fallback_from: Optional[int] = None  # first iteration (1-based) run by the fallback solver
    non_finite: Optional[NonFinite] = None
    step: Optional[int] = None  # training step, when recorded in training
    tag: str = ""  # which call of the step ("call 0", "reconstruct" ...)
    #: what a replay needs: detached tensors y and x0 / x_final (forward) or x_star and rhs (adjoint), and the
    #: physics object the solve ran with (a reference, not a copy)
    replay: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return int(self.trace_abs.shape[1]) if self.trace_abs.ndim == 2 else 0

    def trace(self, sample: int, kind: str = "rel") -> np.ndarray:
        """The residual trace of one sample, up to where it stopped."""
        column = (self.trace_rel if kind == "rel" else self.trace_abs)[:, sample]
        return column[: int(self.iterations[sample])] if sample < len(self.iterations) else column

    def final_residual(self, sample: int, kind: str = "rel") -> float:
        trace = self.trace(sample, kind)
        finite = trace[np.isfinite(trace)]
        return float(finite[-1]) if finite.size else float("nan")

    def badness(self, sample: int) -> float:
        """How far a sample is from converged (bigger = worse): failures first, then final residual / tol."""
        reason = self.stop_reasons[sample] if sample < len(self.stop_reasons) else None
        rank = {NON_FINITE: 3.0, DIVERGED: 2.0, MAX_ITERATIONS: 1.0}.get(reason, 0.0)
        tol = float(self.options.get("tol", 0.0)) or 1.0
        final = self.final_residual(sample, self.options.get("stop_mode", "rel"))
        ratio = final / tol if np.isfinite(final) else 1e30
        return rank * 1e6 + min(ratio, 1e6 - 1)

    def worst_sample(self) -> int:
        return int(max(range(self.batch), key=self.badness)) if self.batch else 0

    def frame_at(self, iteration: int) -> int:
        """Index of the stored frame nearest to ``iteration``."""
        if self.frames.size == 0:
            raise IndexError("no iterates were stored for this solve")
        return int(np.argmin(np.abs(self.frames - iteration)))

    def summary(self, sample: Optional[int] = None) -> dict:
        """Plain numbers for the CLI and JSON: solver, iterations, stop reason, residuals."""
        b = self.worst_sample() if sample is None else sample
        trace = self.trace(b, self.options.get("stop_mode", "rel"))
        finite = trace[np.isfinite(trace)]
        return {"direction": self.direction, "solver": self.solver, "sample": b,
                "iterations": int(self.iterations[b]) if b < len(self.iterations) else 0,
                "max_iter": int(self.options.get("max_iter", 0)), "stop_reason": self.stop_reasons[b],
                "tolerance": float(self.options.get("tol", float("nan"))),
                "stop_mode": self.options.get("stop_mode", "rel"),
                "first_residual": float(finite[0]) if finite.size else float("nan"),
                "best_residual": float(finite.min()) if finite.size else float("nan"),
                "final_residual": float(finite[-1]) if finite.size else float("nan"),
                "f_evals": self.f_evals, "fallback": self.fallback, "fallback_from": self.fallback_from,
                "dtype": self.dtype}


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, H, W]``: channel magnitude (CT: |x|, MRI: complex modulus)."""
    return torch.linalg.vector_norm(x, dim=1) if x.dim() == 4 else x.abs().reshape(x.shape[0], -1)


class SolveRecorder:
    """Collects a :class:`SolveRecording` while a solve runs (see the module docstring).

    ``every``: store every ``every``-th iterate to begin with; ``max_frames``:
    the cap, after which the stride doubles. Recording costs one extra copy of
    the batch per stored frame and a few reductions per iteration.
    """

    def __init__(self, direction: str = "forward", every: int = 1, max_frames: int = MAX_FRAMES,
                 store_iterates: bool = True):
        if every < 1 or max_frames < 2:
            raise ValueError("every must be >= 1 and max_frames >= 2")
        self.direction = direction
        self.every = int(every)
        self.max_frames = int(max_frames)
        self.store_iterates = store_iterates
        self.iteration = 0
        self._prev_x: Optional[torch.Tensor] = None
        self._prev_step: Optional[torch.Tensor] = None
        self._cosines: list[torch.Tensor] = []
        self._conditioning: dict[int, torch.Tensor] = {}
        self._frames: list[int] = []
        self._iterates: list[torch.Tensor] = []
        self._maps: list[torch.Tensor] = []
        self.non_finite: Optional[NonFinite] = None
        self.fallback: Optional[str] = None
        self.fallback_from: Optional[int] = None
        self.dtype = ""

    # -- called by the solvers -----------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor, fx: torch.Tensor, active: torch.Tensor) -> None:
        """One iteration: ``x_k``, ``F(x_k)`` and which samples are still iterating."""
        self.iteration += 1
        self.dtype = str(x.dtype).replace("torch.", "")
        batch = x.shape[0]
        nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=x.device)
        if self.non_finite is None:
            self._locate_non_finite(x, fx, active)
        step = None if self._prev_x is None else (x - self._prev_x)
        if step is not None and self._prev_step is not None:
            a, b = step.flatten(1).double(), self._prev_step.flatten(1).double()
            cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
            self._cosines.append(torch.where(active, cos, nan))
        else:
            self._cosines.append(nan)
        if self.store_iterates and (self.iteration == 1 or (self.iteration - 1) % self.every == 0):
            self._store_frame(x, step)
        self._prev_step = step
        self._prev_x = x.detach().clone()

    def observe_conditioning(self, condition: torch.Tensor) -> None:
        """Anderson: the condition number of each sample's regularised least-squares system."""
        self._conditioning[self.iteration] = condition.detach().double()

    def mark_fallback(self, name: str) -> None:
        """The next iterations are the fallback solver's."""
        self.fallback, self.fallback_from = name, self.iteration + 1
        self._prev_step = None  # a new solver: successive-step cosines restart

    # -- internals -------------------------------------------------------------------------------
    def _locate_non_finite(self, x: torch.Tensor, fx: torch.Tensor, active: torch.Tensor) -> None:
        for where, t in (("iterate", x), ("map", fx)):
            bad = ~torch.isfinite(t) & active.view(-1, *([1] * (t.dim() - 1)))
            if bool(bad.any()):
                index = torch.nonzero(bad)[0].tolist()
                index = index + [0] * (4 - len(index))
                sample, channel, row, col = (index if t.dim() == 4 else [index[0], 0, 0, index[1]])[:4]
                self.non_finite = NonFinite(self.iteration, int(sample), int(channel), int(row), int(col), where)
                return

    def _store_frame(self, x: torch.Tensor, step: Optional[torch.Tensor]) -> None:
        if len(self._frames) >= self.max_frames:  # thin out: keep every other frame, double the stride
            keep = list(range(0, len(self._frames), 2))
            self._frames = [self._frames[i] for i in keep]
            self._iterates = [self._iterates[i] for i in keep]
            self._maps = [self._maps[i] for i in keep]
            self.every *= 2
            if (self.iteration - 1) % self.every != 0:
                return
        self._frames.append(self.iteration)
        self._iterates.append(x.detach().float().cpu().clone())
        change = torch.zeros_like(x) if step is None else step
        self._maps.append(_magnitude(change.detach().float()).cpu())

    # -- the result ------------------------------------------------------------------------------
    def finish(self, stats, options: Any, replay: Optional[dict] = None) -> SolveRecording:
        """The recording, with the solve's final statistics (iterations, stop reasons, F-evaluations)."""
        def stack(rows: list[torch.Tensor]) -> np.ndarray:
            return torch.stack(rows).cpu().numpy() if rows else np.zeros((0, 0))

        trace_abs, trace_rel = stats.trace("abs"), stats.trace("rel")
        batch = trace_abs.shape[1] if trace_abs.ndim == 2 else 0
        conditioning = np.full((len(trace_abs), batch), np.nan)
        for k, cond in self._conditioning.items():
            if 1 <= k <= len(conditioning):
                conditioning[k - 1] = cond.cpu().numpy()
        options_dict = dict(vars(options)) if not isinstance(options, dict) else dict(options)
        return SolveRecording(
            direction=self.direction, solver=stats.solver, options=options_dict, dtype=self.dtype,
            trace_abs=trace_abs, trace_rel=trace_rel, step_cosine=stack(self._cosines),
            conditioning=conditioning, frames=np.asarray(self._frames, dtype=int),
            iterates=torch.stack(self._iterates).numpy() if self._iterates else np.zeros((0,)),
            residual_maps=torch.stack(self._maps).numpy() if self._maps else np.zeros((0,)),
            iterations=(stats.iterations.cpu().numpy() if stats.iterations is not None
                        else np.zeros(batch, dtype=int)),
            stop_reasons=list(stats.stop_reasons), f_evals=int(stats.f_evals), fallback=self.fallback,
            fallback_from=self.fallback_from, non_finite=self.non_finite, replay=dict(replay or {}))
