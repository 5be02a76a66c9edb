"""The viewer: the opened scan's slice at its own resolution ("Scan" page) and the
reconstructions ("Reconstruction" page: measurement, baseline A^dagger y, DEQ output,
ground truth, |difference|).

Both pages share window/level (either page's histogram drives the scan, baseline,
DEQ and reference views), CT window presets in HU, the colormap and the viewer's
mouse conventions (:mod:`workbench.panels.slice_view`: wheel = slices, Ctrl + wheel
= zoom, right-drag = window/level); the reconstruction page's views share pan/zoom.
The readout under the images gives the pixel under the cursor (row, column, value in
HU for CT in HU) and the window (level / width in HU). A step slider looks back at
earlier snapshots. The data live in :mod:`workbench.panels.reconstructions_model`;
this module draws them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QLabel, QPushButton, QSlider, QStackedWidget, QTabBar,
                               QVBoxLayout, QWidget)

from workbench import backend
from workbench.panels import viewer_model
from workbench.panels.linking import ViewLinker, fit_to_data
from workbench.panels.plotting import control_row, pg
from workbench.panels.reconstructions_model import (AUTO, COLORMAPS, CUSTOM, FULL, LINKED_LEVELS, TITLES, VIEWS,
                                                     ReconstructionsModel, difference, preset_levels)
from workbench.panels.scan_controls import ScanControls
from workbench.panels.slice_view import DRAG_START, image_plot

PAGES = ("scan", "comparison")
PAGE_TITLES = {"scan": "Scan", "comparison": "Reconstruction"}
HELP_TEXT = ("wheel: slices · Ctrl+wheel: zoom · left-drag: pan · right-drag: window "
             "(↔ width, ↕ level)")


class ReconstructionsPanel(QWidget):
    """The scan page and five reconstruction views with shared histogram/LUT, presets, colormaps,
    a step slider, the scan controls and a pixel readout."""

    snapshotShown = Signal(object)
    sliceStepped = Signal(int)  # wheel notches over an image: slices to move
    #: set by the window: ``fn(snap, jobs)`` computes metrics off the GUI thread and
    #: calls ``model.set_metrics(snap, {view: (psnr, ssim)})`` when done
    metrics_provider = None

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = ReconstructionsModel()
        self.hu_range: Optional[tuple] = None
        self._drawn = -1
        self._scan_drawn = -1
        self._syncing = False
        self._drag_start: Optional[tuple] = None
        self._metrics_requested: set = set()

        self.preset = QComboBox()
        self.preset.addItems([FULL, AUTO] + list(backend.ct_windows().keys()) + [CUSTOM])
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
        self.controls = ScanControls()
        self.pages = QTabBar()
        for page in PAGES:
            self.pages.addTab(PAGE_TITLES[page])
        self.pages.setToolTip("Scan: browse the opened scan at its own resolution; Reconstruction: the latest "
                              "reconstruction or training snapshot")
        self.pages.currentChanged.connect(lambda i: (self.model.set_page(PAGES[i]), self.refresh()))

        top = control_row("Window:", self.preset, "Colormap:", self.cmap, self.auto_btn)
        top.addWidget(QLabel("Size:"))
        top.addWidget(self.controls.size)
        top.addWidget(self.controls.reconstruct_button)
        second = QHBoxLayout()
        second.addWidget(self.pages)
        second.addWidget(QLabel("Snapshot:"))
        second.addWidget(self.slider, 1)
        second.addWidget(self.step_label)

        # -- the scan page: one large view --------------------------------------------------
        self.scan_glw = pg.GraphicsLayoutWidget()
        self.scan_plot, self.scan_item, scan_box = image_plot(self.scan_glw, 0, 0, "No scan opened")
        self.scan_hist = pg.HistogramLUTItem()
        self.scan_hist.setImageItem(self.scan_item)
        self.scan_glw.addItem(self.scan_hist, row=0, col=1)
        self.scan_hist.sigLevelsChanged.connect(lambda *_a: self._sync_levels(self.scan_hist))
        self.scan_hist.sigLookupTableChanged.connect(self._sync_lut)
        self.boxes = {"scan": scan_box}

        # -- the reconstruction page ---------------------------------------------------------
        self.glw = pg.GraphicsLayoutWidget()
        self.plots: dict[str, pg.PlotItem] = {"scan": self.scan_plot}
        self.items: dict[str, pg.ImageItem] = {}
        layout_pos = {"measurement": (0, 0), "baseline": (0, 1), "reconstruction": (0, 2),
                      "reference": (1, 1), "difference": (1, 2)}
        for view in VIEWS:
            r, c = layout_pos[view]
            self.plots[view], self.items[view], self.boxes[view] = image_plot(self.glw, r, c, TITLES[view],
                                                                              aspect=view != "measurement")
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
        for hist in (self.hist, self.scan_hist):
            hist.setMinimumWidth(100)  # never squeezed out by wide measurement images
        self.glw.addItem(self.hist, row=0, col=3, rowspan=2)
        self.hist.sigLevelsChanged.connect(lambda *_a: self._sync_levels(self.hist))
        self.hist.sigLookupTableChanged.connect(self._sync_lut)
        self.items["difference"].setColorMap(pg.colormap.get("inferno"))
        for box in self.boxes.values():
            box.sliceWheel.connect(self.sliceStepped)
            box.windowDrag.connect(self._window_dragged)
        for glw in (self.scan_glw, self.glw):
            glw.scene().sigMouseMoved.connect(self._mouse_moved)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.scan_glw)
        self.stack.addWidget(self.glw)
        self.readout = QLabel("")
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.window_label = QLabel("")
        self.window_label.setToolTip(HELP_TEXT)
        bottom = QHBoxLayout()
        bottom.addWidget(self.readout, 1)
        bottom.addWidget(self.window_label)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.controls)
        lay.addLayout(second)
        lay.addWidget(self.stack, 1)
        lay.addLayout(bottom)
        self.levels = (0.0, 1.0)
        self.apply_preset(FULL)
        self._show_page()

    def clear(self) -> None:
        """Forget the snapshots (the scan being viewed stays)."""
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
        if levels == "keep":
            levels = self.levels
        elif levels is None:
            snap = self.model.current()
            img = snap.get("reconstruction") if snap else None
            if img is not None and np.isfinite(img).any():
                lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
                levels = (lo, hi if hi > lo else lo + 1e-6)
            else:
                levels = (0.0, 1.0)
        self.set_levels(levels)

    def show_custom_levels(self, levels) -> None:
        """Levels of no preset (a drag, the file's own window): the preset box says "custom"."""
        self.preset.blockSignals(True)
        self.preset.setCurrentText(CUSTOM)
        self.preset.blockSignals(False)
        self.set_levels(levels)

    def set_levels(self, levels) -> None:
        self.levels = (float(levels[0]), float(levels[1]))
        self.hist.setLevels(*self.levels)
        self._sync_levels(self.hist)

    def _sync_levels(self, source=None) -> None:
        """Give every linked view (and the other page's histogram) the levels of ``source``'s histogram."""
        if self._syncing:
            return
        self._syncing = True
        try:
            source = source if source is not None else self.hist
            lo, hi = source.getLevels()
            self.levels = (float(lo), float(hi))
            for view in LINKED_LEVELS:
                self.items[view].setLevels(self.levels)
            self.scan_item.setLevels(self.levels)
            for hist in (self.hist, self.scan_hist):
                if hist is not source:
                    hist.setLevels(*self.levels)
            self.window_label.setText(viewer_model.window_text(self.levels, self.hu_range))
            self.window_label.setToolTip(HELP_TEXT)
        finally:
            self._syncing = False
        self._draw_info()

    def set_colormap(self, name: str) -> None:
        if name == "grey":
            cmap = pg.ColorMap([0.0, 1.0], [(0, 0, 0), (255, 255, 255)])
        else:
            cmap = pg.colormap.get(name)
        self._syncing = True  # one LUT for both gradients: set the second without echo
        try:
            self.scan_hist.gradient.setColorMap(cmap)
        finally:
            self._syncing = False
        self.hist.gradient.setColorMap(cmap)
        self._sync_lut()

    def _sync_lut(self, *_args) -> None:
        if self._syncing:
            return
        lut = None if self.hist.gradient.isLookupTrivial() else self.hist.getLookupTable(n=512)
        for view in LINKED_LEVELS:
            if view != "reconstruction":
                self.items[view].setLookupTable(lut)

    # -- the mouse: window drag, readout --------------------------------------------------
    def _window_dragged(self, phase: str, dx: float, dy: float, width: float, height: float) -> None:
        if phase == DRAG_START or self._drag_start is None:
            self._drag_start = self.levels
        self.show_custom_levels(viewer_model.dragged_levels(self._drag_start, dx, dy, (width, height)))

    def _mouse_moved(self, scene_pos) -> None:
        """The pixel under the cursor (any image view of the page shown) in the readout line."""
        self.readout.setText(self.readout_at(scene_pos))

    def readout_at(self, scene_pos) -> str:
        page_views = ("scan",) if self.model.page == "scan" else VIEWS
        for view in page_views:
            box = self.boxes[view]
            if not box.sceneBoundingRect().contains(scene_pos):
                continue
            item = self.scan_item if view == "scan" else self.items[view]
            point = item.mapFromScene(scene_pos)
            title = "scan" if view == "scan" else TITLES[view]
            hu = self.hu_range if view != "measurement" else None
            return viewer_model.readout(view, title, item.image, point.x(), point.y(), hu)
        return ""

    # -- drawing ------------------------------------------------------------------------
    def _show_page(self) -> None:
        page = self.model.page
        self.stack.setCurrentIndex(PAGES.index(page))
        if self.pages.currentIndex() != PAGES.index(page):
            self.pages.blockSignals(True)
            self.pages.setCurrentIndex(PAGES.index(page))
            self.pages.blockSignals(False)

    def _draw_scan(self) -> None:
        m = self.model
        if self._scan_drawn == m.scan_version:
            return
        self._scan_drawn = m.scan_version
        scan = m.scan
        if scan is None:
            self.scan_item.clear()
            self.scan_plot.setTitle("No scan opened")
            return
        image = scan["image"]
        old = self.scan_item.image
        self.scan_item.setImage(image, autoLevels=False, levels=self.levels)
        self.scan_plot.setTitle(scan["label"])
        if old is None or old.shape != image.shape:
            fit_to_data(self.scan_plot.getViewBox())

    def refresh(self) -> None:
        m = self.model
        self._show_page()
        self._draw_scan()
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
            fit_to_data(self.plots["measurement"].getViewBox())
        self._draw_mask(snap)
        self._draw_info()
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

    def _draw_info(self) -> None:
        snap = self.model.current()
        self.info.setText("" if snap is None else self._info_text(snap))
        stale = self.model.stale_note(snap)
        self.pages.setTabText(PAGES.index("comparison"), PAGE_TITLES["comparison"] + (" (stale)" if stale else ""))
        self.pages.setTabToolTip(PAGES.index("comparison"), stale or "The latest reconstruction or training snapshot")

    def _info_text(self, snap: dict) -> str:
        # short lines: this cell's width is the width of its longest line, taken from the image views
        label = snap["label"].replace(" of ", "<br>of ").replace(" at ", "<br>at ")
        lines = [f"<b>{label}</b>", f"modality: {snap['modality']}"]
        stale = self.model.stale_note(snap)
        if stale:
            lines.insert(1, f"<span style='color:#c62828'>{stale.replace(', ', ',<br>')}:<br>press Reconstruct</span>")
        rec = snap.get("reconstruction")
        if rec is not None:
            lines.append(f"image {rec.shape[0]}\u00d7{rec.shape[1]}")
        meas = snap.get("measurement")
        if meas is not None:
            lines.append(f"measurement {meas.shape[0]}\u00d7{meas.shape[1]}")
        if snap.get("mask") is not None:
            lines.append("red shading = unsampled k-space")
        lines.append(viewer_model.window_text(self.levels, self.hu_range).replace(" ([", "<br>(["))
        return "<br>".join(lines)

    def current_image(self, view: str = "reconstruction") -> Optional[np.ndarray]:
        return self.model.current_image(view)
