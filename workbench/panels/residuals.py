"""Solver residuals: per-solve residual traces, tolerance, iterations over training, problems,
and the spectral radius of dF/dx at the fixed point over training.

The data (worst-sample traces, counts, problems) live in
:mod:`workbench.panels.residuals_model`; this module draws them. The spectral radius
(``StabilityChecked`` events) decides whether the fixed-point iteration
converges at all (below 1) and how fast; the limit line is the trainer's
safeguard threshold, and red marks are the steps where the safeguard acted.

A step that failed on a solve (``SolveAlarm``) raises a red banner naming the step,
the solve and the reason, with an Inspect button; double-clicking a row of the
problem table opens that solve in the Solver Inspector (both are signals the
window connects).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFrame, QHBoxLayout, QHeaderView, QLabel, QPushButton,
                               QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QToolButton, QVBoxLayout,
                               QWidget)

from workbench.panels.axis_ranges import curve_symbol
from workbench.panels.plotting import FittedViewBox, IntegerAxis, LogAxis, control_row, pg
from workbench.panels.residuals_model import DIRECTIONS, REASON_LABELS, ResidualsModel

_NEWEST = {"forward": (31, 119, 180), "backward": (255, 127, 14)}
_PROBLEM = (214, 39, 40)


class AlarmBanner(QFrame):
    """The red line that names a failed step's solve, with Inspect and dismiss buttons."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("divergence_alarm")
        self.setStyleSheet("#divergence_alarm { background: #c62828; border-radius: 3px; }"
                           "#divergence_alarm QLabel { color: white; font-weight: bold; }")
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.inspect_button = QPushButton("Inspect")
        self.inspect_button.setToolTip("Open the failed solve in the Solver Inspector")
        self.dismiss_button = QToolButton()
        self.dismiss_button.setText("\u2715")
        self.dismiss_button.setToolTip("Hide this alarm (the problem table keeps the solve)")
        row = QHBoxLayout(self)
        row.setContentsMargins(8, 4, 4, 4)
        row.addWidget(self.label, 1)
        row.addWidget(self.inspect_button)
        row.addWidget(self.dismiss_button)
        self.setVisible(False)


