"""The main window: assembly of docks, menus, the status bar and the presenters.

What the GUI *does* lives in the Qt-free presenters (:mod:`workbench.presenters`);
this window builds the widgets, connects them to the presenters, and is the
presenters' view: its small ``show_*`` / ``set_*`` / ``ask_*`` methods draw or ask
and do nothing else.

Nothing slow happens on the GUI thread: training runs in the training QThread
(:class:`~workbench.worker.TrainingController`), file loading, checkpoint I/O,
reconstruction and equivariance run on the task pool
(:class:`~workbench.worker.TaskRunner`). Results come back as callbacks in the
GUI thread and only then touch :class:`~workbench.state.WorkbenchState`, so a
failed operation leaves the previous state intact.
"""

from __future__ import annotations

from typing import Callable, Optional

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QLabel, QMainWindow, QProgressBar, QToolBar, QWidget)

from engine.config import ExperimentConfig
from workbench import backend
from workbench.dialogs.errors import ErrorDialogs, ask_yes_no
from workbench.dialogs.inspector import SolverInspectorFeature
from workbench.dialogs.settings import SettingsPanel
from workbench.panels.equivariance import EquivariancePanel
from workbench.panels.info import InfoPanel
from workbench.panels.log import LogPanel
from workbench.panels.losses import LossesPanel
from workbench.panels.reconstructions import ReconstructionsPanel
from workbench.panels.residuals import ResidualsPanel
from workbench.presenters.analysis import AnalysisPresenter
from workbench.presenters.config import ConfigPresenter
from workbench.presenters.events import EventRouter, PanelModels
from workbench.presenters.files import FilesPresenter
from workbench.presenters.run import ActionStates, RunPhase, RunPresenter
from workbench.presenters.settings import SettingsPresenter, WindowLayout
from workbench.state import WorkbenchState, default_config
from workbench.worker import EventRelay, GuiThreadGarbageCollection, TaskRunner, TrainingController, user_message

ORG, APP = "EquiDEQ", "Workbench"
PLOT_INTERVAL_MS = 33
IMAGE_INTERVAL_MS = 250


