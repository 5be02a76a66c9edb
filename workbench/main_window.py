"""The main window: docks, menus, run control, file handling, persistence.

Nothing slow happens on the GUI thread: training runs in the training QThread
(:class:`~workbench.worker.TrainingController`), file loading, checkpoint I/O,
reconstruction and equivariance run on the task pool
(:class:`~workbench.worker.TaskRunner`). Results come back as callbacks in the
GUI thread and only then touch :class:`~workbench.state.WorkbenchState`, so a
failed operation leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np
from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QLabel, QMainWindow, QProgressBar, QToolBar, QWidget)

from engine.config import ExperimentConfig, load_config, save_config
from engine.errors import ConfigError, EquiDEQError
from engine.events import (CheckpointSaved, LogMessage, RunFailed, RunFinished, RunStarted, Snapshot,
                           SolveFinished, StabilityChecked, StepFinished, ValidationFinished)
from workbench import backend
from workbench.dialogs.errors import ErrorDialogs, ask_yes_no
from workbench.dialogs.settings import SettingsPanel
from workbench.panels.equivariance import EquivariancePanel
from workbench.panels.info import InfoPanel
from workbench.panels.log import LogPanel
from workbench.panels.losses import LossesPanel
from workbench.panels.reconstructions import ReconstructionsPanel, snapshot_from_result
from workbench.panels.residuals import PROBLEM_REASONS, ResidualsPanel
from workbench.state import WorkbenchState, classify_path, default_config
from workbench.worker import EventRelay, TaskRunner, TrainingController, user_message

ORG, APP = "EquiDEQ", "Workbench"
SCAN_FILTER = ("Scans (*.dcm *.dicom *.ima *.h5 *.hdf5 *.hdf *.npy *.npz *.png *.tif *.tiff *.jpg *.jpeg *.bmp "
               "*.nii *.nii.gz *.inv3);;DICOM (*.dcm *.dicom *.ima);;HDF5 (*.h5 *.hdf5);;NumPy (*.npy *.npz);;"
               "Images (*.png *.tif *.tiff);;NIfTI (*.nii *.nii.gz);;All files (*)")
CHECKPOINT_FILTER = "Checkpoints (*.pt *.pth *.ckpt *.safetensors);;All files (*)"
CONFIG_FILTER = "Configs (*.toml *.yaml *.yml);;All files (*)"
EXPORT_FILTER = "PNG image, current window (*.png);;NumPy array (*.npy);;DICOM (*.dcm);;HDF5 (*.h5)"
PLOT_INTERVAL_MS = 33
IMAGE_INTERVAL_MS = 250
CURVE_ANGLES = tuple(range(0, 361, 15))
MAX_PROBLEM_LOGS = 20


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
        self.run_root = run_root
        self.error_dialog = error_dialog if error_dialog is not None else ErrorDialogs(self)
        self.confirm = confirm if confirm is not None else (lambda title, q: ask_yes_no(self, title, q))
        self.errors: list[tuple[str, str]] = []  # every (title, message) reported, newest last
        self._closing = False
        self._force_close = False
        self._shutdown_done = False
        self._use_trainer_model = False
        self._problem_logs = 0
        self._divergence_reported = False
        self._total_steps = 0
        self._last_step = 0
        self._run_t0 = 0.0
        self.on_run_ended: list[Callable[[str], None]] = []

        self.setWindowTitle(self.state.title())
        self.setAcceptDrops(True)
        self.setDockNestingEnabled(True)
        self.setDockOptions(QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowTabbedDocks
                            | QMainWindow.DockOption.AllowNestedDocks)

        # -- engine bridge --------------------------------------------------------------
        self.relay = EventRelay(self)
        self.relay.eventsReady.connect(self._on_events)
        self.training = TrainingController(self.relay, trainer_factory or backend.make_trainer, self)
        self.training.runEnded.connect(self._on_run_ended)
        self.tasks = TaskRunner(self)
        self._trainer_view = backend.TrainerModelView()
        self.tasks.busyChanged.connect(self._tasks_busy)

        # -- panels ---------------------------------------------------------------------
        self.residuals = ResidualsPanel()
        self.losses = LossesPanel()
        self.reconstructions = ReconstructionsPanel()
        self.equivariance = EquivariancePanel()
        self.log = LogPanel()
        self.info = InfoPanel()
        self.settings_panel = SettingsPanel(self.state.config)
        self.settings_panel.configChanged.connect(self._config_edited)
        self.settings_panel.fieldRejected.connect(lambda k, msg: self.log.add("warning", f"refused: {msg}"))
        self.equivariance.angleRequested.connect(self._compute_equivariance)
        self.equivariance.curveRequested.connect(self._compute_equivariance_curve)
        self.info.sliceChanged.connect(self._slice_changed)
        self.reconstructions.metrics_provider = self._compute_metrics

        central = QWidget()
        central.setMaximumSize(0, 0)
        self.setCentralWidget(central)
        self.docks: dict[str, QDockWidget] = {}
        self._dock("settings", "Settings", self.settings_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self._dock("info", "Scan info", self.info, Qt.DockWidgetArea.LeftDockWidgetArea)
        self._dock("reconstructions", "Reconstructions", self.reconstructions, Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("residuals", "Solver residuals", self.residuals, Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("losses", "Loss curves", self.losses, Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("equivariance", "Equivariance", self.equivariance, Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("log", "Log", self.log, Qt.DockWidgetArea.RightDockWidgetArea)
        self.tabifyDockWidget(self.docks["settings"], self.docks["info"])
        self.docks["settings"].raise_()
        self.splitDockWidget(self.docks["reconstructions"], self.docks["losses"], Qt.Orientation.Vertical)
        self.splitDockWidget(self.docks["reconstructions"], self.docks["residuals"], Qt.Orientation.Horizontal)
        self.splitDockWidget(self.docks["losses"], self.docks["equivariance"], Qt.Orientation.Horizontal)
        self.tabifyDockWidget(self.docks["equivariance"], self.docks["log"])
        self.docks["equivariance"].raise_()
        self.resize(1600, 1000)
        self.resizeDocks([self.docks["settings"], self.docks["reconstructions"], self.docks["residuals"]],
                         [330, 700, 570], Qt.Orientation.Horizontal)
        self.resizeDocks([self.docks["reconstructions"], self.docks["losses"]], [560, 380], Qt.Orientation.Vertical)

        self._build_actions()
        self._build_status()

        # -- redraw timers --------------------------------------------------------------
        self.plot_timer = QTimer(self)
        self.plot_timer.setInterval(PLOT_INTERVAL_MS)
        self.plot_timer.timeout.connect(self.refresh_plots)
        self.plot_timer.start()
        self.image_timer = QTimer(self)
        self.image_timer.setInterval(IMAGE_INTERVAL_MS)
        self.image_timer.timeout.connect(self.refresh_images)
        self.image_timer.start()

        if restore:
            self.restore_settings(restore_config=config is None)
        self._rebuild_recent_menu()
        self._update_actions()
        self.log.add("info", "Ready: built-in phantom CT data with config "
                             f"'{self.state.config.run.name}'. Press Train to watch a DEQ learn.")
        cfg = self.state.config
        self.tasks.submit(lambda: (backend.warm_up(), backend.device_name(cfg))[1], self._device_known,
                          lambda exc: self.device_label.setText("CPU"), name="device")

    # =================================================================================
    # construction helpers
    def _dock(self, key: str, title: str, widget: QWidget, area) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{key}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        self.docks[key] = dock
        return dock

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
        a = self._action
        self.act_open_scan = a("Open &Scan…", self.open_scan_dialog, "Ctrl+O", "Open a scan file (DICOM, HDF5, NumPy, PNG/TIFF, NIfTI)")
        self.act_open_folder = a("Open DICOM &Folder…", self.open_folder_dialog, None, "Open a DICOM series folder")
        self.act_open_ckpt = a("Open &Checkpoint…", self.open_checkpoint_dialog, "Ctrl+Shift+O")
        self.act_save_ckpt = a("Save Checkpoint &As…", self.save_checkpoint_dialog, "Ctrl+Shift+S")
        self.act_export = a("&Export Reconstruction…", self.export_dialog, "Ctrl+E",
                            "Export the displayed DEQ reconstruction (PNG with the current window, NumPy, DICOM, HDF5)")
        self.act_open_config = a("Open Co&nfig…", self.open_config_dialog)
        self.act_save_config = a("Sa&ve Config As…", self.save_config_dialog)
        self.act_reset_config = a("Reset Config to Default", self.reset_config)
        self.act_quit = a("&Quit", self.close, "Ctrl+Q")
        self.act_train = a("Train", self.train, "F5", "Train the DEQ on the current data and config")
        self.act_reconstruct = a("Reconstruct", self.reconstruct, "F6",
                                 "Reconstruct the current slice (or a phantom) with the current model")
        self.act_pause = a("Pause", self.toggle_pause, "F7", "Pause / resume the training run")
        self.act_stop = a("Stop", self.stop, "F8", "Stop the run (keeps the last good state)")
        self.act_keep = a("Keep current iterate", self.keep_current_iterate, None,
                          "End the solve in progress now and use its current iterate")

        mb = self.menuBar()
        fm = mb.addMenu("&File")
        for act in (self.act_open_scan, self.act_open_folder, self.act_open_ckpt):
            fm.addAction(act)
        self.recent_menu = fm.addMenu("Recent Files")
        fm.addSeparator()
        fm.addAction(self.act_save_ckpt)
        fm.addAction(self.act_export)
        fm.addSeparator()
        fm.addAction(self.act_open_config)
        fm.addAction(self.act_save_config)
        fm.addAction(self.act_reset_config)
        fm.addSeparator()
        fm.addAction(self.act_quit)
        rm = mb.addMenu("&Run")
        for act in (self.act_train, self.act_reconstruct, self.act_pause, self.act_stop, self.act_keep):
            rm.addAction(act)
        vm = mb.addMenu("&View")
        for dock in self.docks.values():
            vm.addAction(dock.toggleViewAction())

        tb = QToolBar("Run")
        tb.setObjectName("toolbar_run")
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        for act in (self.act_train, self.act_reconstruct, self.act_pause, self.act_stop, self.act_keep):
            tb.addAction(act)
        tb.addSeparator()
        tb.addAction(self.act_open_scan)
        tb.addAction(self.act_open_ckpt)
        tb.addAction(self.act_export)
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
    # persistence
    def restore_settings(self, restore_config: bool = True) -> None:
        s = self.settings
        geo = s.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        st = s.value("window/state")
        if isinstance(st, QByteArray) and not st.isEmpty():
            self.restoreState(st)
        try:
            self.state.recent_from_list(json.loads(s.value("recent", "[]") or "[]"))
        except (TypeError, ValueError):
            pass
        if restore_config:
            text = s.value("config/last", "")
            if text:
                try:
                    cfg = ExperimentConfig.from_dict(json.loads(text))
                    paths = list(cfg.data.paths or [])
                    if cfg.data.source == "files" and not all(os.path.exists(p) for p in paths):
                        cfg = cfg.replace(**{"data.source": "phantom", "data.paths": []})
                    self.set_config(cfg, log=False)
                except (ValueError, TypeError, EquiDEQError):
                    pass  # settings from another version: keep the default

    def save_settings(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.setValue("recent", json.dumps(self.state.recent_as_list()))
        s.setValue("config/last", json.dumps(self.state.config.to_dict()))
        s.sync()

    # =================================================================================
    # config
    def set_config(self, config: ExperimentConfig, log: bool = True) -> None:
        self.state.config = config
        self.settings_panel.set_config(config)
        if self.state.model_source == "config":
            self.state.set_model(None, "")
        self._update_hu_range()
        if log:
            self.log.add("info", f"config: {config.run.name} ({config.physics.modality}, "
                                 f"{config.physics.img_size}px, {config.optim.steps} steps)")

    def _config_edited(self, config: ExperimentConfig) -> None:
        self.state.config = config
        if self.state.model_source == "config":
            self.state.set_model(None, "")

    def reset_config(self) -> None:
        self.set_config(default_config())

    # =================================================================================
    # run control
    def train(self) -> bool:
        if self.training.running or self._closing:
            return False
        cfg = self.state.config
        resume = self.state.checkpoint_path if self.state.model_source == "checkpoint" else None
        run_dir = None
        if self.run_root:
            run_dir = backend.new_run_dir(self.run_root, cfg.run.name)  # a safe name inside the root
        self.residuals.clear()
        self.losses.clear()
        self.reconstructions.clear()
        self.equivariance.clear()
        self._problem_logs = 0
        self._divergence_reported = False
        self._use_trainer_model = True
        self._total_steps = int(cfg.optim.steps)
        self._last_step = 0
        self.progress.setRange(0, max(1, self._total_steps))
        self.progress.setValue(0)
        self._run_t0 = time.monotonic()
        self.training.start(cfg, run_dir=run_dir, resume_from=resume)
        self.log.add("info", "training started" + (f" from {os.path.basename(resume)}" if resume else ""))
        self.status_label.setText("Starting training…")
        self.settings_panel.setEnabled(False)
        self._update_actions()
        return True

    def toggle_pause(self) -> None:
        if not self.training.running:
            return
        if self.training.paused:
            self.training.resume()
            self.status_label.setText("Resumed")
            self.log.add("info", "resumed")
        else:
            self.training.pause()
            self.status_label.setText("Paused (Resume to continue, Stop to end)")
            self.log.add("info", "paused")
        self._update_actions()

    def stop(self) -> None:
        if self.training.running:
            self.training.stop()
            self.status_label.setText("Stopping…")
            self.log.add("info", "stop requested")
            self._update_actions()

    def keep_current_iterate(self) -> None:
        if self.training.running:
            self.training.keep_current_iterate()
            self.log.add("info", "keeping the current iterate of the solve in progress")

    @property
    def busy(self) -> bool:
        return self.training.running or self.tasks.pending > 0

    def _update_actions(self) -> None:
        running = self.training.running
        self.act_train.setEnabled(not running and not self._closing)
        self.act_pause.setEnabled(running)
        self.act_pause.setText("Resume" if self.training.paused else "Pause")
        self.act_stop.setEnabled(running and not (self.training.control and self.training.control.stopped))
        self.act_keep.setEnabled(running)
        self.act_open_config.setEnabled(not running)
        self.act_reset_config.setEnabled(not running)
        self.act_save_ckpt.setEnabled(self.training.trainer is not None or bool(self.state.checkpoint_path))

    def _tasks_busy(self, busy: bool) -> None:
        self.task_label.setText("working…" if busy else "")
        self.busyChanged.emit(self.busy)

    def _device_known(self, name: str) -> None:
        self.device_label.setText(f"device: {name}")

    # =================================================================================
    # engine events (GUI thread, in batches)
    def _on_events(self, batch: list) -> None:
        for ev in batch:
            try:
                self._dispatch(ev)
            except Exception as exc:  # a display bug must not kill the event stream
                self.log.add("error", f"display error for {type(ev).__name__}: {exc}")

    def _dispatch(self, ev) -> None:
        if isinstance(ev, SolveFinished):
            self.residuals.add_event(ev)
            reasons = set(ev.stop_reasons or [])
            bad = reasons & set(PROBLEM_REASONS)
            if bad and self._problem_logs < MAX_PROBLEM_LOGS:
                self._problem_logs += 1
                level = "error" if bad & {"diverged", "non_finite"} else "warning"
                self.log.add(level, f"step {ev.step}: {ev.direction} solve ({ev.solver}) ended with "
                                    f"{', '.join(sorted(bad))} after {int(np.max(ev.iterations)) if np.size(ev.iterations) else 0} iterations"
                                    + (f"; fallback {ev.fallback}" if ev.fallback else ""))
                if self._problem_logs == MAX_PROBLEM_LOGS:
                    self.log.add("warning", "further problem solves are listed in the residuals panel only")
            if bad & {"diverged", "non_finite"} and not self._divergence_reported:
                self._divergence_reported = True
                self._report("Diverged solve", f"The {ev.direction} solve at step {ev.step} "
                                               f"{'diverged' if 'diverged' in bad else 'produced non-finite values'}. "
                                               "Training continues; see the Solver residuals panel.", log=False)
        elif isinstance(ev, StepFinished):
            self.losses.add_step(ev)
            self._last_step = int(ev.step)
            self.progress.setValue(min(int(ev.step), self.progress.maximum()))
            total = ev.losses.get("total", next(iter(ev.losses.values()), float("nan"))) if ev.losses else float("nan")
            self.status_label.setText(f"Training: step {ev.step}/{self._total_steps}  loss {total:.4g}  "
                                      f"({ev.seconds:.2f} s/step)")
        elif isinstance(ev, ValidationFinished):
            self.losses.add_validation(ev)
        elif isinstance(ev, StabilityChecked):
            self.residuals.add_stability(ev)
        elif isinstance(ev, Snapshot):
            self.reconstructions.add_event(ev)
        elif isinstance(ev, RunStarted):
            self._total_steps = int(ev.total_steps)
            self.progress.setRange(0, max(1, self._total_steps))
            self.progress.setValue(int(ev.start_step))
            self.state.run_dir = ev.run_dir
            self.info.set_run(ev.run_dir, f"(from step {ev.start_step})" if ev.start_step else "")
            self.info.set_model("training in progress")
            if ev.device:
                dev = str(ev.device)
                shown = self.device_label.text()
                if dev.startswith("cuda") and "CUDA" in shown:
                    dev = shown.removeprefix("device: ")
                self.device_label.setText(f"device: {dev.upper() if dev == 'cpu' else dev}")
            self.log.add("info", f"run started on {ev.device}: {ev.total_steps} steps"
                                 + (f", run directory {ev.run_dir}" if ev.run_dir else ""))
        elif isinstance(ev, CheckpointSaved):
            self.log.add("info", f"checkpoint saved at step {ev.step}: {ev.path}")
            self.state.checkpoint_path = ev.path if self.state.model_source != "checkpoint" else self.state.checkpoint_path
            self._update_actions()
        elif isinstance(ev, LogMessage):
            self.log.add(ev.level, ev.message)
        elif isinstance(ev, RunFailed):
            self._report("Training failed", ev.message)
        elif isinstance(ev, RunFinished):
            secs = time.monotonic() - self._run_t0 if self._run_t0 else 0.0
            self.log.add("info", f"run {ev.reason} at step {ev.step} ({secs:.1f} s)")

    def _on_run_ended(self, result: str) -> None:
        self.settings_panel.setEnabled(True)
        self.status_label.setText({"completed": "Training completed", "stopped": "Training stopped",
                                   "failed": "Training failed"}.get(result, f"Training {result}"))
        if self.training.trainer is not None and result != "failed":
            self.info.set_model(f"trained in this session ({result} at step {self._last_step})")
        self.refresh_plots()
        self.refresh_images()
        self._update_actions()
        for cb in list(self.on_run_ended):
            cb(result)
        if self._closing:
            QTimer.singleShot(0, self.close)

    # =================================================================================
    # redraw
    def refresh_plots(self) -> None:
        self.residuals.refresh()
        self.losses.refresh()

    def refresh_images(self) -> None:
        self.reconstructions.refresh()

    # =================================================================================
    # errors
    def _report(self, title: str, message, log: bool = True) -> None:
        msg = user_message(message) if isinstance(message, BaseException) else str(message)
        self.errors.append((title, msg))
        self.log.add("error", f"{title}: {msg}")
        if not self._closing:
            try:
                self.error_dialog(title, msg)
            except Exception:
                pass

    # =================================================================================
    # the model and the input image (resolved in the task thread)
    def _model_provider(self) -> Callable:
        trainer = self.training.trainer if self._use_trainer_model else None
        model = self.state.model
        config = self.state.config
        state = self.state
        view = self._trainer_view

        def get():
            if trainer is not None:
                return view.get(trainer)
            if model is not None:
                return model
            m = backend.model_from_config(config)
            state._pending_config_model = m  # picked up in the GUI thread
            return m

        return get

    def _input_provider(self) -> Callable:
        scan, slices, index = self.state.scan, self.state.slices, self.state.slice_index
        window = self._data_window()

        def image_for(model) -> np.ndarray:
            cfg = model.config
            size = int(cfg.physics.img_size)
            if scan is None:
                return backend.default_images(cfg, 1)[0]
            sl = slices
            if sl is None or sl.shape[-1] != size:
                sl = backend.prepare_slices(scan, size, window=window)
            return np.asarray(sl[min(max(0, index), len(sl) - 1)], dtype=np.float32)

        return image_for

    def _data_window(self):
        w = list(self.state.config.data.window or [])
        return tuple(w) if len(w) == 2 else None

    def _update_hu_range(self) -> None:
        scan = self.state.scan
        w = self._data_window()
        hu = None
        if scan is not None and getattr(scan, "units", "") == "HU" and getattr(scan, "modality", "") == "ct":
            hu = w
        self.reconstructions.set_hu_range(hu)

    def _adopt_config_model(self) -> None:
        m = getattr(self.state, "_pending_config_model", None)
        if m is not None and self.state.model is None and not self._use_trainer_model:
            self.state.set_model(m, "config")
        self.state._pending_config_model = None

    # =================================================================================
    # reconstruct / equivariance
    def reconstruct(self, then: Optional[Callable] = None) -> None:
        get_model, get_image = self._model_provider(), self._input_provider()
        label = (f"slice {self.state.slice_index} of {os.path.basename(self.state.scan_path.rstrip('/'))}"
                 if self.state.scan_path else "phantom")

        def job():
            model = get_model()
            image = get_image(model)
            result = dict(model.reconstruct(image[None]))
            stats = result.get("forward_stats")
            if stats is not None and hasattr(stats, "to_event"):  # numpy conversion off the GUI thread
                result["forward_stats"] = stats.to_event("forward", step=None, tag="reconstruct")
            return result

        def done(result):
            self._adopt_config_model()
            snap = snapshot_from_result(result, f"Reconstruct: {label}")
            self.reconstructions.add_snapshot(snap)
            self.reconstructions.refresh()
            stats = result.get("forward_stats")
            if stats is not None:
                try:
                    self.residuals.add_event(stats)
                except Exception as exc:
                    self.log.add("warning", f"solver statistics of the reconstruction not shown: {exc}")
            self.log.add("info", f"reconstructed {label}")
            self.status_label.setText(f"Reconstructed {label}")
            self.equivariance.request_angle(self.equivariance.slider.value())
            if then:
                then()

        self.status_label.setText("Reconstructing…")
        # a newer reconstruction (another slice, scan or model) replaces one still queued or running,
        # unless a caller waits for this one (then)
        self.tasks.submit(job, done, lambda exc: self._report("Reconstruction failed", exc), name="reconstruct",
                          supersede=then is None)

    def _compute_equivariance(self, angle: float) -> None:
        get_model, get_image = self._model_provider(), self._input_provider()

        def job():
            model = get_model()
            return model.equivariance(get_image(model), float(angle))

        def failed(exc):
            self.equivariance.request_failed()
            self._report("Equivariance failed", exc)

        self.tasks.submit(job, lambda r: (self._adopt_config_model(), self.equivariance.show_result(angle, r)),
                          failed, name="equivariance", supersede=True)  # the slider's latest angle wins

    def _compute_equivariance_curve(self) -> None:
        get_model, get_image = self._model_provider(), self._input_provider()

        def job():
            model = get_model()
            return model.equivariance_curve(get_image(model), np.asarray(CURVE_ANGLES, dtype=np.float64))

        def failed(exc):
            self.equivariance.request_failed()
            self._report("Equivariance failed", exc)

        self.tasks.submit(job, lambda r: (self._adopt_config_model(), self.equivariance.show_curve(r[0], r[1])),
                          failed, name="equivariance curve", supersede=True)

    def _compute_metrics(self, snap: dict, jobs: list) -> None:
        def job():
            out = {}
            for view, image, ref in jobs:
                m = backend.image_metrics(image, ref)
                if m is not None:
                    out[view] = m
            return out

        self.tasks.submit(job, lambda values: self.reconstructions.model.set_metrics(snap, values),
                          lambda exc: None, name="metrics")

    def _slice_changed(self, index: int) -> None:
        self.state.slice_index = int(index)
        self.reconstruct()

    # =================================================================================
    # files
    def _ask_open(self, title: str, filt: str) -> str:
        path, _ = QFileDialog.getOpenFileName(self, title, self._last_dir(), filt)
        return path

    def _ask_save(self, title: str, filt: str, name: str = "") -> tuple[str, str]:
        start = os.path.join(self._last_dir(), name) if name else self._last_dir()
        path, chosen = QFileDialog.getSaveFileName(self, title, start, filt)
        return path, chosen

    def _last_dir(self) -> str:
        return str(self.settings.value("paths/last_dir", os.getcwd()) or os.getcwd())

    def _remember_dir(self, path: str) -> None:
        d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self.settings.setValue("paths/last_dir", d)

    def open_scan_dialog(self) -> None:
        path = self._ask_open("Open scan", SCAN_FILTER)
        if path:
            self.open_scan(path)

    def open_folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open DICOM series folder", self._last_dir())
        if path:
            self.open_scan(path)

    def open_scan(self, path: str, then: Optional[Callable] = None) -> None:
        size = int(self.state.config.physics.img_size)
        window = self._data_window()
        name = os.path.basename(str(path).rstrip("/")) or str(path)

        def job():
            scan = backend.load_scan(path)
            slices = backend.prepare_slices(scan, size, window=window)
            return scan, slices

        def done(result):
            scan, slices = result
            self.state.set_scan(path, scan, np.asarray(slices, dtype=np.float32))
            self.state.add_recent("scan", path)
            self._remember_dir(path)
            self._rebuild_recent_menu()
            self.info.set_scan(scan, path, len(slices), self.state.slice_index)
            self._update_hu_range()
            self.setWindowTitle(self.state.title())
            self.log.add("info", f"opened scan {scan.summary() if hasattr(scan, 'summary') else name}")
            if getattr(scan, "kind", "image") == "image" and not self.training.running:
                try:
                    cfg = self.state.config.replace(**{"data.source": "files", "data.paths": [os.path.abspath(path)]})
                    self.set_config(cfg, log=False)
                    self.log.add("info", f"training data is now {name} (data.source = files)")
                except ConfigError as exc:
                    self.log.add("warning", str(exc))
            self.docks["info"].raise_()
            self.reconstruct(then)

        self.status_label.setText(f"Opening {name}…")
        self.tasks.submit(job, done, lambda exc: self._report("Cannot open scan", exc), name="open scan",
                          supersede=then is None)

    def open_checkpoint_dialog(self) -> None:
        path = self._ask_open("Open checkpoint", CHECKPOINT_FILTER)
        if path:
            self.open_checkpoint(path)

    def open_checkpoint(self, path: str, then: Optional[Callable] = None) -> None:
        name = os.path.basename(path)

        def done(model):
            self.state.set_model(model, "checkpoint", os.path.abspath(path))
            self._use_trainer_model = False
            self.state.add_recent("checkpoint", path)
            self._remember_dir(path)
            self._rebuild_recent_menu()
            cfg = getattr(model, "config", None)
            if cfg is not None and not self.training.running:
                if self.state.scan is not None and cfg.data.source == "phantom" and \
                        self.state.config.data.source == "files":
                    try:
                        cfg = cfg.replace(**{"data.source": "files", "data.paths": list(self.state.config.data.paths)})
                    except ConfigError:
                        pass
                self.set_config(cfg, log=False)
            self.info.set_model(f"checkpoint {name}")
            self.setWindowTitle(self.state.title())
            self.log.add("info", f"opened checkpoint {name}")
            self._update_actions()
            self.equivariance.clear()
            self.reconstruct(then)

        self.status_label.setText(f"Opening {name}…")
        self.tasks.submit(lambda: backend.load_model(path), done,
                          lambda exc: self._report("Cannot open checkpoint", exc), name="open checkpoint")

    def save_checkpoint_dialog(self) -> None:
        path, _ = self._ask_save("Save checkpoint as", CHECKPOINT_FILTER, "model.pt")
        if path:
            self.save_checkpoint(path)

    def save_checkpoint(self, path: str, then: Optional[Callable] = None) -> None:
        trainer = self.training.trainer if self._use_trainer_model else None
        source = self.state.checkpoint_path
        scan_path = self.state.scan_path

        def job():
            backend.check_output_file(path, [scan_path])  # the dialog asked about replacing
            if trainer is not None:
                trainer.save_checkpoint(path)  # captured by the training thread between steps
            elif source and os.path.abspath(source) != os.path.abspath(path):
                shutil.copyfile(source, path)
            elif not source:
                raise EquiDEQError("nothing to save yet: train a model or open a checkpoint first")
            return path

        def done(p):
            self.state.add_recent("checkpoint", p)
            self._remember_dir(p)
            self._rebuild_recent_menu()
            self.log.add("info", f"checkpoint saved: {p}")
            if then:
                then()

        self.tasks.submit(job, done, lambda exc: self._report("Cannot save checkpoint", exc), name="save checkpoint")

    def export_dialog(self) -> None:
        if self.reconstructions.current_image() is None:
            self._report("Nothing to export", "No reconstruction is displayed yet: press Train or Reconstruct first.")
            return
        path, chosen = self._ask_save("Export reconstruction", EXPORT_FILTER, "reconstruction.png")
        if path:
            if not os.path.splitext(path)[1]:
                ext = {"PNG": ".png", "NumPy": ".npy", "DICOM": ".dcm", "HDF5": ".h5"}
                path += next((v for k, v in ext.items() if chosen.startswith(k)), ".png")
                # the dialog confirmed the name without the suffix, not this file
                if os.path.exists(path) and not self.confirm("Replace file?", f"{path} exists. Replace it?"):
                    return
            self.export_reconstruction(path)

    def export_reconstruction(self, path: str, then: Optional[Callable] = None) -> None:
        image = self.reconstructions.current_image()
        if image is None:
            self._report("Nothing to export", "No reconstruction is displayed yet.")
            return
        snap = self.reconstructions.model.current()
        window = self.reconstructions.levels if path.lower().endswith(".png") else None
        scan = self.state.scan
        ckpt = os.path.basename(self.state.checkpoint_path or "")
        desc = f"EquiDEQ reconstruction ({snap.get('label', '')})"

        def done(_r):
            self.log.add("info", f"exported reconstruction to {path}")
            self._remember_dir(path)
            if then:
                then()

        inputs = [self.state.scan_path, self.state.checkpoint_path]  # never written over, even if confirmed
        self.tasks.submit(lambda: backend.export_image(image.copy(), path, window=window, source_scan=scan,
                                                       description=desc, checkpoint_name=ckpt, inputs=inputs),
                          done, lambda exc: self._report("Export failed", exc), name="export")

    def open_config_dialog(self) -> None:
        path = self._ask_open("Open config", CONFIG_FILTER)
        if path:
            self.open_config(path)

    def open_config(self, path: str, then: Optional[Callable] = None) -> None:
        def done(cfg):
            self.set_config(cfg)
            self.state.config_path = path
            self.state.add_recent("config", path)
            self._rebuild_recent_menu()
            self._remember_dir(path)
            if then:
                then()

        self.tasks.submit(lambda: load_config(path), done, lambda exc: self._report("Cannot open config", exc),
                          name="open config")

    def save_config_dialog(self) -> None:
        path, _ = self._ask_save("Save config as", CONFIG_FILTER, "experiment.toml")
        if path:
            if not path.lower().endswith((".toml", ".yaml", ".yml")):
                path += ".toml"
            self.save_config(path)

    def save_config(self, path: str) -> None:
        cfg = self.state.config

        def done(_r):
            self.state.config_path = path
            self.state.add_recent("config", path)
            self._rebuild_recent_menu()
            self.log.add("info", f"config saved: {path}")

        self.tasks.submit(lambda: save_config(cfg, path), done, lambda exc: self._report("Cannot save config", exc),
                          name="save config")

    def open_path(self, path: str) -> None:
        kind = classify_path(path) if os.path.isfile(path) or not os.path.exists(path) else "scan"
        if kind == "checkpoint":
            self.open_checkpoint(path)
        elif kind == "config":
            if self.training.running:
                self._report("Cannot open config", "stop the training run before loading another config")
            else:
                self.open_config(path)
        else:
            self.open_scan(path)

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        for r in self.state.recent:
            act = self.recent_menu.addAction(r.label())
            act.setToolTip(r.path)
            act.triggered.connect(lambda _c=False, p=r.path: self.open_path(p))
        self.recent_menu.setEnabled(bool(self.state.recent))

    # -- drag and drop ----------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        for p in paths:
            self.open_path(p)
        event.acceptProposedAction()

    # =================================================================================
    # shutdown
    def request_shutdown(self) -> None:
        """Close without asking (SIGINT / SIGTERM / --quit-after)."""
        self._force_close = True
        self.close()

    def closeEvent(self, event) -> None:
        if self._shutdown_done:
            event.accept()
            return
        if self.training.running:
            if not self._closing and not self._force_close:
                if not self.confirm("Quit EquiDEQ Workbench",
                                    "A training run is in progress. Stop it and quit?"):
                    event.ignore()
                    return
            if not self._closing:
                self._closing = True
                self.save_settings()
                self.training.stop()
                self.status_label.setText("Stopping the run before quitting…")
                self._update_actions()
                # safety net: if the engine does not come back, finish anyway (without killing it)
                QTimer.singleShot(20000, self._finish_and_close)
            event.ignore()
            return
        if not self._closing:
            self.save_settings()
        self._closing = True
        self._finish_shutdown()
        event.accept()

    def _finish_and_close(self) -> None:
        if not self._shutdown_done:
            self._finish_shutdown()
            self.close()

    def _finish_shutdown(self) -> None:
        if self._shutdown_done:
            return
        self.plot_timer.stop()
        self.image_timer.stop()
        self.training.shutdown(30000)
        self.tasks.closed = True
        self.tasks.wait(30000)
        self._shutdown_done = True
