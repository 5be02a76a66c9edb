"""The info panel: scan summary, key DICOM tags, slice selector, model and run, and the settings
the latest reconstruction used (solver, tolerance, cap, memory, damping, step, relaxation, the
model's source, what the settings dock overrode or could not apply, how the solve ended)."""

from __future__ import annotations

import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QHBoxLayout, QHeaderView, QLabel, QSpinBox, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from workbench.panels.scan_controls import show_slice_range


def scan_rows(scan, path: str | None = None) -> list[tuple[str, str]]:
    """(key, value) rows for a scan: summary fields first, then its metadata tags."""
    if scan is None:
        return [("Scan", "built-in phantoms (no scan opened)")]
    rows = []
    try:
        rows.append(("Summary", scan.summary()))
    except Exception:
        pass
    rows.append(("File", str(path or getattr(scan, "source", ""))))
    rows.append(("Kind", str(getattr(scan, "kind", ""))))
    rows.append(("Modality", str(getattr(scan, "modality", ""))))
    rows.append(("Units", str(getattr(scan, "units", ""))))
    spacing = getattr(scan, "spacing", None)
    if spacing:
        rows.append(("Pixel spacing (mm)", " × ".join(f"{s:g}" for s in spacing)))
    for k, v in dict(getattr(scan, "metadata", {}) or {}).items():
        rows.append((str(k), str(v)))
    return rows


class InfoPanel(QWidget):
    sliceChanged = Signal(int)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.slice_box = QSpinBox()
        self.slice_box.setRange(0, 0)
        self.slice_box.setEnabled(False)
        self.slice_box.setToolTip("Slice of the opened scan shown in the viewer (Reconstruct and Equivariance use it)")
        self.slice_box.valueChanged.connect(self.sliceChanged)
        self.slice_count = QLabel("")
        self.model_label = QLabel("Model: untrained (from config)")
        self.model_label.setWordWrap(True)
        self.run_label = QLabel("Run: —")
        self.run_label.setWordWrap(True)
        self.reconstruction_label = QLabel("Reconstruction: —")
        self.reconstruction_label.setWordWrap(True)
        self.reconstruction_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.reconstruction_label.setToolTip("The settings the latest Reconstruct used")
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Tag", "Value"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        row = QHBoxLayout()
        row.addWidget(QLabel("Slice:"))
        row.addWidget(self.slice_box)
        row.addWidget(self.slice_count, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.model_label)
        lay.addWidget(self.run_label)
        lay.addWidget(self.reconstruction_label)
        lay.addLayout(row)
        lay.addWidget(self.table, 1)
        self.set_scan(None)

    def set_scan(self, scan, path: str | None = None, n_slices: int = 0, index: int = 0) -> None:
        rows = scan_rows(scan, path)
        self.table.setRowCount(len(rows))
        for i, (k, v) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(k))
            self.table.setItem(i, 1, QTableWidgetItem(v))
        show_slice_range(self.slice_box, index, n_slices)
        self.slice_count.setText(f"of {n_slices}" if n_slices else "")

    def show_slice(self, index: int, n_slices: int) -> None:
        """The viewer moved to ``index`` (without emitting sliceChanged)."""
        self.slice_box.blockSignals(True)
        self.slice_box.setRange(0, max(0, n_slices - 1))
        self.slice_box.setValue(index)
        self.slice_box.blockSignals(False)

    def set_row(self, key: str, value: str) -> None:
        """Replace the value of the first row named ``key`` (the scan's modality once decided)."""
        for i in range(self.table.rowCount()):
            if self.table.item(i, 0).text() == key:
                self.table.setItem(i, 1, QTableWidgetItem(value))
                return

    def rows(self) -> dict:
        return {self.table.item(i, 0).text(): self.table.item(i, 1).text() for i in range(self.table.rowCount())}

    def set_model(self, text: str) -> None:
        self.model_label.setText(f"Model: {text}")

    def set_run(self, run_dir: str | None, extra: str = "") -> None:
        name = os.path.basename(run_dir.rstrip("/")) if run_dir else "—"
        self.run_label.setText(f"Run: {name} {extra}".strip())
        self.run_label.setToolTip(run_dir or "")

    def set_reconstruction(self, text: str) -> None:
        """The settings the latest reconstruction used (lines of text)."""
        self.reconstruction_label.setText(f"Reconstruction: {text}")
