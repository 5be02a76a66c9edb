"""The scan controls above the viewer: a row with the slice slider, the scan's modality and
"use as training data", and (placed by the panel in its top row) the size Reconstruct runs
at and the Reconstruct button. They only emit what the user chose;
:mod:`workbench.presenters.scan` decides, and :meth:`ScanControls.show_choices` draws what
it decided."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QSlider, QToolButton, QWidget

from workbench.state import MODALITY_NAMES, SIZE_CHOICES


def show_slice_range(control, index: int, n_slices: int) -> None:
    """Set a slice spin box / slider to ``index`` of ``n_slices`` without emitting a change (the model moved)."""
    control.blockSignals(True)
    control.setRange(0, max(0, n_slices - 1))
    control.setValue(index)
    control.setEnabled(n_slices > 1)
    control.blockSignals(False)

MODALITY_ITEMS = (("unknown", "unknown"), ("ct", "CT"), ("mri", "MRI"))


def size_label(choice: str, model_size: int, native_size) -> str:
    if choice == "model":
        return f"model ({model_size} px)"
    if choice == "native":
        return f"native ({native_size} px)" if native_size else "native (scan's own)"
    return f"{choice} px"


class ScanControls(QWidget):
    sliceChosen = Signal(int)
    modalityChosen = Signal(str)
    trainingDataToggled = Signal(bool)
    sizeChosen = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setEnabled(False)
        self.slider.setMinimumWidth(100)
        self.slider.setToolTip("Slice of the opened scan (mouse wheel over an image; Ctrl + wheel zooms)")
        self.slider.valueChanged.connect(self.sliceChosen)
        self.slice_label = QLabel("no scan")
        self.slice_label.setMinimumWidth(70)
        self.modality = QComboBox()
        for key, text in MODALITY_ITEMS:
            self.modality.addItem(text, key)
        self.modality.setToolTip("What the scan is: decides the measurements Reconstruct simulates "
                                 "(CT: a sinogram, MRI: k-space)")
        self.modality.currentIndexChanged.connect(lambda _i: self._modality_picked())
        self.modality_source = QLabel("")
        self.modality_source.setStyleSheet("color: #666;")
        self.modality_source.setFixedWidth(self.modality_source.fontMetrics().horizontalAdvance("(from your choice)") + 4)
        self.training_data = QCheckBox("Use as training data")
        self.training_data.toggled.connect(self.trainingDataToggled)
        self.size = QComboBox()
        for choice in SIZE_CHOICES:
            self.size.addItem(choice, choice)
        self.size.setToolTip("Image size Reconstruct runs at: the model's, the scan's own, or a fixed one "
                             "(the operator is built for that size; large sizes take longer)")
        # room for the longest label ("native (1024 px)") whatever the items say now
        self.size.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.size.setMinimumContentsLength(len("native (512 px)"))
        self.size.currentIndexChanged.connect(lambda _i: self.sizeChosen.emit(self.size.currentData()))
        self.reconstruct_button = QToolButton()

        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for item in (QLabel("Slice:"), self.slider, self.slice_label, QLabel("Modality:"), self.modality,
                     self.modality_source, self.training_data):
            row.addWidget(item, 1 if item is self.slider else 0)
        self.enable_for_scan(False)

    def enable_for_scan(self, has_scan: bool) -> None:
        for widget in (self.modality, self.training_data):
            widget.setEnabled(has_scan)

    def _modality_picked(self) -> None:
        key = self.modality.currentData()
        if key in ("ct", "mri"):
            self.modalityChosen.emit(key)

    def show_slice(self, index: int, n_slices: int) -> None:
        show_slice_range(self.slider, index, n_slices)
        self.slice_label.setText(f"{index} / {n_slices - 1}" if n_slices else "no scan")
        self.slice_label.setToolTip(f"slice {index} of {n_slices} (numbered from 0)")

    def show_choices(self, choices) -> None:
        """Draw a :class:`~workbench.presenters.scan.ScanChoices` without emitting anything."""
        for widget in (self.modality, self.training_data, self.size):
            widget.blockSignals(True)
        try:
            self.enable_for_scan(choices.has_scan)
            self.modality.setCurrentIndex(max(0, self.modality.findData(choices.modality)))
            name = MODALITY_NAMES.get(choices.modality, choices.modality)
            self.modality_source.setText(f"(from {choices.modality_source})" if choices.modality_source else
                                         "(choose CT or MRI)" if choices.has_scan else "")
            self.modality.setToolTip(f"The scan is {name}" + (f" (from {choices.modality_source})"
                                                              if choices.modality_source else "")
                                     + ": decides the measurements Reconstruct simulates (CT: a sinogram, MRI: k-space)")
            self.training_data.setChecked(choices.training_data)
            self.training_data.setEnabled(choices.training_data_allowed)
            self.training_data.setToolTip(choices.training_data_tip)
            for i in range(self.size.count()):
                self.size.setItemText(i, size_label(self.size.itemData(i), choices.model_size, choices.native_size))
            self.size.setCurrentIndex(max(0, self.size.findData(choices.size)))
        finally:
            for widget in (self.modality, self.training_data, self.size):
                widget.blockSignals(False)
