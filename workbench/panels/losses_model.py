"""The loss curves' data: training losses per step, validation PSNR / SSIM, and the
display-only smoothing (a bias-corrected exponential moving average, like
TensorBoard's, so the first points are not pulled towards zero). Qt-free.

Also what the training plots (here and in the residual panel) need to stay readable
when a series is a single point or a constant: :func:`fitted_bounds` (the auto-range a
plot falls back to instead of collapsing onto one value), :func:`integer_tick_levels`
(steps and iterations get integer ticks) and :func:`isolated_points` (points no line
segment reaches, which only a symbol shows).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def ema(values, alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average; NaNs are skipped (kept as NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if alpha <= 0 or v.size == 0:
        return v.copy()
    out = np.full_like(v, np.nan)
    acc, weight = 0.0, 0.0
    for i, x in enumerate(v):
        if not math.isfinite(x):
            continue
        acc = alpha * acc + (1 - alpha) * x
        weight = alpha * weight + (1 - alpha)
        out[i] = acc / weight
    return out


# -- keeping single points and constant series visible -------------------------------------
MIN_LOG_SPAN = 1.0  # decades shown around a constant series on a log axis (keeps a 1, 2 or 5 tick label)
REL_PAD = 0.05  # a constant linear series is shown +-5 % around its value


def fitted_span(lo: float, hi: float, *, integer: bool = False, log: bool = False) -> list[float]:
    """The auto-range ``[lo, hi]`` of one axis, widened where the data collapse onto (about) one value.

    ``integer`` (steps, iterations): at least 2 wide around the data, so a single step ``s``
    shows as ``[s - 1, s + 1]``; not below 0 for data from 0 up (step 0 shows as [0, 2]; the
    few pixels pyqtgraph adds below a symbol at 0 are kept).
    ``log`` (values already log10, as the plot holds them): a constant spans one decade.
    Otherwise a constant ``v`` spans ``v +- 5 %`` (``+-0.5`` around 0). A real spread is kept.
    """
    lo, hi = float(lo), float(hi)
    if integer and not log:
        if hi - lo >= 2.0:
            return [lo, hi]
        start = 0.5 * (lo + hi) - 1.0
        if lo > -0.5:  # data from 0 up (integers: a lower bound just below 0 is a symbol's pixel margin)
            start = max(start, min(lo, 0.0))
        return [start, max(hi, start + 2.0)]
    if hi - lo > (1e-6 if log else 1e-6 * max(abs(lo), abs(hi))):
        return [lo, hi]
    mid = 0.5 * (lo + hi)
    half = 0.5 * MIN_LOG_SPAN if log else (REL_PAD * abs(mid) or 0.5)
    return [mid - half, mid + half]


def fitted_bounds(bounds, integer=(False, False), log=(False, False)) -> list:
    """``[[xmin, xmax], [ymin, ymax]]`` (None for an axis without data) through :func:`fitted_span`."""
    return [None if r is None else fitted_span(r[0], r[1], integer=integer[ax], log=log[ax])
            for ax, r in enumerate(bounds)]


def integer_tick_levels(levels) -> list:
    """pyqtgraph tick levels ``[(spacing, offset), ...]`` without the fractional ones (at least every 1)."""
    kept = [(spacing, offset) for spacing, offset in levels if spacing >= 1.0]
    return kept or [(1.0, 0.0)]


def isolated_points(y) -> np.ndarray:
    """Finite points with no finite neighbour: a line drawn with ``connect="finite"`` misses them."""
    finite = np.isfinite(np.asarray(y, dtype=np.float64).reshape(-1))
    if finite.size == 0:
        return finite
    before = np.concatenate(([False], finite[:-1]))
    after = np.concatenate((finite[1:], [False]))
    return finite & ~before & ~after


def curve_symbol(y) -> Optional[str]:
    """The symbol a line plot of ``y`` needs: ``"o"`` while some point is isolated (one point, gaps), else None."""
    return "o" if isolated_points(y).any() else None


class LossesModel:
    """Every StepFinished / ValidationFinished of the run, as columns (missing losses are NaN)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: dict[str, list[float]] = {}
        self.val_steps: list[int] = []
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.baseline_psnr: list[float] = []
        self.baseline_ssim: list[float] = []
        self.lr: list[float] = []
        self.version = 0

    def clear(self) -> None:
        self.__init__()

    def add_step(self, event) -> None:
        n = len(self.steps)
        self.steps.append(int(event.step))
        self.lr.append(float(event.lr))
        for name, value in dict(event.losses).items():
            series = self.losses.setdefault(str(name), [math.nan] * n)
            series.append(float(value))
        for series in self.losses.values():
            if len(series) < n + 1:
                series.append(math.nan)
        self.version += 1

    def add_validation(self, event) -> None:
        self.val_steps.append(int(event.step))
        self.psnr.append(float(event.psnr))
        self.ssim.append(float(event.ssim))
        self.baseline_psnr.append(float(getattr(event, "baseline_psnr", math.nan)))
        self.baseline_ssim.append(float(getattr(event, "baseline_ssim", math.nan)))
        self.version += 1

    def names(self) -> list[str]:
        order = ["total", "loss", "mc", "ei", "supervised", "sup"]
        return sorted(self.losses, key=lambda k: (order.index(k) if k in order else len(order), k))

    def readout(self, x: float) -> str:
        """Values at the step nearest to ``x`` (for the hover label)."""
        if not self.steps:
            return ""
        steps = np.asarray(self.steps)
        i = int(np.argmin(np.abs(steps - x)))
        parts = [f"step {steps[i]}"]
        for name in self.names():
            v = self.losses[name][i]
            if math.isfinite(v):
                parts.append(f"{name} {v:.4g}")
        if self.val_steps:
            vs = np.asarray(self.val_steps)
            j = int(np.argmin(np.abs(vs - x)))
            if abs(vs[j] - steps[i]) <= max(1, abs(x - steps[i]) + 0.5):
                parts.append(f"PSNR {self.psnr[j]:.2f} dB  SSIM {self.ssim[j]:.3f} (step {vs[j]})")
        return "   ".join(parts)
