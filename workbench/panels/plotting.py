"""pyqtgraph set-up shared by the panels: global options, the log axis, and the row of
controls above a plot. Every panel that draws with pyqtgraph imports ``pg`` from here,
so the options are set before the first plot item exists."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtWidgets import QHBoxLayout, QLabel

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


def control_row(*items) -> QHBoxLayout:
    """A left-aligned row of controls; a string becomes a label."""
    row = QHBoxLayout()
    for item in items:
        row.addWidget(QLabel(item) if isinstance(item, str) else item)
    row.addStretch(1)
    return row
