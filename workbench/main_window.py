"""The main window: assembly of docks, menus, the status bar and the presenters.

What the GUI *does* lives in the Qt-free presenters (:mod:`workbench.presenters`);
this window builds the widgets, connects them to the presenters, and is the
presenters' view: its small ``show_*`` / ``set_*`` / ``ask_*`` methods
(:class:`~workbench.window_view.PresenterView`) draw or ask and do nothing else.
Its actions and menus are built by :mod:`workbench.window_actions`.

The window appears before the engine is loaded: torch and deepinv are imported in
the task thread after its first paint (:meth:`MainWindow.load_engine`), with a
status message; ``startup_times`` records when (``workbench.startup`` measures it).

Nothing slow happens on the GUI thread: training runs in the training QThread
(:class:`~workbench.worker.TrainingController`), file loading, checkpoint I/O,
reconstruction and equivariance run on the task pool
(:class:`~workbench.worker.TaskRunner`). Results come back as callbacks in the
GUI thread and only then touch :class:`~workbench.state.WorkbenchState`, so a
failed operation leaves the previous state intact.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from PySide6.QtCore import QByteArray, QEvent, QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import QDockWidget, QLabel, QMainWindow, QProgressBar, QWidget

from engine.config import ExperimentConfig
from workbench import backend
from workbench.dialogs.errors import ErrorDialogs, ask_yes_no
from workbench.dialogs.help import HelpDialogs
from workbench.dialogs.inspector import SolverInspectorFeature
from workbench.dialogs.settings import SettingsPanel
from workbench.jobs import Job
from workbench.panels.equivariance import EquivariancePanel
from workbench.panels.info import InfoPanel
from workbench.panels.jobs import JobIndicator
from workbench.panels.log import LogPanel
from workbench.panels.losses import LossesPanel
from workbench.panels.notices import NoticeBar
from workbench.panels.reconstructions import ReconstructionsPanel
from workbench.panels.residuals import ResidualsPanel
from workbench.presenters.analysis import AnalysisPresenter
from workbench.presenters.config import ConfigPresenter
from workbench.presenters.events import EventRouter, PanelModels
from workbench.presenters.files import FilesPresenter
from workbench.presenters.run import RunPhase, RunPresenter
from workbench.presenters.run_record import RunRecordPresenter
from workbench.presenters.scan import ScanPresenter
from workbench.presenters.settings import SettingsPresenter, WindowLayout
from workbench.state import WorkbenchState, default_config, training_data_text
from workbench.window_actions import build_actions
from workbench.window_view import PresenterView
from workbench.worker import EventRelay, GuiThreadGarbageCollection, TaskRunner, TrainingController

ORG, APP = "EquiDEQ", "Workbench"
PLOT_INTERVAL_MS = 33
IMAGE_INTERVAL_MS = 250
WELCOME = ("<b>What you are looking at:</b> the <b>Reconstructions</b> panel shows an opened scan (Scan) and, "
           "after Train or Reconstruct, the measurement, the baseline A\u2020y, the DEQ's output and the ground "
           "truth;<br><b>Solver residuals</b> how each fixed-point solve converged; <b>Loss curves</b> and "
           "<b>Equivariance</b> training and rotation checks. Press <b>Train</b> (F5), or <b>Open Scan</b> "
           "(Ctrl+O) and <b>Reconstruct</b> (F6).<br>On an image: wheel = slices, Ctrl+wheel = zoom, "
           "right-drag = window/level. Help > Quick Guide explains DEQ, EI and the residual plot.")


def make_settings() -> QSettings:
    """The persistent settings store (INI in the user's config dir; tests redirect it)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORG, APP)


class MainWindow(PresenterView, QMainWindow):
    busyChanged = Signal(bool)
    engineReady = Signal()

    def __init__(self, config: Optional[ExperimentConfig] = None, settings: Optional[QSettings] = None,
                 trainer_factory: Optional[Callable] = None, error_dialog: Optional[Callable] = None,
                 confirm: Optional[Callable] = None, run_root: Optional[str] = None,
                 restore: bool = True) -> None:
        super().__init__()
        self.settings = settings if settings is not None else make_settings()
        self.state = WorkbenchState(config=config if config is not None else default_config())
        self.error_dialog = error_dialog if error_dialog is not None else ErrorDialogs(self)
        self.confirm = confirm if confirm is not None else (lambda title, q: ask_yes_no(self, title, q))
        self.errors: list[tuple[str, str]] = []  # every (title, message) reported, newest last
        self.startup_times: dict[str, float] = {}  # "window painted" / "engine ready" -> time.time()

        self.setWindowTitle(self.state.title())
        self.setAcceptDrops(True)
        self.setDockNestingEnabled(True)
        self.setDockOptions(QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowTabbedDocks
                            | QMainWindow.DockOption.AllowNestedDocks)

        # -- engine bridge (garbage is collected in this thread only, from before the others start)
        self.garbage_collection = GuiThreadGarbageCollection(self)
        self.garbage_collection.start()
        self.relay = EventRelay(self)
        self.training = TrainingController(self.relay, trainer_factory or backend.make_trainer, self)
        self.tasks = TaskRunner(self)
        self.tasks.busyChanged.connect(self._tasks_busy)

        # -- panels -------------------------------------------------------------------------
        self.residuals = ResidualsPanel()
        self.losses = LossesPanel()
        self.reconstructions = ReconstructionsPanel()
        self.equivariance = EquivariancePanel()
        self.log = LogPanel()
        self.info = InfoPanel()
        self.settings_panel = SettingsPanel(self.state.config)

        # -- presenters ---------------------------------------------------------------------
        self.run = RunPresenter(self, self.training, self.state, run_root)
        self.on_run_ended = self.run.on_run_ended  # callbacks(result) for scripts: the presenter's list
        panel_models = PanelModels(self.residuals.model, self.losses.model, self.reconstructions.model)
        self.router = EventRouter(self, self.state, self.run, panel_models)
        self.config_editor = ConfigPresenter(self, self.state)
        self.persistence = SettingsPresenter(self.settings, self.state)
        self.analysis = AnalysisPresenter(self, self.state, self.tasks, self.run, panel_models)
        self.scans = ScanPresenter(self, self.state, self.config_editor, self.run, panel_models,
                                   self.analysis.reconstruct, self.analysis.equivariance_note)
        self.files = FilesPresenter(self, self.state, self.tasks, self.persistence, self.config_editor, self.run,
                                    self.analysis.reconstruct, panel_models.reconstructions, self.scans)
        # File > Open Run / Follow Run; following stops when training starts or another file is opened
        self.run_record = RunRecordPresenter(self, self.state, self.tasks, self.run, panel_models, self.persistence,
                                             self.files.remember)
        self.files.runs = self.run_record
        self.files.opening_listeners.append(lambda: self.run_record.stop_following("another file opened"))
        self.training.runStarted.connect(lambda: self.run_record.stop_following("training started"))
        self.relay.eventsReady.connect(self.router.route_batch)
        self.training.runEnded.connect(self.run.run_ended)
        self.settings_panel.configChanged.connect(self.config_editor.edited)
        self.settings_panel.configChanged.connect(self.scans.config_changed)
        self.settings_panel.fieldRejected.connect(self.config_editor.field_rejected)
        self.settings_panel.fieldAccepted.connect(self.config_editor.field_accepted)
        self.equivariance.angleRequested.connect(self.analysis.equivariance)
        self.equivariance.curveRequested.connect(self.analysis.equivariance_curve)
        self.info.sliceChanged.connect(self.scans.choose_slice)
        self.reconstructions.sliceStepped.connect(self.scans.step_slice)
        controls = self.reconstructions.controls
        controls.sliceChosen.connect(self.scans.choose_slice)
        controls.modalityChosen.connect(self.scans.choose_modality)
        controls.trainingDataToggled.connect(self.scans.use_as_training_data)
        controls.sizeChosen.connect(self.scans.choose_size)
        self.reconstructions.metrics_provider = self.analysis.metrics

        self._build_docks()
        self._build_status()
        build_actions(self)
        self.inspector = SolverInspectorFeature(self, self.run_menu)  # its window, actions, alarm
        self.help = HelpDialogs(self)
        self.notices = NoticeBar(self)
        self.addToolBarBreak()
        self.addToolBar(self.notices)
        self.plot_timer = self._timer(PLOT_INTERVAL_MS, self.refresh_plots)
        self.image_timer = self._timer(IMAGE_INTERVAL_MS, self.refresh_images)

        if restore:
            self.restore_settings(restore_config=config is None)
        self.show_recent(self.state.recent)
        self.run.show_actions()
        self.log.add("info", f"Ready. Training data: {training_data_text(self.state.config)}; config "
                             f"'{self.state.config.run.name}'. Press Train (F5) to watch a DEQ learn, or open a "
                             "scan (Ctrl+O) to browse it and press Reconstruct (F6).")
        self._announce_restored()
        if not self.persistence.welcome_dismissed():
            self.show_welcome()
        self.installEventFilter(self)  # the first paint starts loading the engine

    # =================================================================================
    # construction
    def _timer(self, interval_ms: int, slot) -> QTimer:
        timer = QTimer(self)
        timer.setInterval(interval_ms)
        timer.timeout.connect(slot)
        timer.start()
        return timer

    def _dock(self, key: str, title: str, widget: QWidget, area) -> None:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{key}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        self.docks[key], self.dock_titles[key] = dock, title

    def _build_docks(self) -> None:
        central = QWidget()
        central.setMaximumSize(0, 0)
        self.setCentralWidget(central)
        self.docks: dict[str, QDockWidget] = {}
        self.dock_titles: dict[str, str] = {}  # as built; mark_stale adds a note
        left, right = Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
        self._dock("settings", "Settings", self.settings_panel, left)
        self._dock("info", "Scan info", self.info, left)
        self._dock("reconstructions", "Reconstructions", self.reconstructions, right)
        self._dock("residuals", "Solver residuals", self.residuals, right)
        self._dock("losses", "Loss curves", self.losses, right)
        self._dock("equivariance", "Equivariance", self.equivariance, right)
        self._dock("log", "Log", self.log, right)
        d = self.docks
        self.tabifyDockWidget(d["settings"], d["info"])
        d["settings"].raise_()
        self.splitDockWidget(d["reconstructions"], d["losses"], Qt.Orientation.Vertical)
        self.splitDockWidget(d["reconstructions"], d["residuals"], Qt.Orientation.Horizontal)
        self.splitDockWidget(d["losses"], d["equivariance"], Qt.Orientation.Horizontal)
        self.tabifyDockWidget(d["equivariance"], d["log"])
        d["equivariance"].raise_()
        self.resize(1600, 1000)
        self.resizeDocks([d["settings"], d["reconstructions"], d["residuals"]], [330, 700, 570],
                         Qt.Orientation.Horizontal)
        self.resizeDocks([d["reconstructions"], d["losses"]], [560, 380], Qt.Orientation.Vertical)

    def _build_status(self) -> None:
        sb = self.statusBar()
        self.status_label = QLabel("Idle")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("step %v / %m")
        self.jobs = JobIndicator(self.tasks)
        self.device_label = QLabel("device: …")
        self.device_label.setToolTip("Compute device used by the engine")
        sb.addWidget(self.status_label, 1)
        sb.addPermanentWidget(self.jobs)
        sb.addPermanentWidget(self.progress)
        sb.addPermanentWidget(self.device_label)

    # =================================================================================
    # the commands scripts call on the window
    def train(self) -> bool:
        return self.run.train()

    def request_shutdown(self) -> None:
        """Close without asking (SIGINT / SIGTERM / --quit-after)."""
        if self.run.request_close(ask=False):
            self.close()

    @property
    def shut_down_done(self) -> bool:
        return self.run.phase is RunPhase.CLOSED

    @property
    def busy(self) -> bool:
        return self.training.running or self.tasks.pending > 0

    def _tasks_busy(self, busy: bool) -> None:
        self.jobs.poll()
        self.busyChanged.emit(self.busy)

    # =================================================================================
    # start-up: the engine after the first paint, notices, help
    def eventFilter(self, watched, event) -> bool:
        if watched is self and event.type() == QEvent.Type.Paint and "window painted" not in self.startup_times:
            self.startup_times["window painted"] = time.time()
            QTimer.singleShot(0, self.load_engine)
        return super().eventFilter(watched, event)

    def load_engine(self) -> None:
        """Import torch, deepinv and the engine in the task thread (the window is up) and probe the device."""
        if "engine requested" in self.startup_times:
            return
        self.startup_times["engine requested"] = time.time()
        self.set_status("Loading the engine (torch, deepinv)…")
        cfg = self.state.config

        def ready(name: str) -> None:
            self.startup_times["engine ready"] = time.time()
            self.router.device_found(name)
            if self.status_label.text().startswith("Loading the engine"):
                self.set_status(f"Engine ready on {name}")
            self.engineReady.emit()

        def unknown(_exc) -> None:
            self.startup_times["engine ready"] = time.time()
            self.router.device_unknown()
            self.engineReady.emit()

        self.tasks.submit(lambda: (backend.warm_up(), backend.device_name(cfg))[1], ready, unknown, name="device",
                          job=Job("Loading the engine", cancellable=False))

    def show_welcome(self) -> None:
        def dismiss():
            self.notices.hide_notice("welcome")
            self.persistence.dismiss_welcome()

        self.notices.show_notice("welcome", WELCOME, [("Quick Guide", self.show_quick_guide), ("Got it", dismiss)],
                                 on_close=self.persistence.dismiss_welcome)

    def _announce_restored(self) -> None:
        text = self.persistence.announcement()
        if not text:
            return
        self.log.add("info", text + " (Settings > Reset Settings to Defaults undoes it)")
        self.set_status(text[0].upper() + text[1:])
        self.notices.show_notice("restored", text[0].upper() + text[1:] + ".",
                                 [("Reset to defaults", self.reset_to_defaults)], kind="notice")

    def reset_to_defaults(self) -> None:
        self.config_editor.reset()
        self.state.reconstruct_size = "model"
        self.notices.hide_notice("restored")
        self.log.add("info", "settings reset to the defaults")
        self.set_status("Settings reset to the defaults")
        self.scans.follow_scan_modality()  # an opened scan keeps its modality
        self.scans.show_choices()

    def show_quick_guide(self) -> None:
        self.help.show_quick_guide()

    def show_about(self) -> None:
        self.help.show_about(self.router.known_device or "not probed yet")

    # =================================================================================
    # persistence (what is kept: presenters.settings)
    def restore_settings(self, restore_config: bool = True) -> None:
        layout = self.persistence.window_layout()
        if isinstance(layout.geometry, QByteArray) and not layout.geometry.isEmpty():
            self.restoreGeometry(layout.geometry)
        if isinstance(layout.docks, QByteArray) and not layout.docks.isEmpty():
            self.restoreState(layout.docks)
        self.notices.setVisible(bool(self.notices.notices))  # a restored layout does not bring back old notices
        config = self.persistence.restore(restore_config)
        if config is not None:
            self.config_editor.set_config(config, log=False)

    def save_settings(self) -> None:
        self.persistence.save(WindowLayout(self.saveGeometry(), self.saveState()))

    # =================================================================================
    # redraw
    def refresh_plots(self) -> None:
        self.residuals.refresh()
        self.losses.refresh()

    def refresh_images(self) -> None:
        self.reconstructions.refresh()

    def refresh(self) -> None:
        self.refresh_plots()
        self.refresh_images()

    def shut_down(self) -> None:
        """Stop redrawing and following a run, end the training thread (stopping any run) and the task pool."""
        self.run_record.stop_following()
        self.plot_timer.stop()
        self.image_timer.stop()
        self.inspector.close()
        self.help.close()
        self.tasks.cancel_all()  # a solve in progress stops within one iteration
        self.training.shutdown(30000)
        self.tasks.closed = True
        self.tasks.wait(30000)
        self.garbage_collection.stop()

    # =================================================================================
    # Qt events: closing, drag and drop
    def closeEvent(self, event) -> None:
        if self.run.request_close(ask=True):
            event.accept()
        else:
            event.ignore()

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        for url in event.mimeData().urls():
            if url.isLocalFile():
                self.files.open_path(url.toLocalFile())
        event.acceptProposedAction()