def make_settings() -> QSettings:
    """The persistent settings store (INI in the user's config dir; tests redirect it)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORG, APP)


class MainWindow(QMainWindow):
    busyChanged = Signal(bool)

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
        self.files = FilesPresenter(self, self.state, self.tasks, self.persistence, self.config_editor, self.run,
                                    self.analysis.reconstruct, panel_models.reconstructions)
        self.relay.eventsReady.connect(self.router.route_batch)
        self.training.runEnded.connect(self.run.run_ended)
        self.settings_panel.configChanged.connect(self.config_editor.edited)
        self.settings_panel.fieldRejected.connect(self.config_editor.field_rejected)
        self.settings_panel.fieldAccepted.connect(self.config_editor.field_accepted)
        self.equivariance.angleRequested.connect(self.analysis.equivariance)
        self.equivariance.curveRequested.connect(self.analysis.equivariance_curve)
        self.info.sliceChanged.connect(self.analysis.slice_chosen)
        self.reconstructions.metrics_provider = self.analysis.metrics

        self._build_docks()
        self._build_actions()
        self.inspector = SolverInspectorFeature(self, self.run_menu)  # its window, actions, alarm
        self._build_status()
        self.plot_timer = self._timer(PLOT_INTERVAL_MS, self.refresh_plots)
        self.image_timer = self._timer(IMAGE_INTERVAL_MS, self.refresh_images)

        if restore:
            self.restore_settings(restore_config=config is None)
        self.show_recent(self.state.recent)
        self.run.show_actions()
        self.log.add("info", "Ready: built-in phantom CT data with config "
                             f"'{self.state.config.run.name}'. Press Train to watch a DEQ learn.")
        cfg = self.state.config
        self.tasks.submit(lambda: (backend.warm_up(), backend.device_name(cfg))[1], self.router.device_found,
                          lambda exc: self.router.device_unknown(), name="device")

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

    def _action(self, text: str, slot, shortcut=None, tip: str = "") -> QAction:
        act = QAction(text, self)
        if shortcut:
            act.setShortcut(QKeySequence(shortcut))
        if tip:
            act.setToolTip(tip)
            act.setStatusTip(tip)
        act.triggered.connect(lambda _checked=False: slot())
        return act

    def _build_actions(self) -> None:
        a, files, run = self._action, self.files, self.run
        self.act_open_scan = a("Open &Scan…", files.open_scan_dialog, "Ctrl+O",
                               "Open a scan file (DICOM, HDF5, NumPy, PNG/TIFF, NIfTI)")
        self.act_open_folder = a("Open DICOM &Folder…", files.open_folder_dialog, None, "Open a DICOM series folder")
        self.act_open_ckpt = a("Open &Checkpoint…", files.open_checkpoint_dialog, "Ctrl+Shift+O")
        self.act_save_ckpt = a("Save Checkpoint &As…", files.save_checkpoint_dialog, "Ctrl+Shift+S")
        self.act_export = a("&Export Reconstruction…", files.export_dialog, "Ctrl+E",
                            "Export the displayed DEQ reconstruction (PNG with the current window, NumPy, DICOM, HDF5)")
        self.act_open_config = a("Open Co&nfig…", files.open_config_dialog)
        self.act_save_config = a("Sa&ve Config As…", files.save_config_dialog)
        self.act_reset_config = a("Reset Config to Default", self.config_editor.reset)
        self.act_quit = a("&Quit", self.close, "Ctrl+Q")
        self.act_train = a("Train", run.train, "F5", "Train the DEQ on the current data and config")
        self.act_reconstruct = a("Reconstruct", self.analysis.reconstruct, "F6",
                                 "Reconstruct the current slice (or a phantom) with the current model")
        self.act_pause = a("Pause", run.toggle_pause, "F7", "Pause / resume the training run")
        self.act_stop = a("Stop", run.stop, "F8", "Stop the run (keeps the last good state)")
        self.act_keep = a("Keep current iterate", run.keep_current_iterate, None,
                          "End the solve in progress now and use its current iterate")
        run_actions = (self.act_train, self.act_reconstruct, self.act_pause, self.act_stop, self.act_keep)

        mb = self.menuBar()
        fm = mb.addMenu("&File")
        fm.addActions([self.act_open_scan, self.act_open_folder, self.act_open_ckpt])
        self.recent_menu = fm.addMenu("Recent Files")
        for group in ([self.act_save_ckpt, self.act_export],
                      [self.act_open_config, self.act_save_config, self.act_reset_config], [self.act_quit]):
            fm.addSeparator()
            fm.addActions(group)
        self.run_menu = mb.addMenu("&Run")
        self.run_menu.addActions(list(run_actions))
        mb.addMenu("&View").addActions([dock.toggleViewAction() for dock in self.docks.values()])

        tb = QToolBar("Run")
        tb.setObjectName("toolbar_run")
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        tb.addActions(list(run_actions))
        tb.addSeparator()
        tb.addActions([self.act_open_scan, self.act_open_ckpt, self.act_export])
        self.addToolBar(tb)
        self.toolbar = tb

    def _build_status(self) -> None:
        sb = self.statusBar()
        self.status_label = QLabel("Idle")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("step %v / %m")
        self.task_label = QLabel("")
        self.device_label = QLabel("device: …")
        self.device_label.setToolTip("Compute device used by the engine")
        sb.addWidget(self.status_label, 1)
        sb.addPermanentWidget(self.task_label)
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
        self.task_label.setText("working…" if busy else "")
        self.busyChanged.emit(self.busy)

    # =================================================================================
    # persistence (what is kept: presenters.settings)
    def restore_settings(self, restore_config: bool = True) -> None:
        layout = self.persistence.window_layout()
        if isinstance(layout.geometry, QByteArray) and not layout.geometry.isEmpty():
            self.restoreGeometry(layout.geometry)
        if isinstance(layout.docks, QByteArray) and not layout.docks.isEmpty():
            self.restoreState(layout.docks)
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

    # =================================================================================
    # the presenters' view: draw, ask, forward
    def log_message(self, level: str, message: str) -> None:
        self.log.add(level, message)

    def report_error(self, title: str, message, log: bool = True) -> None:
        """A dialog (not while closing) and, unless ``log`` is False (logged already), a log line."""
        msg = user_message(message) if isinstance(message, BaseException) else str(message)
        self.errors.append((title, msg))
        if log:
            self.log.add("error", f"{title}: {msg}")
        if not self.run.closing:  # no dialogs while the window goes away
            try:
                self.error_dialog(title, msg)
            except Exception:
                pass

    def close_error(self, title: str) -> None:
        getattr(self.error_dialog, "dismiss", lambda _title: None)(title)  # a test's recorder has none

    def show_invalid_setting(self, key: str) -> None:
        self.docks["settings"].raise_()
        self.settings_panel.show_field(key)

    def mark_stale(self, panels: tuple, note: str) -> None:
        for key in panels:
            self.docks[key].setWindowTitle(self.dock_titles[key] + (f" ({note})" if note else ""))

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def set_progress(self, value: int, maximum: Optional[int] = None) -> None:
        if maximum is not None:
            self.progress.setRange(0, maximum)
        self.progress.setValue(value)

    def show_actions(self, actions: ActionStates) -> None:
        self.act_train.setEnabled(actions.train)
        self.act_pause.setEnabled(actions.pause)
        self.act_pause.setText(actions.pause_text)
        self.act_stop.setEnabled(actions.stop)
        self.act_keep.setEnabled(actions.keep_iterate)
        self.act_open_config.setEnabled(actions.edit_config)
        self.act_reset_config.setEnabled(actions.edit_config)
        self.act_save_ckpt.setEnabled(actions.save_checkpoint)

    def set_settings_editable(self, editable: bool) -> None:
        self.settings_panel.setEnabled(editable)

    def show_config(self, config: ExperimentConfig) -> None:
        self.settings_panel.set_config(config)

    def clear_panels(self) -> None:
        for panel in (self.residuals, self.losses, self.reconstructions, self.equivariance):
            panel.clear()

    def clear_equivariance(self) -> None:
        self.equivariance.clear()

    def set_hu_range(self, hu_range) -> None:
        self.reconstructions.set_hu_range(hu_range)

    def displayed_levels(self) -> tuple[float, float]:
        return self.reconstructions.levels

    def request_equivariance(self) -> None:
        self.equivariance.request_angle(self.equivariance.slider.value())

    def show_equivariance(self, angle: float, result) -> None:
        self.equivariance.show_result(angle, result)

    def show_equivariance_curve(self, angles, errors) -> None:
        self.equivariance.show_curve(angles, errors)

    def equivariance_failed(self) -> None:
        self.equivariance.request_failed()

    def show_scan(self, scan, path: str, n_slices: int, index: int) -> None:
        self.info.set_scan(scan, path, n_slices, index)

    def show_run(self, run_dir: Optional[str], note: str) -> None:
        self.info.set_run(run_dir, note)

    def show_model_info(self, text: str) -> None:
        self.info.set_model(text)

    def show_reconstruction_settings(self, text: str) -> None:
        self.info.set_reconstruction(text)

    def show_device(self, text: str) -> None:
        self.device_label.setText(text)

    def show_title(self, title: str) -> None:
        self.setWindowTitle(title)

    def raise_panel(self, key: str) -> None:
        self.docks[key].raise_()

    def show_recent(self, recent: list) -> None:
        self.recent_menu.clear()
        for item in recent:
            act = self.recent_menu.addAction(item.label())
            act.setToolTip(item.path)
            act.triggered.connect(lambda _c=False, p=item.path: self.files.open_path(p))
        self.recent_menu.setEnabled(bool(recent))

    def ask_open_file(self, title: str, file_filter: str, start: str) -> str:
        return QFileDialog.getOpenFileName(self, title, start, file_filter)[0]

    def ask_folder(self, title: str, start: str) -> str:
        return QFileDialog.getExistingDirectory(self, title, start)

    def ask_save_file(self, title: str, file_filter: str, start: str) -> tuple[str, str]:
        path, chosen = QFileDialog.getSaveFileName(self, title, start, file_filter)
        return path, chosen

    def call_later(self, ms: int, fn: Callable[[], None]) -> None:
        QTimer.singleShot(ms, fn)

    def close_window(self) -> None:
        self.close()

    def shut_down(self) -> None:
        """Stop redrawing, end the training thread (stopping any run) and the task pool."""
        self.plot_timer.stop()
        self.image_timer.stop()
        self.inspector.close()
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
