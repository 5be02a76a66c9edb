"""Loss curves (total, MC, EI, supervised, ...) and validation PSNR / SSIM against step.

The data and the smoothing live in :mod:`workbench.panels.losses_model`; this
module draws them. :class:`FittedViewBox` and :class:`IntegerAxis` (also used by the
residual panel) apply the range rules of :mod:`workbench.panels.axis_ranges`, so a single
step or a constant series still gets a readable range, and a curve with an isolated point
draws it as a symbol.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QLabel, QSlider, QVBoxLayout, QWidget

from workbench.panels.axis_ranges import curve_symbol
from workbench.panels.losses_model import LossesModel, ema
from workbench.panels.plotting import FittedViewBox, IntegerAxis, LogAxis, control_row, pg

KNOWN_COLOURS = {
    "total": (20, 20, 20),
    "loss": (20, 20, 20),
    "mc": (31, 119, 180),
    "ei": (255, 127, 14),
    "supervised": (44, 160, 44),
    "sup": (44, 160, 44),
}
_EXTRA = [(148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class LossesPanel(QWidget):
    """Training losses (log scale, optional smoothing) and validation PSNR / SSIM, drawn from ``model``."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = LossesModel()
        self._drawn = -1
        self.alpha = 0.0

        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 99)
        self.slider.setValue(0)
        self.slider.setMaximumWidth(160)
        self.slider.setToolTip("Exponential moving average of the loss curves (display only)")
        self.slider.valueChanged.connect(self._smoothing_changed)
        self.smooth_label = QLabel("smoothing 0.00")
        self.logy = QCheckBox("log y")
        self.logy.setChecked(True)
        self.logy.toggled.connect(self._log_changed)
        self.readout = QLabel("")
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        top = control_row("EMA", self.slider, self.smooth_label, self.logy)

        self.glw = pg.GraphicsLayoutWidget()
        self.loss_plot = self.glw.addPlot(row=0, col=0, rowspan=2, title="Training losses",
                                          viewBox=FittedViewBox(integer_x=True),
                                          axisItems={"left": LogAxis("left"), "bottom": IntegerAxis("bottom")})
        self.loss_plot.setLogMode(y=True)
        self.loss_plot.showGrid(x=True, y=True, alpha=0.3)
        self.loss_plot.setLabel("bottom", "step")
        self.loss_plot.addLegend(offset=(-10, 10), brush=(255, 255, 255, 200))
        self.loss_plot.getAxis("left").enableAutoSIPrefix(False)
        self.psnr_plot = self.glw.addPlot(row=0, col=1, title="Validation PSNR (dB)",
                                          viewBox=FittedViewBox(integer_x=True),
                                          axisItems={"bottom": IntegerAxis("bottom")})
        self.ssim_plot = self.glw.addPlot(row=1, col=1, title="Validation SSIM",
                                          viewBox=FittedViewBox(integer_x=True),
                                          axisItems={"bottom": IntegerAxis("bottom")})
        for p in (self.psnr_plot, self.ssim_plot):
            p.showGrid(x=True, y=True, alpha=0.3)
            p.setLabel("bottom", "step")
            p.addLegend(offset=(-10, -10), brush=(255, 255, 255, 200), colCount=2)  # one row: short plots
        self.glw.ci.layout.setColumnStretchFactor(0, 3)
        self.glw.ci.layout.setColumnStretchFactor(1, 2)
        # validation points are sparse: always marked; the baselines only while a point is isolated
        sym = dict(symbol="o", symbolSize=5, symbolPen=None)
        base_sym = dict(symbol=None, symbolSize=4, symbolPen=None, symbolBrush=(150, 150, 150))
        self.psnr_curve = self.psnr_plot.plot([], [], pen=pg.mkPen((31, 119, 180), width=2), name="DEQ",
                                              symbolBrush=(31, 119, 180), **sym)
        self.psnr_base = self.psnr_plot.plot([], [], pen=pg.mkPen((150, 150, 150), width=1, style=Qt.PenStyle.DashLine),
                                             name="baseline", **base_sym)
        self.ssim_curve = self.ssim_plot.plot([], [], pen=pg.mkPen((31, 119, 180), width=2), name="DEQ",
                                              symbolBrush=(31, 119, 180), **sym)
        self.ssim_base = self.ssim_plot.plot([], [], pen=pg.mkPen((150, 150, 150), width=1, style=Qt.PenStyle.DashLine),
                                             name="baseline", **base_sym)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.vline = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((120, 120, 120), style=Qt.PenStyle.DotLine))
        self.vline.setVisible(False)
        self.loss_plot.addItem(self.vline, ignoreBounds=True)
        self._mouse_proxy = pg.SignalProxy(self.glw.scene().sigMouseMoved, rateLimit=30, slot=self._mouse_moved)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.glw, 1)
        lay.addWidget(self.readout)

    def clear(self) -> None:
        self.model.clear()
        for c in self.curves.values():
            self.loss_plot.removeItem(c)
            if self.loss_plot.legend is not None:
                self.loss_plot.legend.removeItem(c)
        self.curves.clear()
        self._drawn = -1
        self.refresh()

    def set_smoothing(self, alpha: float) -> None:
        self.slider.setValue(int(round(alpha * 100)))

    def _smoothing_changed(self, v: int) -> None:
        self.alpha = v / 100.0
        self.smooth_label.setText(f"smoothing {self.alpha:.2f}")
        self._drawn = -1
        self.refresh()

    def _log_changed(self, on: bool) -> None:
        self.loss_plot.setLogMode(y=on)
        self._drawn = -1
        self.refresh()

    def _colour(self, name: str):
        if name in KNOWN_COLOURS:
            return KNOWN_COLOURS[name]
        return _EXTRA[len(self.curves) % len(_EXTRA)]

    def refresh(self) -> None:
        if self._drawn == self.model.version:
            return
        self._drawn = self.model.version
        m = self.model
        x = np.asarray(m.steps, dtype=np.float64)
        log = self.logy.isChecked()
        for name in m.names():
            if name not in self.curves:
                width = 2.2 if name in ("total", "loss") else 1.5
                colour = self._colour(name)
                self.curves[name] = self.loss_plot.plot([], [], pen=pg.mkPen(colour, width=width), name=name,
                                                        symbol=None, symbolSize=6, symbolPen=None,
                                                        symbolBrush=colour)
            y = ema(m.losses[name], self.alpha)
            if log:
                y = np.where(y > 0, y, np.nan)
            # a point no segment reaches (the first step, a gap) is drawn as a symbol
            self.curves[name].setData(x, y, connect="finite", symbol=curve_symbol(y))
        vx = np.asarray(m.val_steps, dtype=np.float64)
        self.psnr_curve.setData(vx, np.asarray(m.psnr, dtype=np.float64), connect="finite")
        self.ssim_curve.setData(vx, np.asarray(m.ssim, dtype=np.float64), connect="finite")
        bp = np.asarray(m.baseline_psnr, dtype=np.float64)
        bs = np.asarray(m.baseline_ssim, dtype=np.float64)
        self.psnr_base.setData(vx if np.isfinite(bp).any() else [], bp if np.isfinite(bp).any() else [],
                               connect="finite", symbol=curve_symbol(bp))
        self.ssim_base.setData(vx if np.isfinite(bs).any() else [], bs if np.isfinite(bs).any() else [],
                               connect="finite", symbol=curve_symbol(bs))
        if m.steps and not self.vline.isVisible():
            last = m.steps[-1]
            text = m.readout(last)
            self.readout.setText(text)

    def _mouse_moved(self, args) -> None:
        pos = args[0]
        for plot in (self.loss_plot, self.psnr_plot, self.ssim_plot):
            if plot.sceneBoundingRect().contains(pos):
                x = plot.vb.mapSceneToView(pos).x()
                self.vline.setPos(x)
                self.vline.setVisible(True)
                self.readout.setText(self.model.readout(x))
                return
        self.vline.setVisible(False)