class ResidualsPanel(QWidget):
    """Residual traces (forward, backward), iterations per solve, stop reasons, problem list."""

    problemActivated = Signal(object)  # the SolveRecord of a double-clicked problem row
    inspectAlarm = Signal()  # the alarm banner's Inspect

    def __init__(self, parent=None, overlay: int = 8) -> None:
        super().__init__(parent)
        self.model = ResidualsModel(overlay)
        self.mode = "rel"
        self._drawn = -1
        self._shown_problems: list = []  # the SolveRecord of each table row
        self.alarm = AlarmBanner()
        self.alarm.inspect_button.clicked.connect(self.inspectAlarm.emit)
        self.alarm.dismiss_button.clicked.connect(self._dismiss_alarm)

        self.mode_box = QComboBox()
        self.mode_box.addItems(["relative", "absolute"])
        self.mode_box.setToolTip("Plot relative (||x_k+1 - x_k|| / ||x_k+1||) or absolute residuals")
        self.mode_box.currentIndexChanged.connect(self._mode_changed)
        self.overlay_box = QSpinBox()
        self.overlay_box.setRange(1, 50)
        self.overlay_box.setValue(overlay)
        self.overlay_box.setPrefix("last ")
        self.overlay_box.setSuffix(" solves")
        self.overlay_box.valueChanged.connect(self._overlay_changed)
        self.logy = QCheckBox("log y")
        self.logy.setChecked(True)
        self.logy.toggled.connect(self._logy_changed)
        self.summary = QLabel("no solves yet")
        self.summary.setWordWrap(True)

        top = control_row("Residual:", self.mode_box, self.overlay_box, self.logy)

        self.glw = pg.GraphicsLayoutWidget()
        self.plots = {}
        self.curves = {}
        self.tol_lines = {}
        for col, d in enumerate(DIRECTIONS):
            p = self.glw.addPlot(row=0, col=col, title=f"{d.capitalize()} solves",
                                 viewBox=FittedViewBox(integer_x=True),
                                 axisItems={"left": LogAxis("left"), "bottom": IntegerAxis("bottom")})
            p.setLogMode(y=True)
            p.showGrid(x=True, y=True, alpha=0.3)
            p.setLabel("bottom", "iteration")
            p.setLabel("left", "residual")
            p.getAxis("left").enableAutoSIPrefix(False)
            self.plots[d] = p
            self.curves[d] = []
            line = pg.InfiniteLine(angle=0, movable=False,
                                   pen=pg.mkPen((40, 160, 40), width=1.5, style=Qt.PenStyle.DashLine),
                                   label="tol", labelOpts={"position": 0.95, "color": (40, 130, 40)})
            line.setVisible(False)
            p.addItem(line, ignoreBounds=True)
            self.tol_lines[d] = line
        it = self.glw.addPlot(row=1, col=0, title="Iterations per solve",
                              viewBox=FittedViewBox(integer_x=True, integer_y=True),
                              axisItems={"left": IntegerAxis("left"), "bottom": IntegerAxis("bottom")})
        # the directions are keyed in the axis label's colours: a legend inside this short plot covered
        # the points of a single step (centred, see FittedViewBox)
        key = "&nbsp;&nbsp;".join(f"<span style='color: #{r:02x}{g:02x}{b:02x}'>\u25cf {d}</span>"
                                  for d, (r, g, b) in _NEWEST.items())
        it.setLabel("bottom", f"training step&nbsp;&nbsp;&nbsp;{key}")
        it.setLabel("left", "iterations")
        it.showGrid(x=True, y=True, alpha=0.3)
        self.iter_plot = it
        self.iter_curves = {
            d: it.plot([], [], pen=pg.mkPen(_NEWEST[d], width=1.5), symbol="o", symbolSize=5,
                       symbolBrush=_NEWEST[d], symbolPen=None, name=d)
            for d in DIRECTIONS
        }
        self.iter_problem_scatter = pg.ScatterPlotItem(size=9, brush=pg.mkBrush(*_PROBLEM), pen=None,
                                                       symbol="x")
        it.addItem(self.iter_problem_scatter)
        rp = self.glw.addPlot(row=1, col=1, title="Spectral radius of dF/dx",
                              viewBox=FittedViewBox(integer_x=True), axisItems={"bottom": IntegerAxis("bottom")})
        rp.setLabel("bottom", "training step")
        rp.setLabel("left", "rho at x*")
        rp.showGrid(x=True, y=True, alpha=0.3)
        rp.setToolTip("Power-iteration (Arnoldi) estimate of the spectral radius of the fixed-point map's "
                      "Jacobian at the training fixed points: below 1 the iteration converges locally. "
                      "Dashed: the safeguard's limit; red: the safeguard raised the Jacobian penalty or rolled back.")
        self.radius_plot = rp
        self.radius_curve = rp.plot([], [], pen=pg.mkPen((44, 160, 44), width=1.5), symbol="o", symbolSize=5,
                                    symbolBrush=(44, 160, 44), symbolPen=None)
        self.radius_acted_scatter = pg.ScatterPlotItem(size=10, brush=pg.mkBrush(*_PROBLEM), pen=None, symbol="t")
        rp.addItem(self.radius_acted_scatter)
        self.radius_limit_line = pg.InfiniteLine(angle=0, movable=False,
                                                 pen=pg.mkPen(_PROBLEM, width=1.2, style=Qt.PenStyle.DashLine),
                                                 label="limit", labelOpts={"position": 0.95, "color": _PROBLEM})
        self.radius_limit_line.setVisible(False)
        self.radius_limit_line.setZValue(-1)  # under the points: a radius right at the limit stays visible
        rp.addItem(self.radius_limit_line, ignoreBounds=False)

        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["step", "direction", "reason", "iterations", "final res.", "solver"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setToolTip("Solves that diverged, hit the iteration cap or produced non-finite values; "
                              "double-click one to open it in the Solver Inspector")
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.cellDoubleClicked.connect(self._row_activated)
        self.table_label = QLabel("Problem solves: none")

        bottom = QWidget()
        bl = QVBoxLayout(bottom)
        bl.setContentsMargins(0, 0, 0, 0)
        bl.addWidget(self.summary)
        bl.addWidget(self.table_label)
        bl.addWidget(self.table)

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.glw)
        split.addWidget(bottom)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.alarm)
        lay.addLayout(top)
        lay.addWidget(split)

    def clear(self) -> None:
        self.model.clear()
        self.model.set_overlay(self.overlay_box.value())
        self._drawn = -1
        self.refresh()

    # -- controls -----------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        self.mode_box.setCurrentIndex(0 if mode == "rel" else 1)

    def _mode_changed(self, index: int) -> None:
        self.mode = "rel" if index == 0 else "abs"
        self._drawn = -1
        self.refresh()

    def _overlay_changed(self, n: int) -> None:
        self.model.set_overlay(n)
        self.refresh()

    def _row_activated(self, row: int, _column: int) -> None:
        if 0 <= row < len(self._shown_problems):
            self.problemActivated.emit(self._shown_problems[row])

    def _dismiss_alarm(self) -> None:
        self.model.dismiss_alarm()
        self.refresh()

    def _logy_changed(self, on: bool) -> None:
        for p in self.plots.values():
            p.setLogMode(y=on)
        self._drawn = -1
        self.refresh()

    # -- drawing ------------------------------------------------------------------------
    def _curve(self, d: str, i: int):
        curves = self.curves[d]
        while len(curves) <= i:
            curves.append(self.plots[d].plot([], [], connect="finite", symbol=None, symbolSize=6, symbolPen=None))
        return curves[i]

    def refresh(self) -> None:
        if self._drawn == self.model.version:
            return
        self._drawn = self.model.version
        log = self.logy.isChecked()
        for d in DIRECTIONS:
            records = list(self.model.recent[d])
            n = len(records)
            for i, rec in enumerate(records):
                y = rec.trace(self.mode).astype(np.float64, copy=True)
                if log:
                    y[~(y > 0)] = np.nan
                x = np.arange(1, len(y) + 1, dtype=np.float64)
                newest = i == n - 1
                if rec.problem:
                    pen = pg.mkPen(_PROBLEM, width=2.5 if newest else 1.2)
                elif newest:
                    pen = pg.mkPen(_NEWEST[d], width=2.5)
                else:
                    age = (n - 1 - i) / max(1, n - 1)
                    alpha = int(200 - 150 * age)
                    pen = pg.mkPen(120, 120, 140, alpha, width=1)
                c = self._curve(d, i)
                # a one-iteration solve (or a lone finite residual) is a point no segment reaches
                c.setData(x, y, connect="finite", symbol=curve_symbol(y), symbolBrush=pg.mkBrush(pen.color()))
                c.setPen(pen)
                c.setZValue(10 if newest else i)
                c.setVisible(True)
            for c in self.curves[d][n:]:
                c.setData([], [])
                c.setVisible(False)
            tol = self.model.tolerance.get(d)
            line = self.tol_lines[d]
            if tol and tol[1] == self.mode and tol[0] > 0:
                line.setPos(np.log10(tol[0]) if log else tol[0])
                line.setVisible(True)
            else:
                line.setVisible(False)
            last = records[-1] if records else None
            title = f"{d.capitalize()} solves"
            if last is not None:
                title += f" ({last.iterations} it" + (f", {last.fallback} fallback)" if last.fallback else ")")
            self.plots[d].setTitle(title)
            xs = np.asarray(self.model.iter_x[d], dtype=np.float64)
            self.iter_curves[d].setData(xs, np.asarray(self.model.iter_y[d], dtype=np.float64))
        px, py = [], []
        for d in DIRECTIONS:
            for x, y, bad in zip(self.model.iter_x[d], self.model.iter_y[d], self.model.iter_problem[d]):
                if bad:
                    px.append(x)
                    py.append(y)
        self.iter_problem_scatter.setData(px, py)
        m = self.model
        self.radius_curve.setData(np.asarray(m.radius_x, dtype=np.float64), np.asarray(m.radius_y, dtype=np.float64),
                                  connect="finite")
        acted = [(x, y) for x, y, a in zip(m.radius_x, m.radius_y, m.radius_acted) if a]
        self.radius_acted_scatter.setData([a[0] for a in acted], [a[1] for a in acted])
        if np.isfinite(m.radius_limit):
            self.radius_limit_line.setPos(m.radius_limit)
        self.radius_limit_line.setVisible(bool(np.isfinite(m.radius_limit)))
        self.radius_plot.setTitle(m.radius_title())
        self.summary.setText(self.model.reason_summary())
        self.alarm.setVisible(m.alarm is not None)
        self.alarm.label.setText(m.alarm.text() if m.alarm is not None else "")
        self._fill_table()

    def _fill_table(self) -> None:
        problems = self.model.problems
        self.table_label.setText(f"Problem solves: {len(problems)}" if problems else "Problem solves: none")
        shown = problems[-200:][::-1]
        self._shown_problems = shown
        self.table.setRowCount(len(shown))
        for row, rec in enumerate(shown):
            final = rec.trace(self.mode)
            final_s = f"{final[-1]:.3g}" if final.size else "—"
            step = "Reconstruct" if rec.tag == "reconstruct" else str(rec.step)
            values = [step, rec.direction, REASON_LABELS.get(rec.reason, rec.reason), rec.iterations_label(),
                      final_s, rec.solver_label()]
            for col, v in enumerate(values):
                item = QTableWidgetItem(v)
                item.setToolTip(v)  # a fallback's solver name is longer than its column
                if col == 2:
                    item.setForeground(pg.mkColor(*_PROBLEM))
                self.table.setItem(row, col, item)
