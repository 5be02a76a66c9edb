"""pyqtgraph set-up shared by the panels: global options, the log axis, and the row of
controls above a plot. Every panel that draws with pyqtgraph imports ``pg`` from here,
so the options are set before the first plot item exists."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtWidgets import QHBoxLayout, QLabel

from workbench.panels.axis_ranges import fitted_bounds, integer_tick_levels

# Arrays are [rows, cols] everywhere in the engine; show them that way.
pg.setConfigOptions(imageAxisOrder="row-major", antialias=False, background="w", foreground="k")


class LogAxis(pg.AxisItem):
    """An axis whose log-mode labels skip the crowded minor ticks (keeps 1, 2 and 5 x 10^k)."""

    def logTickStrings(self, values, scale, spacing):
        strings = super().logTickStrings(values, scale, spacing)
        out = []
        for v, s in zip(values, strings):
            try:
                mantissa = 10 ** (float(v) % 1.0)
            except (TypeError, ValueError, OverflowError):
                out.append(s)
                continue
            keep = any(abs(mantissa - k) < 0.02 * k for k in (1.0, 2.0, 5.0, 10.0))
            out.append(s if keep else "")
        return out


class FittedViewBox(pg.ViewBox):
    """A ViewBox whose auto-range never collapses onto one value (rules: ``axis_ranges.fitted_bounds``).

    pyqtgraph keeps the previous scale around a zero-width range: one validation at step 0
    showed as -0.5..0.5 ("-400…400, x0.001"). Here the data bounds are widened before
    auto-range pads them; ``integer`` marks the axes that hold steps or iterations. A range
    the user set by zooming or panning is left alone (auto-range is then off); the "A"
    button and View All use the same bounds.
    """

    def __init__(self, integer_x: bool = False, integer_y: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.integer = (bool(integer_x), bool(integer_y))

    def childrenBounds(self, frac=None, orthoRange=(None, None), items=None):
        bounds = super().childrenBounds(frac=frac, orthoRange=orthoRange, items=items)
        return fitted_bounds(bounds, self.integer, tuple(self.state["logMode"]))


class IntegerAxis(pg.AxisItem):
    """An axis of steps or iterations: integer ticks, plain numbers (no "(x0.001)" SI scaling)."""

    def __init__(self, orientation: str, **kwargs) -> None:
        super().__init__(orientation, **kwargs)
        self.enableAutoSIPrefix(False)

    def tickSpacing(self, minVal, maxVal, size):
        return integer_tick_levels(super().tickSpacing(minVal, maxVal, size))


def control_row(*items) -> QHBoxLayout:
    """A left-aligned row of controls; a string becomes a label."""
    row = QHBoxLayout()
    for item in items:
        row.addWidget(QLabel(item) if isinstance(item, str) else item)
    row.addStretch(1)
    return row
