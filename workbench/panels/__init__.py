"""Dockable panels. Each module has a Qt-free model (the logic, testable without a
screen) and a QWidget view that draws the model on a timer."""

import pyqtgraph as pg

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
