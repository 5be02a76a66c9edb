"""The settings dock: physics, solver, gradient mode, losses, optimiser, run.

Every edit is validated by ``ExperimentConfig.replace``; an invalid value is
refused: the field turns red, the message under it names the key, why and what
is allowed, and ``fieldRejected`` tells the window, where the field blocks Train
and Reconstruct until it is corrected (``fieldAccepted``) or the config is
replaced. The previous valid config stays the panel's, but is never used in the
refused field's place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QLabel, QLineEdit, QScrollArea, QVBoxLayout,
                               QWidget)

from engine.config import ExperimentConfig, describe_fields
from engine.errors import ConfigError
from workbench.presenters.config import format_setting as format_value, refusal_message

SECTIONS = [
    ("Physics", ["physics.modality", "physics.img_size", "physics.views", "physics.noise_sigma",
                 "physics.acceleration", "physics.center_fraction", "physics.mask"]),
    ("Solver", ["solver.name", "solver.tol", "solver.max_iter", "solver.memory",
                "backward_solver.name", "backward_solver.tol", "backward_solver.max_iter"]),
    ("Fixed point", ["deq.operator", "deq.data_fidelity", "deq.stepsize", "deq.relaxation", "deq.gradient",
                     "deq.unrolled_iterations"]),
    ("Contraction", ["jacobian.penalty", "jacobian.target", "jacobian.monitor_every", "jacobian.radius_limit",
                     "jacobian.safeguard"]),
    ("Losses", ["loss.mode", "loss.ei_weight", "loss.transform", "loss.ei_warm_start", "loss.reuse_fixed_points"]),
    ("Optimiser", ["optim.lr", "optim.steps", "optim.batch_size"]),
    ("Model", ["model.denoiser", "model.channels"]),
    ("Run", ["run.validate_every", "run.checkpoint_every", "run.device", "run.memory_format", "run.autocast",
             "run.compile"]),
]


def field_info() -> dict[str, dict]:
    """dotted key -> {default, doc, choices, type} from the config dataclasses."""
    docs = {key: (default, doc) for key, default, doc in describe_fields()}
    out = {}
    root = ExperimentConfig()
    for section in dataclasses.fields(ExperimentConfig):
        obj = getattr(root, section.name)
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            default, doc = docs.get(key, (getattr(obj, f.name), ""))
            out[key] = {"default": default, "doc": doc, "choices": f.metadata.get("choices"),
                        "type": type(getattr(obj, f.name))}
    return out


def get_value(config: ExperimentConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)




def parse_text(text: str, kind: type) -> Any:
    """Best-effort parse of a field's text; unparsable text goes through as a string so
    that ExperimentConfig.replace names the key in its error."""
    t = text.strip()
    if kind is bool:
        if t.lower() in ("true", "yes", "1", "on"):
            return True
        if t.lower() in ("false", "no", "0", "off"):
            return False
        return t
    if kind is int:
        try:
            return int(t)
        except ValueError:
            try:
                f = float(t)
                return int(f) if f.is_integer() else f
            except ValueError:
                return t
    if kind is float:
        try:
            return float(t)
        except ValueError:
            return t
    if kind is str:
        # ei_weight is float-or-'auto'
        try:
            return float(t)
        except ValueError:
            return t
    return t


class SettingsPresenter:
    """Qt-free: turns field edits into validated configs or error texts."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.info = field_info()
        self.errors: dict[str, str] = {}

    def keys(self) -> list[tuple[str, list[str]]]:
        return [(title, [k for k in keys if k in self.info]) for title, keys in SECTIONS]

    def apply(self, key: str, text: str) -> tuple[Optional[ExperimentConfig], Optional[str]]:
        kind = self.info[key]["type"]
        value = parse_text(text, kind)
        if value == get_value(self.config, key):
            self.errors.pop(key, None)
            return None, None
        try:
            new = self.config.replace(**{key: value})
        except ConfigError as exc:
            self.errors[key] = str(exc)
            return None, str(exc)
        self.errors.pop(key, None)
        self.config = new
        return new, None


