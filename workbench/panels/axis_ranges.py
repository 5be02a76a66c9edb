"""What the training plots need to stay readable when a series is a single point or a constant
(Qt-free; :mod:`workbench.panels.plotting` and the loss and residual panels apply it).

:func:`fitted_bounds` is the auto-range a plot falls back to instead of collapsing onto one value,
:func:`integer_tick_levels` gives steps and iterations integer ticks, and :func:`isolated_points` /
:func:`curve_symbol` find the points no line segment reaches, which only a symbol shows.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

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
