r"""Why a fixed point was not reached, in plain words, with the evidence and a remedy to apply.

:func:`diagnose` reads one sample of a :class:`~engine.diagnostics.recording.SolveRecording`
(and, when measured, the spectral radius of ``dF/dx`` where the solve ended and the
denoiser's Lipschitz estimate) and returns :class:`Diagnosis` objects, worst first.
Each names a :class:`Remedy`: config changes (dotted keys, as ``ExperimentConfig.replace``
takes them) the workbench applies with one click and the CLI prints.

What is recognised, and from what:

``non_finite``
    a NaN/Inf appeared; the recording says at which iteration, sample and pixel.
``data_step_too_large``
    PGD with ``stepsize >= 2``: the data step ``x - (s/L) grad f(x)`` has
    eigenvalues ``1 - s lambda`` with ``lambda`` up to 1, so ``|1 - s| >= 1``:
    it is not non-expansive and no denoiser can make ``F`` contract through it.
``not_contractive``
    the spectral radius ``rho(dF/dx)`` where the solve ended exceeds 1: the
    iteration moves away from the fixed point along the top eigenvector.
``oscillation``
    successive steps point in opposite directions, ``cos(d_k, d_{k-1}) < -0.5``
    over the last iterations: a negative (or complex) eigenvalue of modulus
    near or above 1, the period-2 pattern that damping removes.
``anderson_ill_conditioned``
    Anderson's least-squares system ``H + lambda I`` had a condition number
    above ``0.1 / eps(dtype)``: its mixing weights are noise.
``tolerance_below_precision``
    the relative tolerance is below ``4 eps(dtype)`` and the residual has
    come down to the rounding floor (within ``100 eps``): rounding alone keeps
    it above the tolerance (float32 plateaus near 1e-7).
``stagnation``
    the residual stopped falling (less than halved over the last quarter of
    the iterations) while still above the tolerance.
``slow_convergence``
    the residual was still falling steadily when the iteration cap came.
``diverged``
    the solver gave up on a growing residual and nothing above explains why.
``fallback``
    the configured fallback solver took over failed samples; the iteration
    count then exceeds ``max_iter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from engine.diagnostics.recording import SolveRecording
from engine.solver_names import CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE

#: relative tolerance below this multiple of the dtype's epsilon cannot be met by rounding alone
PRECISION_FACTOR = 4.0
#: a solve "reached the rounding floor" when its best relative residual is within this multiple of eps
FLOOR_FACTOR = 100.0
#: Anderson's system is ill-conditioned above this fraction of 1 / eps(dtype)
CONDITION_FRACTION = 0.1
#: median successive-step cosine below this over the last iterations = period-2 oscillation
OSCILLATION_COSINE = -0.5
#: iterations the oscillation and stagnation tests look back over (at least)
WINDOW = 6
#: successive-step cosines the oscillation test needs at the least (a solve that diverges fast has few)
OSCILLATION_MIN_STEPS = 4
#: stagnation: the residual fell by less than this factor over the last quarter of the iterations
STAGNATION_FACTOR = 0.5

_EPS = {"float16": 9.77e-4, "bfloat16": 7.81e-3, "float32": 1.19e-7, "float64": 2.22e-16}


@dataclass
class Remedy:
    """A concrete change: a button label, what it does, and the config changes that do it."""

    label: str
    description: str
    changes: dict = field(default_factory=dict)  # dotted config key -> value


@dataclass
class Diagnosis:
    kind: str
    explanation: str
    remedy: Remedy
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form (``equideq diagnose --json``): ``kind``, ``explanation``, ``remedy`` (text), and more."""
        return {"kind": self.kind, "explanation": self.explanation, "remedy": self.remedy.description,
                "remedy_label": self.remedy.label, "changes": dict(self.remedy.changes),
                "evidence": {k: _plain(v) for k, v in self.evidence.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dtype_epsilon(dtype: str) -> float:
    return _EPS.get(dtype, _EPS["float32"])


@dataclass
class Settings:
    """The settings a diagnosis can blame and change (read from an ``ExperimentConfig``)."""

    operator: str = "pgd"
    stepsize: float = 1.0
    relaxation: float = 1.0
    jacobian_penalty: float = 0.0
    lr: float = 1e-4
    training: bool = False

    @classmethod
    def from_config(cls, config, training: bool = False) -> "Settings":
        return cls(operator=config.deq.operator, stepsize=float(config.deq.stepsize),
                   relaxation=float(config.deq.relaxation), jacobian_penalty=float(config.jacobian.penalty),
                   lr=float(config.optim.lr), training=training)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class _Reader:
    """The numbers of one sample of a recording that the rules look at."""

    def __init__(self, rec: SolveRecording, sample: int):
        self.rec, self.sample = rec, sample
        self.options = rec.options
        self.prefix = "solver." if rec.direction == "forward" else "backward_solver."
        self.mode = self.options.get("stop_mode", "rel")
        self.tol = float(self.options.get("tol", 0.0))
        self.max_iter = int(self.options.get("max_iter", 0))
        self.reason = rec.stop_reasons[sample] if sample < len(rec.stop_reasons) else None
        self.trace = rec.trace(sample, self.mode)
        self.rel = rec.trace(sample, "rel")
        self.abs = rec.trace(sample, "abs")
        end = len(self.trace) if rec.fallback_from is None else min(len(self.trace), rec.fallback_from - 1)
        self.primary_end = end  # iterations of the configured solver (the fallback's come after)
        finite = self.trace[np.isfinite(self.trace)]
        self.final = float(finite[-1]) if finite.size else float("nan")
        self.best = float(finite.min()) if finite.size else float("nan")
        self.eps = dtype_epsilon(rec.dtype)

    def cosines(self, last: int) -> np.ndarray:
        column = self.rec.step_cosine[: self.primary_end, self.sample] if self.rec.step_cosine.ndim == 2 else []
        column = np.asarray(column)
        column = column[np.isfinite(column)]
        return column[-last:]

    def relative_tolerance(self) -> float:
        if self.mode == "rel":
            return self.tol
        ratio = self.rel / np.where(self.abs > 0, self.abs, np.nan)  # 1 / ||F(x)||
        ratio = ratio[np.isfinite(ratio)]
        return self.tol * float(ratio[-1]) if ratio.size else float("nan")


def diagnose(rec: SolveRecording, sample: Optional[int] = None, *, spectral_radius: Optional[float] = None,
             denoiser_lipschitz: Optional[float] = None, settings: Optional[Settings] = None) -> list[Diagnosis]:
    """Diagnoses of one sample (default: the worst), worst first; empty when the solve converged cleanly."""
    settings = settings or Settings()
    s = _Reader(rec, rec.worst_sample() if sample is None else sample)
    found: list[Diagnosis] = []
    oscillating = False
    radius_text = ("" if spectral_radius is None
                   else f" (spectral radius of dF/dx where the solve ended {_fmt(spectral_radius)})")
    lip_text = ("" if denoiser_lipschitz is None
                else f"; the denoiser's Lipschitz estimate is {_fmt(denoiser_lipschitz)}")

    nf = rec.non_finite
    if nf is not None and (nf.sample == s.sample or s.reason == NON_FINITE):
        if settings.training:
            remedy = Remedy("Lower the learning rate", f"lower the learning rate ten-fold ({_fmt(settings.lr)} -> "
                            f"{_fmt(settings.lr / 10)}) so one update cannot make the map blow up",
                            {"optim.lr": settings.lr / 10})
        else:
            remedy = _stepsize_remedy(settings) or _damping_remedy(s, 0.5)
        found.append(Diagnosis("non_finite", f"Non-finite values (NaN/Inf) appeared, {nf.describe()}. Every "
                               "later iterate of this sample is meaningless.", remedy,
                               {"iteration": nf.iteration, "sample": nf.sample, "row": nf.row, "col": nf.col,
                                "channel": nf.channel, "where": nf.where}))

    if settings.operator == "pgd" and settings.stepsize >= 2.0 and rec.direction == "forward":
        found.append(Diagnosis(
            "data_step_too_large",
            f"The data step size is {_fmt(settings.stepsize)} (in units of 1/Lip of the data gradient). At 2 or "
            f"above the step x - s grad f(x) stretches the measured directions by |1 - s| = "
            f"{_fmt(abs(1 - settings.stepsize))} >= 1, so F cannot be a contraction whatever the denoiser does.",
            Remedy("Step size 1.0", "set the data step size to 1.0 (below 2 the data step is non-expansive)",
                   {"deq.stepsize": 1.0}), {"stepsize": settings.stepsize}))

    cosines = s.cosines(max(WINDOW, s.primary_end // 4))
    if cosines.size >= OSCILLATION_MIN_STEPS and float(np.median(cosines)) < OSCILLATION_COSINE:
        oscillating = True
        found.append(Diagnosis(
            "oscillation",
            f"The iterates oscillate with period 2: successive steps point in opposite directions (median "
            f"cosine {_fmt(float(np.median(cosines)))} over the last {cosines.size} iterations). The Jacobian "
            f"has a negative or complex eigenvalue of modulus near or above 1{radius_text}.",
            _damping_remedy(s, 0.5), {"median_step_cosine": float(np.median(cosines)), "window": int(cosines.size)}))

    if spectral_radius is not None and spectral_radius > 1.0:
        if settings.stepsize >= 2.0 and settings.operator == "pgd":
            remedy = _stepsize_remedy(settings)
        elif oscillating:
            remedy = Remedy("Relaxation 0.5", "iterate the relaxed map 0.5 F + 0.5 x (same fixed points; it pulls "
                            "negative and complex eigenvalues inside the unit circle)", {"deq.relaxation": 0.5})
        elif settings.training:
            penalty = max(2 * settings.jacobian_penalty, 0.01)
            remedy = Remedy("Raise the Jacobian penalty",
                            f"raise the Jacobian penalty {_fmt(settings.jacobian_penalty)} -> {_fmt(penalty)} so "
                            "training pushes ||dF/dx|| below its target", {"jacobian.penalty": penalty})
        else:
            remedy = _stepsize_remedy(settings, factor=0.5) or _damping_remedy(s, 0.5)
        found.append(Diagnosis(
            "not_contractive",
            f"F is not contractive here: the spectral radius of dF/dx where the solve ended is "
            f"{_fmt(spectral_radius)} > 1, so small errors grow by that factor per iteration{lip_text}.",
            remedy, {"spectral_radius": spectral_radius, "denoiser_lipschitz": denoiser_lipschitz}))

    if rec.solver == "anderson" or rec.options.get("name") == "anderson":
        column = rec.conditioning[: s.primary_end, s.sample] if rec.conditioning.ndim == 2 else np.zeros(0)
        column = column[np.isfinite(column)]
        limit = CONDITION_FRACTION / s.eps
        if column.size and float(column.max()) > limit:
            reg = float(rec.options.get("regularization", 1e-4))
            new_reg = min(max(reg * 10, 1e-3), 1.0)
            found.append(Diagnosis(
                "anderson_ill_conditioned",
                f"Anderson's least-squares system became ill-conditioned (condition number up to "
                f"{_fmt(float(column.max()))}, above {_fmt(limit)} for {rec.dtype}): its history vectors are "
                "nearly parallel, and the mixing weights amplify rounding noise.",
                Remedy("Stronger Anderson ridge", f"raise the Anderson regularisation {_fmt(reg)} -> {_fmt(new_reg)}",
                       {s.prefix + "regularization": new_reg}),
                {"max_condition": float(column.max()), "limit": limit}))

    rel_tol = s.relative_tolerance()
    best_rel = float(np.nanmin(s.rel)) if np.isfinite(s.rel).any() else float("nan")
    if (s.reason != CONVERGED and math.isfinite(rel_tol) and rel_tol < PRECISION_FACTOR * s.eps
            and best_rel < FLOOR_FACTOR * s.eps):  # ... and the solve did reach the rounding floor
        new_tol = 1e-5 if s.eps > 1e-10 else 1e-10
        found.append(Diagnosis(
            "tolerance_below_precision",
            f"The tolerance {_fmt(s.tol)} ({s.mode}) is below what {rec.dtype} can resolve (epsilon "
            f"{_fmt(s.eps)}): rounding keeps the relative residual near {_fmt(float(np.nanmin(s.rel)))} "
            "whatever the solver does.",
            Remedy(f"Tolerance {new_tol:g}", f"raise the tolerance to {new_tol:g} (relative)",
                   {s.prefix + "tol": new_tol, s.prefix + "stop_mode": "rel"}),
            {"tolerance": s.tol, "epsilon": s.eps, "best_relative_residual": float(np.nanmin(s.rel))}))
    elif s.reason == MAX_ITERATIONS and not oscillating:
        found.extend(_stagnation_or_slow(s, rec))

    explained = {d.kind for d in found}
    if s.reason == DIVERGED and not explained & {"non_finite", "data_step_too_large", "oscillation",
                                                    "not_contractive"}:
        found.append(Diagnosis(
            "diverged",
            f"The residual grew {_fmt(float(rec.options.get('divergence_factor', 1e4)))} times above its best "
            f"({_fmt(s.best)} -> {_fmt(s.final)}){radius_text}: the iteration is moving away from the fixed point.",
            _damping_remedy(s, 0.5), {"best_residual": s.best, "final_residual": s.final}))

    if rec.fallback:
        fb_iters = max(0, len(s.trace) - s.primary_end)
        found.append(Diagnosis(
            "fallback",
            f"{rec.solver} failed on this solve and the fallback '{rec.fallback}' (damped 0.5) took over from "
            f"iteration {rec.fallback_from}: {fb_iters} more iterations, {len(s.trace)} in all against max_iter "
            f"{s.max_iter}. The fallback hides the first solver's failure; the diagnoses above say why it failed.",
            Remedy(f"Use {rec.fallback} damped", f"solve with {rec.fallback} at damping 0.5 from the start",
                   {s.prefix + "name": rec.fallback, s.prefix + "damping": 0.5}),
            {"fallback_from": rec.fallback_from, "iterations": len(s.trace), "max_iter": s.max_iter}))
    return found


def _stepsize_remedy(settings: Settings, factor: Optional[float] = None) -> Optional[Remedy]:
    if settings.operator != "pgd":
        return None
    new = 1.0 if factor is None and settings.stepsize > 1.0 else settings.stepsize * (factor or 0.5)
    if new >= settings.stepsize:
        return None
    return Remedy(f"Step size {new:.3g}", f"lower the data step size {_fmt(settings.stepsize)} -> {new:.3g}",
                  {"deq.stepsize": round(new, 6)})


def _damping_remedy(s: _Reader, damping: float) -> Remedy:
    current = float(s.options.get("damping", 1.0))
    new = min(damping, current / 2) if current <= damping else damping
    return Remedy(f"Damping {new:g}", f"damp the iteration: x+ = {new:g} F(x) + {1 - new:g} x "
                  f"(was {current:g}); averaging cancels the period-2 swing", {s.prefix + "damping": new})


def _stagnation_or_slow(s: _Reader, rec: SolveRecording) -> list[Diagnosis]:
    trace = s.trace[np.isfinite(s.trace)]
    if trace.size < WINDOW:
        return []
    window = max(WINDOW, trace.size // 4)
    start, end = float(trace[-window]), float(trace[-1])
    factor = end / start if start > 0 else 1.0
    evidence = {"window": window, "reduction": factor, "final_residual": end, "tolerance": s.tol}
    if factor > STAGNATION_FACTOR:
        name = rec.options.get("name", rec.solver)
        if name == "fixed_point":
            remedy = Remedy("Switch to Anderson", "solve with Anderson acceleration (memory 5): it extrapolates "
                            "from the history instead of repeating one slow step", {s.prefix + "name": "anderson"})
        elif name == "anderson":
            memory = int(rec.options.get("memory", 5))
            new = min(100, memory * 2)
            remedy = Remedy(f"Anderson memory {new}", f"give Anderson more history ({memory} -> {new})",
                            {s.prefix + "memory": new})
        else:
            remedy = Remedy("Switch to Anderson", "solve with Anderson acceleration instead of Broyden",
                            {s.prefix + "name": "anderson"})
        return [Diagnosis(
            "stagnation",
            f"The residual stagnated above the tolerance: over the last {window} iterations it only fell by a "
            f"factor {_fmt(1 / factor if factor > 0 else float('inf'))} (to {_fmt(end)}, tolerance {_fmt(s.tol)}).",
            remedy, evidence)]
    rate = factor ** (1.0 / window)
    more = math.ceil(math.log(s.tol / end) / math.log(rate)) if 0 < rate < 1 and end > s.tol > 0 else s.max_iter
    new_cap = int(min(100000, s.max_iter + max(more, 1) * 1.2 + 1))
    return [Diagnosis(
        "slow_convergence",
        f"The solve was still converging when it hit max_iter {s.max_iter}: the residual falls by "
        f"{_fmt(1 - rate)} per iteration and needs about {more} more to reach {_fmt(s.tol)}.",
        Remedy(f"Max iterations {new_cap}", f"raise the iteration cap {s.max_iter} -> {new_cap}",
               {s.prefix + "max_iter": new_cap}), {**evidence, "rate": rate, "more_iterations": more})]