class SettingsPanel(QWidget):
    configChanged = Signal(object)
    fieldRejected = Signal(str, str)  # key, message naming the key, the reason and what is allowed
    fieldAccepted = Signal(str)  # key: its text is valid (changed or not)

    def __init__(self, config: ExperimentConfig, parent=None) -> None:
        super().__init__(parent)
        self.presenter = SettingsPresenter(config)
        self.fields: dict[str, QWidget] = {}
        self.error_labels: dict[str, QLabel] = {}
        inner = QWidget()
        vl = QVBoxLayout(inner)
        vl.setContentsMargins(4, 4, 4, 4)
        for title, keys in self.presenter.keys():
            if not keys:
                continue
            box = QGroupBox(title)
            form = QFormLayout(box)
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
            for key in keys:
                info = self.presenter.info[key]
                choices = info["choices"]
                if info["type"] is bool:
                    choices = (True, False)
                if choices:
                    w = QComboBox()
                    for c in choices:
                        w.addItem(format_value(c))
                    w.currentTextChanged.connect(lambda text, k=key: self._edited(k, text))
                else:
                    w = QLineEdit()
                    w.editingFinished.connect(lambda k=key, w=w: self._edited(k, w.text()))
                w.setToolTip(f"{key}: {info['doc']}")
                w.setObjectName(key)
                err = QLabel("")
                err.setWordWrap(True)
                err.setStyleSheet("color: #c62828; font-size: 9pt;")
                err.setVisible(False)
                holder = QWidget()
                hl = QVBoxLayout(holder)
                hl.setContentsMargins(0, 0, 0, 0)
                hl.setSpacing(1)
                hl.addWidget(w)
                hl.addWidget(err)
                form.addRow(key.split(".", 1)[1].replace("_", " ") + ("" if not key.startswith("backward") else " (bwd)"),
                            holder)
                self.fields[key] = w
                self.error_labels[key] = err
            vl.addWidget(box)
        note = QLabel("Changes apply to the next Train / Reconstruct. With a trained model (a checkpoint, or "
                      "after Train) Reconstruct uses the solver and step settings given here; its physics, "
                      "network and fixed-point form stay the model's own until the next Train.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #666;")
        vl.addWidget(note)
        vl.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(inner)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.scroll)
        self.set_config(config)

    @property
    def config(self) -> ExperimentConfig:
        return self.presenter.config

    def set_config(self, config: ExperimentConfig) -> None:
        self.presenter.config = config
        self.presenter.errors.clear()
        for key, w in self.fields.items():
            text = format_value(get_value(config, key))
            w.blockSignals(True)
            if isinstance(w, QComboBox):
                if w.findText(text) < 0:
                    w.addItem(text)
                w.setCurrentText(text)
            else:
                w.setText(text)
                w.setStyleSheet("")
            w.blockSignals(False)
            self.error_labels[key].setVisible(False)

    def set_text(self, key: str, text: str) -> None:
        """Programmatic edit, as if typed and confirmed (for tests and scripting)."""
        w = self.fields[key]
        if isinstance(w, QComboBox):
            w.setCurrentText(text)
        else:
            w.setText(text)
            self._edited(key, text)

    def show_field(self, key: str) -> None:
        """Scroll to a field and put the cursor in it (a refused field the user has to correct)."""
        w = self.fields[key]
        self.scroll.ensureWidgetVisible(self.error_labels[key])
        self.scroll.ensureWidgetVisible(w)
        w.setFocus()
        if isinstance(w, QLineEdit):
            w.selectAll()

    def _edited(self, key: str, text: str) -> None:
        new, error = self.presenter.apply(key, text)
        label, w = self.error_labels[key], self.fields[key]
        if error:
            message = refusal_message(key, text, error)
            label.setText(message)
            label.setVisible(True)
            if isinstance(w, QLineEdit):
                w.setStyleSheet("border: 2px solid #c62828; background: #fdecea;")
            self.fieldRejected.emit(key, message)
            return
        label.setVisible(False)
        if isinstance(w, QLineEdit):
            w.setStyleSheet("")
        if new is not None:
            self.configChanged.emit(new)
        self.fieldAccepted.emit(key)
