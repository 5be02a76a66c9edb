"""The loss curves' data: training losses per step, validation PSNR / SSIM, and the
display-only smoothing (a bias-corrected exponential moving average, like
TensorBoard's, so the first points are not pulled towards zero). Qt-free."""

from __future__ import annotations

import math

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
