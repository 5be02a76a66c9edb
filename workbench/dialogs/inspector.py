"""The Solver Inspector window, and what installs it into the main window.

:class:`SolverInspectorWindow` draws :class:`~workbench.panels.inspector_model.InspectorModel`
(the presenter, :mod:`workbench.presenters.inspector`, decides what is in it): the
iterate and its residual map ``|x_k - x_(k-1)|`` at the frame the slider picks, the
residual trace on a log axis with a line at that frame's iteration (replays overlaid,
with a legend), the spectral-radius readout, the diagnoses each with its remedy
button, and the replay controls.

:class:`SolverInspectorFeature` builds the presenters, the actions ("Solver
Inspector…", "Pause on divergence", "Divergence demonstration"), and connects the
residual panel (problem rows, alarm banner) and the event router's alarm to them;
the window itself is created the first time it opens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QDoubleValidator
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QProgressBar, QPushButton, QScrollArea, QSlider, QSpinBox, QSplitter,
                               QVBoxLayout, QWidget)

from workbench.panels.inspector_model import (REPLAY_SOLVERS, InspectorModel, ReplaySettings, evidence_text,
                                             outcome)
from workbench.panels.plotting import LogAxis, control_row, pg
from workbench.presenters.divergence import DivergencePresenter
from workbench.presenters.inspector import InspectorPresenter
from workbench.window_actions import make_action

_RECORDED = {"failed": (214, 39, 40), "ok": (31, 119, 180)}
_REPLAY_COLOURS = [(44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75), (227, 119, 194)]


def _image_plot(glw, title: str, col: int):
    plot = glw.addPlot(row=0, col=col, title=title)
    plot.hideAxis("left")
    plot.hideAxis("bottom")
    plot.invertY(True)
    plot.setAspectLocked(True)
    plot.setMenuEnabled(False)
    item = pg.ImageItem()
    plot.addItem(item)
    return plot, item


class SolverInspectorWindow(QWidget):
    """A top-level window drawing the inspector model; every control calls the presenter."""

    def __init__(self, presenter: InspectorPresenter, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.presenter = presenter
        self.model: InspectorModel = presenter.model
        self.setWindowTitle("Solver Inspector")
        self.setObjectName("solver_inspector")
        self.setAttribute(Qt.WidgetAttribute.WA_QuitOnClose, False)  # never keeps the app alive alone
        self.resize(1400, 900)
        self._drawn = -1
        self._diagnoses_drawn: Optional[tuple] = None
        self._replay_defaults_for = None
        self.remedy_buttons: list[QPushButton] = []

        # -- choosers ------------------------------------------------------------------------
        self.step_box = QComboBox()
        self.step_box.setToolTip("Training steps whose solves are kept (inspect.keep_steps), and recorded "
                                 "reconstructions")
        self.step_box.activated.connect(presenter.choose_source)
        self.solve_box = QComboBox()
        self.solve_box.setToolTip("The solves of that step in call order (forward and adjoint/backward)")
        self.solve_box.activated.connect(presenter.choose_solve)
        self.sample_box = QComboBox()
        self.sample_box.setToolTip("Samples of the batch; the worst is shown first")
        self.sample_box.activated.connect(presenter.choose_sample)
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumWidth(120)
        self.busy.setTextVisible(False)
        self.busy_label = QLabel("working…")
        for box, width in ((self.step_box, 160), (self.solve_box, 330), (self.sample_box, 260)):
            box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
            box.setMinimumWidth(width)
        top = control_row("Step:", self.step_box, "Solve:", self.solve_box, "Sample:", self.sample_box,
                          self.busy_label, self.busy)
        self.title = QLabel("")
        self.title.setStyleSheet("font-weight: bold; font-size: 13px;")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # -- images and the trace --------------------------------------------------------------
        self.glw = pg.GraphicsLayoutWidget()
        self.iterate_plot, self.iterate_item = _image_plot(self.glw, "iterate x_k", 0)
        self.map_plot, self.map_item = _image_plot(self.glw, "residual map |x_k - x_(k-1)|", 1)
        self.map_item.setColorMap(pg.colormap.get("inferno"))
        tp = self.glw.addPlot(row=0, col=2, title="Residual trace", axisItems={"left": LogAxis("left")})
        tp.setLogMode(y=True)
        tp.showGrid(x=True, y=True, alpha=0.3)
        tp.setLabel("bottom", "iteration")
        tp.getAxis("left").enableAutoSIPrefix(False)
        tp.addLegend(offset=(-10, -10), brush=(255, 255, 255, 170))  # bottom right: a diverging trace runs on top
        self.trace_plot = tp
        self.trace_curve = tp.plot([], [], pen=pg.mkPen(_RECORDED["failed"], width=2.5), name="recorded",
                                   connect="finite")
        self.replay_curves: list = []
        self.frame_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((60, 60, 60), width=1.5),
                                          label="k", labelOpts={"position": 0.97, "color": (60, 60, 60)})
        tp.addItem(self.frame_line, ignoreBounds=True)
        self.tol_line = pg.InfiniteLine(angle=0, movable=False,
                                        pen=pg.mkPen((40, 160, 40), width=1.5, style=Qt.PenStyle.DashLine),
                                        label="tol", labelOpts={"position": 0.05, "color": (40, 130, 40)})
        tp.addItem(self.tol_line, ignoreBounds=True)
        self.fallback_line = pg.InfiniteLine(angle=90, movable=False,
                                             pen=pg.mkPen((120, 120, 120), width=1, style=Qt.PenStyle.DotLine),
                                             label="fallback", labelOpts={"position": 0.8})
        tp.addItem(self.fallback_line, ignoreBounds=True)
        self.glw.ci.layout.setColumnStretchFactor(0, 2)
        self.glw.ci.layout.setColumnStretchFactor(1, 2)
        self.glw.ci.layout.setColumnStretchFactor(2, 3)

        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setToolTip("Scrub the stored iterates (every k-th iteration is kept, first to last)")
        self.slider.valueChanged.connect(presenter.set_frame)
        self.frame_label = QLabel("")
        self.frame_label.setMinimumWidth(260)
        scrub = QHBoxLayout()
        scrub.addWidget(QLabel("Frame:"))
        scrub.addWidget(self.slider, 1)
        scrub.addWidget(self.frame_label)

        # -- readout and diagnoses -------------------------------------------------------------
        self.readout = QLabel("")
        self.readout.setStyleSheet("font-weight: bold;")
        self.readout.setToolTip("Arnoldi estimate of the spectral radius of the fixed-point map's Jacobian where "
                                "the solve ended (above 1: errors grow each iteration), and an empirical Lipschitz "
                                "estimate of the denoiser at the point it sees")
        self.diagnoses_box = QWidget()
        self.diagnoses_layout = QVBoxLayout(self.diagnoses_box)
        self.diagnoses_layout.setContentsMargins(2, 2, 2, 2)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.diagnoses_box)
        diagnoses = QGroupBox("Diagnosis")
        dl = QVBoxLayout(diagnoses)
        dl.addWidget(self.readout)
        dl.addWidget(scroll, 1)

        # -- replays ----------------------------------------------------------------------------
        self.solver_box = QComboBox()
        self.solver_box.addItems(list(REPLAY_SOLVERS))
        self.memory_box = QSpinBox()
        self.memory_box.setRange(1, 100)
        self.damping_box = QDoubleSpinBox()
        self.damping_box.setRange(0.05, 1.0)
        self.damping_box.setSingleStep(0.05)
        self.damping_box.setDecimals(2)
        self.tol_edit = QLineEdit()
        self.tol_edit.setValidator(QDoubleValidator(0.0, 1.0, 12))
        self.max_iter_box = QSpinBox()
        self.max_iter_box.setRange(1, 100000)
        self.replay_button = QPushButton("Replay")
        self.replay_button.setToolTip("Solve the same problem again (same map, same start) with these settings; "
                                      "its trace joins the plot")
        self.replay_button.clicked.connect(self._replay)
        self.clear_button = QPushButton("Clear replays")
        self.clear_button.clicked.connect(presenter.clear_replays)
        self.reset_button = QPushButton("As recorded")
        self.reset_button.setToolTip("Fill in the settings the open solve ran with")
        self.reset_button.clicked.connect(self._fill_replay_defaults)
        replays = QGroupBox("Replay with other settings")
        replays.setMaximumWidth(420)
        form = QFormLayout(replays)
        form.addRow("Solver", self.solver_box)
        form.addRow("Memory", self.memory_box)
        form.addRow("Damping", self.damping_box)
        form.addRow("Tolerance", self.tol_edit)
        form.addRow("Max iterations", self.max_iter_box)
        buttons = QHBoxLayout()
        for b in (self.replay_button, self.clear_button, self.reset_button):
            buttons.addWidget(b)
        form.addRow(buttons)

        bottom = QSplitter(Qt.Orientation.Horizontal)
        bottom.addWidget(diagnoses)
        bottom.addWidget(replays)
        bottom.setStretchFactor(0, 3)
        bottom.setStretchFactor(1, 1)
        upper = QWidget()
        ul = QVBoxLayout(upper)
        ul.setContentsMargins(0, 0, 0, 0)
        ul.addWidget(self.glw, 1)
        ul.addLayout(scrub)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(upper)
        split.addWidget(bottom)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setSizes([500, 350])

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.title)
        lay.addWidget(self.summary)
        lay.addWidget(split, 1)
        presenter.on_changed.append(self.refresh)
        self.refresh()

    # -- controls ----------------------------------------------------------------------------------
    def replay_settings(self) -> ReplaySettings:
        try:
            tol = float(self.tol_edit.text().replace(",", "."))
        except ValueError:
            tol = self.presenter.replay_defaults().tol
        return ReplaySettings(name=self.solver_box.currentText(), memory=self.memory_box.value(),
                              damping=self.damping_box.value(), tol=tol, max_iter=self.max_iter_box.value())

    def set_replay_settings(self, settings: ReplaySettings) -> None:
        self.solver_box.setCurrentText(settings.name)
        self.memory_box.setValue(settings.memory)
        self.damping_box.setValue(settings.damping)
        self.tol_edit.setText(f"{settings.tol:g}")
        self.max_iter_box.setValue(settings.max_iter)

    def _replay(self) -> None:
        self.presenter.replay(self.replay_settings())

    def _fill_replay_defaults(self) -> None:
        self.set_replay_settings(self.presenter.replay_defaults())

    # -- drawing -------------------------------------------------------------------------------------
    def refresh(self) -> None:
        m = self.model
        if self._drawn == m.version:
            return
        self._drawn = m.version
        rec = m.recording
        self.busy.setVisible(m.working > 0)
        self.busy_label.setVisible(m.working > 0)
        self._fill_choosers()
        self.title.setText(m.title())
        self.summary.setText(m.summary() or m.note)
        if self._replay_defaults_for is not rec:  # a new solve: start from the settings it ran with
            self._replay_defaults_for = rec
            if rec is not None:
                self._fill_replay_defaults()
        for w in (self.slider, self.replay_button, self.clear_button, self.reset_button):
            w.setEnabled(rec is not None)
        self._draw_images()
        self._draw_traces()
        self.readout.setText(m.readout())
        bad = m.spectral_radius is not None and m.spectral_radius >= 1
        self.readout.setStyleSheet(f"font-weight: bold; color: {'#c62828' if bad else '#222'};")
        self._draw_diagnoses()

    def _fill_choosers(self) -> None:
        m, p = self.model, self.presenter
        for box, items, current in ((self.step_box, p.sources(), p.current_source_index()),
                                    (self.solve_box, m.solve_labels(), m.index if m.source else -1),
                                    (self.sample_box, m.sample_labels(), m.sample if m.recording else -1)):
            box.blockSignals(True)
            if [box.itemText(i) for i in range(box.count())] != items:
                box.clear()
                box.addItems(items)
            box.setCurrentIndex(current)
            box.blockSignals(False)
        rec = m.recording
        frames = len(rec.frames) if rec is not None else 0
        self.slider.blockSignals(True)
        self.slider.setRange(0, max(0, frames - 1))
        self.slider.setValue(m.frame)
        self.slider.blockSignals(False)
        self.frame_label.setText(m.frame_text() if rec is not None else "")

    def _draw_images(self) -> None:
        m = self.model
        image, change = m.iterate_image(), m.residual_map()
        if image is None:
            self.iterate_item.clear()
            self.map_item.clear()
            self.iterate_plot.setTitle("iterate x_k")
            self.map_plot.setTitle("residual map |x_k - x_(k-1)|")
            return
        finite = np.isfinite(image)
        low, high = (float(image[finite].min()), float(image[finite].max())) if finite.any() else (0.0, 1.0)
        shown = np.where(finite, image, high)  # NaN / Inf drawn at the top of the scale
        self.iterate_item.setImage(shown, autoLevels=False, levels=(low, high if high > low else low + 1.0))
        bad = int((~finite).sum())
        self.iterate_plot.setTitle(f"iterate x_{m.iteration}: [{low:.3g}, {high:.3g}]"
                                   + (f", {bad} non-finite" if bad else ""))
        change = np.where(np.isfinite(change), change, 0.0)
        top = float(change.max()) if change.size else 0.0
        self.map_item.setImage(change, autoLevels=False, levels=(0.0, top if top > 0 else 1.0))
        self.map_plot.setTitle(f"|x_{m.iteration} - x_{max(0, m.iteration - 1)}|: max {top:.3g}")

    def _draw_traces(self) -> None:
        m = self.model
        rec = m.recording
        trace = m.trace()
        y = np.where(trace > 0, trace, np.nan)
        x = np.arange(1, len(y) + 1, dtype=np.float64)
        failed = m.stop_reason() != "converged"
        self.trace_curve.setData(x, y, connect="finite")
        self.trace_curve.setPen(pg.mkPen(_RECORDED["failed" if failed else "ok"], width=2.5))
        legend = self.trace_plot.legend
        legend.clear()
        recorded = ReplaySettings.of(rec.options) if rec is not None else ReplaySettings()
        if rec is not None:
            legend.addItem(self.trace_curve, f"recorded: {recorded.label()} ({outcome(rec, m.sample)})")
        while len(self.replay_curves) < len(m.replays):
            colour = _REPLAY_COLOURS[len(self.replay_curves) % len(_REPLAY_COLOURS)]
            self.replay_curves.append(self.trace_plot.plot([], [], pen=pg.mkPen(colour, width=2,
                                                                                style=Qt.PenStyle.DashLine)))
        for i, curve in enumerate(self.replay_curves):
            if i < len(m.replays):
                replay = m.replays[i]
                t = m.replay_trace(replay)
                curve.setData(np.arange(1, len(t) + 1, dtype=np.float64), np.where(t > 0, t, np.nan),
                              connect="finite")
                curve.setVisible(True)
                legend.addItem(curve, replay.short_label(m.sample, recorded))
            else:
                curve.setData([], [])
                curve.setVisible(False)
        self.frame_line.setVisible(rec is not None and m.iteration > 0)
        self.frame_line.setPos(m.iteration)
        self.frame_line.label.setFormat(f"k = {m.iteration}")
        tol = m.tolerance()
        self.tol_line.setVisible(rec is not None and np.isfinite(tol) and tol > 0)
        if np.isfinite(tol) and tol > 0:
            self.tol_line.setPos(np.log10(tol))
        self.fallback_line.setVisible(rec is not None and rec.fallback_from is not None)
        if rec is not None and rec.fallback_from is not None:
            self.fallback_line.setPos(rec.fallback_from)
        mode = "relative" if m.stop_mode() == "rel" else "absolute"
        self.trace_plot.setTitle(f"{mode} residual, sample {m.sample}" if rec is not None else "Residual trace")
        self.trace_plot.setLabel("left", f"{mode} residual")

    def _draw_diagnoses(self) -> None:
        m = self.model
        key = (id(m.recording), m.sample, m.measured, tuple(d.kind for d in m.diagnoses), id(m.diagnoses))
        if key == self._diagnoses_drawn:
            return
        self._diagnoses_drawn = key
        while self.diagnoses_layout.count():
            item = self.diagnoses_layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.remedy_buttons = []
        if m.recording is None:
            self.diagnoses_layout.addWidget(QLabel(m.note or "Nothing open."))
        elif not m.diagnoses:
            text = ("diagnosing…" if m.working else
                    "No problem found: this sample converged cleanly." if m.stop_reason() == "converged" else
                    "No specific cause recognised.")
            self.diagnoses_layout.addWidget(QLabel(text))
        for i, diagnosis in enumerate(m.diagnoses):
            self.diagnoses_layout.addWidget(self._diagnosis_card(i, diagnosis))
        self.diagnoses_layout.addStretch(1)

    def _diagnosis_card(self, index: int, diagnosis) -> QFrame:
        card = QFrame()
        card.setFrameShape(QFrame.Shape.StyledPanel)
        lay = QVBoxLayout(card)
        lay.setContentsMargins(6, 4, 6, 4)
        head = QHBoxLayout()
        kind = QLabel(f"<b>{diagnosis.kind.replace('_', ' ')}</b> <span style='color:#777'>({diagnosis.kind})</span>")
        head.addWidget(kind, 1)
        button = QPushButton(f"Apply: {diagnosis.remedy.label}")
        button.setToolTip(f"{diagnosis.remedy.description}\nchanges: "
                          + ", ".join(f"{k} = {v!r}" for k, v in diagnosis.remedy.changes.items()))
        button.setEnabled(bool(diagnosis.remedy.changes))
        button.clicked.connect(lambda _checked=False, i=index: self.presenter.apply_remedy(i))
        head.addWidget(button)
        lay.addLayout(head)
        text = QLabel(diagnosis.explanation)
        text.setWordWrap(True)
        text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(text)
        remedy = QLabel(f"Remedy: {diagnosis.remedy.description}")
        remedy.setWordWrap(True)
        lay.addWidget(remedy)
        if diagnosis.evidence:
            evidence = QLabel(f"Evidence: {evidence_text(diagnosis.evidence)}")
            evidence.setWordWrap(True)
            evidence.setStyleSheet("color: #666;")
            lay.addWidget(evidence)
        self.remedy_buttons.append(button)
        return card


class SolverInspectorFeature:
    """The inspector's presenters, actions and connections in the main window; the presenters' view."""

    def __init__(self, window, run_menu) -> None:
        self.window = window
        self.presenter = InspectorPresenter(self, window.state, window.tasks, window.training, window.config_editor,
                                            window.residuals.model)
        self.divergence = DivergencePresenter(self, window.settings, window.state, window.tasks, window.run,
                                              window.config_editor, self.presenter)
        self.dialog: Optional[SolverInspectorWindow] = None

        self.act_inspector = make_action(self.window, "Solver &Inspector…", lambda: self.presenter.open(), "Ctrl+I",
                                          "Open the recorded solves of the latest step: iterates, residual maps, "
                                          "spectral radius, diagnosis, replays")
        self.act_pause_on_divergence = make_action(self.window, "Pause on Divergence", None, None,
                                                    "Pause training when a step fails on a solve (diverged, "
                                                    "non-finite) and open it in the Solver Inspector")
        self.act_pause_on_divergence.setCheckable(True)
        self.act_pause_on_divergence.toggled.connect(self.divergence.set_pause_on_divergence)
        self.act_demonstration = make_action(self.window, "&Divergence Demonstration",
                                             self.divergence.demonstrate, None,
                                              "Make the fixed point diverge on purpose (data step 5, no Jacobian "
                                              "penalty, plain iteration) and train, to see what divergence "
                                              "looks like and how the inspector explains it")
        run_menu.addSeparator()
        run_menu.addActions([self.act_inspector, self.act_pause_on_divergence])
        window.help_menu.addAction(self.act_demonstration)
        window.toolbar.addSeparator()
        window.toolbar.addAction(self.act_inspector)

        window.residuals.problemActivated.connect(self.presenter.open_record)
        window.residuals.inspectAlarm.connect(self.divergence.inspect_alarm)
        window.router.alarm_listeners.append(self.divergence.alarm)
        self.divergence.restore()

    def close(self) -> None:
        if self.dialog is not None:
            self.dialog.close()

    # -- the presenters' view ------------------------------------------------------------------------
    def show_inspector(self) -> None:
        if self.dialog is None:
            self.dialog = SolverInspectorWindow(self.presenter, self.window)
        self.dialog.show()
        self.dialog.raise_()
        self.dialog.activateWindow()

    def show_pause_on_divergence(self, on: bool) -> None:
        self.act_pause_on_divergence.blockSignals(True)
        self.act_pause_on_divergence.setChecked(on)
        self.act_pause_on_divergence.blockSignals(False)

    def log_message(self, level: str, message: str) -> None:
        self.window.log_message(level, message)

    def set_status(self, text: str) -> None:
        self.window.set_status(text)

    def report_error(self, title: str, message, log: bool = True) -> None:
        self.window.report_error(title, message, log)
