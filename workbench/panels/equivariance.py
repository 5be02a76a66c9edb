"""Equivariance: T_g f(y), f(A T_g f(y)) and their difference for a rotation angle,
plus the equivariance error against angle for the current model.

The panel only asks; :mod:`workbench.presenters.analysis` computes in a
background thread (LoadedModel.equivariance / equivariance_curve) and hands the
results back; :mod:`workbench.panels.equivariance_model` holds the panel's data.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from workbench.panels.equivariance_model import EquivarianceModel, probe_images
from workbench.panels.linking import ViewLinker
from workbench.panels.plotting import pg


class EquivariancePanel(QWidget):
    angleRequested = Signal(float)
    curveRequested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = EquivarianceModel()
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 359)
        self.slider.setValue(30)
        self.slider.setToolTip("Rotation angle of the group action T_g")
        self.angle_label = QLabel("30°")
        self.angle_label.setMinimumWidth(40)
        self.error_label = QLabel("equivariance error: —")
        self.curve_btn = QPushButton("Error vs angle")
        self.curve_btn.setToolTip("Compute the equivariance error over 0–360° for the current model")
        self.curve_btn.clicked.connect(self.request_curve)
        self.compute_btn = QPushButton("Compute")
        self.compute_btn.clicked.connect(lambda: self.request_angle(self.slider.value()))
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(120)
        self._debounce.timeout.connect(lambda: self.request_angle(self.slider.value()))
        self.slider.valueChanged.connect(self._slider_moved)

        top = QHBoxLayout()
        top.addWidget(QLabel("Angle:"))
        top.addWidget(self.slider, 1)
        top.addWidget(self.angle_label)
        top.addWidget(self.compute_btn)
        top.addWidget(self.curve_btn)

        self.glw = pg.GraphicsLayoutWidget()
        self.plots, self.items = {}, {}
        titles = {"rotated_reconstruction": "T_g f(y)", "reconstruction_of_rotated": "f(A T_g f(y))",
                  "difference": "difference"}
        for col, key in enumerate(titles):
            p = self.glw.addPlot(row=0, col=col, title=titles[key])
            p.hideAxis("left")
            p.hideAxis("bottom")
            p.invertY(True)
            p.setAspectLocked(True)
            p.setMenuEnabled(False)
            item = pg.ImageItem()
            p.addItem(item)
            self.plots[key], self.items[key] = p, item
        self.linker = ViewLinker(list(self.plots.values()))
        self._shape = None
        self.items["difference"].setColorMap(pg.colormap.get("CET-D1"))
        self.curve_plot = self.glw.addPlot(row=1, col=0, colspan=3, title="Equivariance error vs angle")
        self.curve_plot.setLabel("bottom", "angle (deg)")
        self.curve_plot.setLabel("left", "error")
        self.curve_plot.getAxis("left").enableAutoSIPrefix(False)
        self.curve_plot.showGrid(x=True, y=True, alpha=0.3)
        self.curve = self.curve_plot.plot([], [], pen=pg.mkPen((31, 119, 180), width=2), symbol="o",
                                          symbolSize=5, symbolBrush=(31, 119, 180), symbolPen=None)
        self.marker = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((214, 39, 40), style=Qt.PenStyle.DashLine))
        self.curve_plot.addItem(self.marker, ignoreBounds=True)
        self.marker.setPos(30)
        self.glw.ci.layout.setRowStretchFactor(0, 3)
        self.glw.ci.layout.setRowStretchFactor(1, 2)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.error_label)
        lay.addWidget(self.glw, 1)

    def _slider_moved(self, v: int) -> None:
        self.angle_label.setText(f"{v}°")
        self.marker.setPos(v)
        self._debounce.start()

    def request_angle(self, angle: float) -> None:
        start = self.model.want(float(angle))
        if start is not None:
            self.angleRequested.emit(start)

    def request_curve(self) -> None:
        if not self.model.curve_in_flight:
            self.model.curve_in_flight = True
            self.curve_btn.setEnabled(False)
            self.curveRequested.emit()

    def show_result(self, angle: float, result) -> None:
        """Draw a ``LoadedModel.equivariance`` result (None: nothing new to draw)."""
        nxt = self.model.done(angle, result)
        if result is not None:
            images, err = probe_images(result)
            for key, item in self.items.items():
                img = images.get(key)
                if img is None:
                    item.clear()
                elif key == "difference":
                    m = float(np.nanmax(np.abs(img))) if np.isfinite(img).any() else 1.0
                    item.setImage(img, autoLevels=False, levels=(-m or -1.0, m or 1.0))
                else:
                    item.setImage(img, autoLevels=False, levels=(0.0, 1.0))
            img0 = self.items["rotated_reconstruction"].image
            if img0 is not None and img0.shape != self._shape:
                self._shape = img0.shape
                self.linker.reset()
            self.error_label.setText(f"equivariance error at {angle:.0f}°: {err:.4g}"
                                     "   (‖T_g f(y) − f(A T_g f(y))‖ / ‖T_g f(y)‖)")
        if nxt is not None:
            self.angleRequested.emit(nxt)

    def show_curve(self, angles, errors) -> None:
        self.model.curve_in_flight = False
        self.curve_btn.setEnabled(True)
        if angles is None:
            return
        a = np.asarray(angles, dtype=np.float64)
        e = np.asarray(errors, dtype=np.float64)
        self.model.curve = (a, e)
        self.curve.setData(a, e, connect="finite")

    def request_failed(self) -> None:
        """A computation failed; make the controls usable again."""
        self.model.in_flight = None
        self.model.curve_in_flight = False
        self.curve_btn.setEnabled(True)

    def clear(self) -> None:
        self.model.clear_results()
        for item in self.items.values():
            item.clear()
        self.curve.setData([], [])
        self.error_label.setText("equivariance error: —")
