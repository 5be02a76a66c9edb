"""Reconstructions: measurement, baseline A^dagger y, DEQ output, ground truth, |difference|.

The image views share pan/zoom and window/level (one histogram drives the
baseline, DEQ and reference views); CT window presets map HU windows into the
displayed [0, 1] range; a step slider looks back at earlier snapshots. The data
live in :mod:`workbench.panels.reconstructions_model`; this module draws them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from workbench import backend
from workbench.panels.linking import ViewLinker
from workbench.panels.plotting import control_row, pg
from workbench.panels.reconstructions_model import (AUTO, COLORMAPS, FULL, LINKED_LEVELS, TITLES, VIEWS,
                                                     ReconstructionsModel, difference, preset_levels)


class ReconstructionsPanel(QWidget):
    """Five image views with a shared histogram/LUT, presets, colormaps and a step slider."""

    snapshotShown = Signal(object)
    #: set by the window: ``fn(snap, jobs)`` computes metrics off the GUI thread and
    #: calls ``model.set_metrics(snap, {view: (psnr, ssim)})`` when done
    metrics_provider = None

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = ReconstructionsModel()
        self.hu_range: Optional[tuple] = None
        self._drawn = -1
        self._syncing = False
        self._metrics_requested: set = set()

        self.preset = QComboBox()
        self.preset.addItems([FULL, AUTO] + list(backend.ct_windows().keys()))
        self.preset.setToolTip("Window presets: CT windows in HU when the scan is CT in HU, else [0, 1] equivalents")
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.cmap = QComboBox()
        self.cmap.addItems(COLORMAPS)
        self.cmap.currentTextChanged.connect(self.set_colormap)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setEnabled(False)
        self.slider.setToolTip("Look back at earlier training snapshots")
        self.slider.valueChanged.connect(self.model.select)
        self.slider.valueChanged.connect(lambda _v: self.refresh())
        self.slider.setMinimumWidth(100)
        self.step_label = QLabel("no snapshot yet")
        self.step_label.setFixedWidth(260)
        self.auto_btn = QPushButton("Auto levels")
        self.auto_btn.clicked.connect(lambda: self.apply_preset(AUTO))

        top = control_row("Window:", self.preset, "Colormap:", self.cmap, self.auto_btn)
        second = QHBoxLayout()
        second.addWidget(QLabel("Snapshot:"))
        second.addWidget(self.slider, 1)
        second.addWidget(self.step_label)

        self.glw = pg.GraphicsLayoutWidget()
        self.plots: dict[str, pg.PlotItem] = {}
        self.items: dict[str, pg.ImageItem] = {}
        layout_pos = {"measurement": (0, 0), "baseline": (0, 1), "reconstruction": (0, 2),
                      "reference": (1, 1), "difference": (1, 2)}
        for view in VIEWS:
            r, c = layout_pos[view]
            p = self.glw.addPlot(row=r, col=c, title=TITLES[view])
            p.hideAxis("left")
            p.hideAxis("bottom")
            p.invertY(True)
            p.setAspectLocked(view != "measurement")
            p.setMenuEnabled(False)
            item = pg.ImageItem()
            p.addItem(item)
            self.plots[view] = p
            self.items[view] = item
        self.mask_item = pg.ImageItem()
        self.mask_item.setZValue(5)
        self.mask_item.setOpacity(0.35)
        self.plots["measurement"].addItem(self.mask_item)
        # the info cell under the measurement
        self.info = self.glw.addLabel("", row=1, col=0, justify="left")
        self.linker = ViewLinker([self.plots[v] for v in ("baseline", "reconstruction", "reference", "difference")])
        self._shape = None

        self.hist = pg.HistogramLUTItem()
        self.hist.setImageItem(self.items["reconstruction"])
        self.glw.addItem(self.hist, row=0, col=3, rowspan=2)
        self.hist.sigLevelsChanged.connect(self._sync_levels)
        self.hist.sigLookupTableChanged.connect(self._sync_lut)
        self.items["difference"].setColorMap(pg.colormap.get("inferno"))

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addLayout(second)
        lay.addWidget(self.glw, 1)
        self.levels = (0.0, 1.0)
        self.apply_preset(FULL)

    def clear(self) -> None:
        self.model.clear()
        self._metrics_requested.clear()
        for item in list(self.items.values()) + [self.mask_item]:
            item.clear()
        self._drawn = -1
        self.refresh()

    def set_hu_range(self, hu_range: Optional[tuple]) -> None:
        self.hu_range = tuple(hu_range) if hu_range else None
        self.apply_preset(self.preset.currentText())

    # -- levels and colormaps ---------------------------------------------------------
    def apply_preset(self, preset: str) -> None:
        if self.preset.currentText() != preset and self.preset.findText(preset) >= 0:
            self.preset.blockSignals(True)
            self.preset.setCurrentText(preset)
            self.preset.blockSignals(False)
        levels = preset_levels(preset, self.hu_range)
        if levels is None:
            snap = self.model.current()
            img = snap.get("reconstruction") if snap else None
            if img is not None and np.isfinite(img).any():
                lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
                levels = (lo, hi if hi > lo else lo + 1e-6)
            else:
                levels = (0.0, 1.0)
        self.set_levels(levels)

    def set_levels(self, levels) -> None:
        self.levels = (float(levels[0]), float(levels[1]))
        self.hist.setLevels(*self.levels)
        self._sync_levels()

    def _sync_levels(self, *_args) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            lo, hi = self.hist.getLevels()
            self.levels = (float(lo), float(hi))
            for view in LINKED_LEVELS:
                self.items[view].setLevels(self.levels)
        finally:
            self._syncing = False

    def set_colormap(self, name: str) -> None:
        if name == "grey":
            cmap = pg.ColorMap([0.0, 1.0], [(0, 0, 0), (255, 255, 255)])
        else:
            cmap = pg.colormap.get(name)
        self.hist.gradient.setColorMap(cmap)
        self._sync_lut()

    def _sync_lut(self, *_args) -> None:
        lut = None if self.hist.gradient.isLookupTrivial() else self.hist.getLookupTable(n=512)
        for view in LINKED_LEVELS:
            if view != "reconstruction":
                self.items[view].setLookupTable(lut)

    # -- drawing ------------------------------------------------------------------------
    def refresh(self) -> None:
        m = self.model
        n = len(m.snapshots)
        self.slider.blockSignals(True)
        self.slider.setRange(0, max(0, n - 1))
        self.slider.setEnabled(n > 1)
        if m.index >= 0:
            self.slider.setValue(m.index)
        self.slider.blockSignals(False)
        if self._drawn == m.version:
            return
        self._drawn = m.version
        snap = m.current()
        if snap is None:
            self.step_label.setText("no snapshot yet")
            return
        text = f"{snap['label']}  ({m.index + 1}/{n})"
        self.step_label.setToolTip(text)
        metrics_font = self.step_label.fontMetrics()
        self.step_label.setText(metrics_font.elidedText(text, Qt.TextElideMode.ElideMiddle, self.step_label.width()))
        metrics = m.metrics(snap)
        if metrics is None:
            metrics = {}
            jobs = m.metrics_jobs(snap)
            if jobs and self.metrics_provider is not None and id(snap) not in self._metrics_requested:
                self._metrics_requested.add(id(snap))
                self.metrics_provider(snap, jobs)
        for view in VIEWS:
            item = self.items[view]
            if view == "difference":
                img, title = difference(snap)
            else:
                img, title = snap.get(view), TITLES[view]
                if view == "measurement":
                    title = "Sinogram y" if snap["modality"] == "ct" else "k-space log|y|"
            if img is None:
                item.clear()
                self.plots[view].setTitle(f"{title} (n/a)")
                continue
            if view in LINKED_LEVELS:
                item.setImage(img, autoLevels=False, levels=self.levels)
            elif view == "difference":
                hi = float(np.nanmax(img)) if np.isfinite(img).any() else 1.0
                item.setImage(img, autoLevels=False, levels=(0.0, hi if hi > 0 else 1.0))
            else:
                item.setImage(img, autoLevels=True)
            if view in metrics:
                psnr, ssim = metrics[view]
                title = f"{title}<br><span style='font-size:9pt'>PSNR {psnr:.2f} dB · SSIM {ssim:.3f}</span>"
            self.plots[view].setTitle(title)
        rec = snap.get("reconstruction")
        shape = (None if rec is None else rec.shape, None if snap.get("measurement") is None
                 else snap["measurement"].shape)
        if shape != self._shape:  # new geometry: fit every view
            self._shape = shape
            self.linker.reset()
            self.plots["measurement"].getViewBox().autoRange(padding=0.0)
        self._draw_mask(snap)
        self.info.setText(self._info_text(snap))
        self.snapshotShown.emit(snap)

    def _draw_mask(self, snap: dict) -> None:
        mask, meas = snap.get("mask"), snap.get("measurement")
        if mask is None or meas is None:
            self.mask_item.clear()
            return
        mask = np.asarray(mask, dtype=np.float32)
        if mask.ndim == 1:
            mask = np.broadcast_to(mask[None, :], meas.shape)
        if mask.shape != meas.shape:
            self.mask_item.clear()
            return
        rgba = np.zeros(mask.shape + (4,), dtype=np.uint8)
        rgba[..., 0] = 230
        rgba[..., 3] = np.where(mask > 0, 0, 255).astype(np.uint8)  # shade the unsampled lines
        self.mask_item.setImage(rgba, autoLevels=False)

    def _info_text(self, snap: dict) -> str:
        lines = [f"<b>{snap['label']}</b>", f"modality: {snap['modality']}"]
        rec = snap.get("reconstruction")
        if rec is not None:
            lines.append(f"image {rec.shape[0]}\u00d7{rec.shape[1]}")
        meas = snap.get("measurement")
        if meas is not None:
            lines.append(f"measurement {meas.shape[0]}\u00d7{meas.shape[1]}")
        if snap.get("mask") is not None:
            lines.append("red shading = unsampled k-space")
        lo, hi = self.levels
        lines.append(f"window [{lo:.3g}, {hi:.3g}]")
        return "<br>".join(lines)

    def current_image(self, view: str = "reconstruction") -> Optional[np.ndarray]:
        return self.model.current_image(view)
