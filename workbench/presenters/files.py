"""Opening and saving files: scans, checkpoints, configs, exported reconstructions.

The rules, in one place:

* a dropped or recent path is a checkpoint or a config by its suffix
  (:func:`~workbench.state.classify_path`), a folder is a run directory when it
  holds a run's config or metrics (opened by
  :mod:`~workbench.presenters.run_record`), else a DICOM series, anything else
  a scan;
* an opened scan is shown at once and handed to the scan presenter
  (:mod:`~workbench.presenters.scan`: modality, slices, training data); it is
  reconstructed only when asked, and becomes the training data only when the
  user says so;
* opening a checkpoint makes its model the one Reconstruct uses and, while no
  run is in progress, its config the current one (keeping opened scan files
  as the data when the checkpoint was trained on phantoms);
* a config can only be opened while no run is in progress;
* saving a checkpoint saves the latest run's state (a command the training
  thread executes between steps) or copies the opened checkpoint; no save
  ever writes over the opened scan or checkpoint;
* every file opened or saved goes to the recent files, and its folder is where
  the next dialog starts.

Reading and writing run on the task runner; the state changes only in
``on_done``, so a failed operation leaves it as it was.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Optional, Protocol

import numpy as np

from engine.config import load_config, save_config
from engine.errors import ConfigError, EquiDEQError
from engine.run_record import is_run_dir
from workbench import backend
from workbench.jobs import Job
from workbench.panels.reconstructions_model import ReconstructionsModel
from workbench.presenters.config import ConfigPresenter
from workbench.presenters.run import RunPresenter
from workbench.presenters.scan import ScanPresenter
from workbench.presenters.settings import SettingsPresenter
from workbench.state import CHECKPOINT_SUFFIXES, CONFIG_SUFFIXES, WorkbenchState, classify_path


def _patterns(suffixes) -> str:
    return " ".join(f"*{s}" for s in suffixes)


SCAN_FILTER = ("Scans (*.dcm *.dicom *.ima *.h5 *.hdf5 *.hdf *.npy *.npz *.png *.tif *.tiff *.jpg *.jpeg *.bmp "
               "*.nii *.nii.gz *.inv3);;DICOM (*.dcm *.dicom *.ima);;HDF5 (*.h5 *.hdf5);;NumPy (*.npy *.npz);;"
               "Images (*.png *.tif *.tiff);;NIfTI (*.nii *.nii.gz);;All files (*)")
CHECKPOINT_FILTER = f"Checkpoints ({_patterns(CHECKPOINT_SUFFIXES)});;All files (*)"
CONFIG_FILTER = f"Configs ({_patterns(CONFIG_SUFFIXES)});;All files (*)"
EXPORT_FILTER = "PNG image, current window (*.png);;NumPy array (*.npy);;DICOM (*.dcm);;HDF5 (*.h5)"
EXPORT_SUFFIXES = {"PNG": ".png", "NumPy": ".npy", "DICOM": ".dcm", "HDF5": ".h5"}  # filter name -> suffix


def kind_of_path(path: str) -> str:
    """'checkpoint', 'config', 'run' or 'scan' for a path to open (a folder: a run directory or a DICOM series)."""
    if os.path.isdir(path):
        return "run" if is_run_dir(path) else "scan"
    return classify_path(path)


def export_path(path: str, chosen_filter: str) -> str:
    """``path`` with the suffix of the chosen export filter when the user typed none (PNG by default)."""
    if os.path.splitext(path)[1]:
        return path
    return path + next((v for k, v in EXPORT_SUFFIXES.items() if chosen_filter.startswith(k)), ".png")


class FilesView(Protocol):
    def ask_open_file(self, title: str, file_filter: str, start: str) -> str: ...
    def ask_folder(self, title: str, start: str) -> str: ...
    def ask_save_file(self, title: str, file_filter: str, start: str) -> tuple[str, str]: ...
    def confirm(self, title: str, question: str) -> bool: ...
    def show_recent(self, recent: list) -> None: ...
    def show_title(self, title: str) -> None: ...
    def show_model_info(self, text: str) -> None: ...
    def raise_panel(self, key: str) -> None: ...
    def clear_equivariance(self) -> None: ...
    def displayed_levels(self) -> tuple[float, float]: ...
    def set_status(self, text: str) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...
    def show_busy(self, job: Job) -> None: ...


class FilesPresenter:
    """File > Open / Save / Export, recent files and drops.

    ``reconstruct(then)`` is called after a checkpoint has been opened; an opened
    scan goes to ``scans`` (shown, not reconstructed); ``displayed`` is the
    reconstructions panel's model (what Export writes).
    """

    def __init__(self, view: FilesView, state: WorkbenchState, tasks, settings: SettingsPresenter,
                 config: ConfigPresenter, run: RunPresenter, reconstruct: Callable[[Optional[Callable]], None],
                 displayed: ReconstructionsModel, scans: ScanPresenter) -> None:
        self.view, self.state, self.tasks = view, state, tasks
        self.settings, self.config, self.run = settings, config, run
        self.reconstruct = reconstruct
        self.displayed = displayed
        self.scans = scans
        self.runs = None  # presenters.run_record.RunRecordPresenter: opens run directories
        #: called when the user opens a scan, checkpoint or config (a run followed stops)
        self.opening_listeners: list[Callable[[], None]] = []

    def _opening(self) -> None:
        for listener in list(self.opening_listeners):
            listener()

    def remember(self, kind: str, path: str) -> None:
        self.state.add_recent(kind, path)
        self.settings.remember_dir(path)
        self.view.show_recent(self.state.recent)

    def _ask_open(self, title: str, file_filter: str, then: Callable[[str], None]) -> None:
        path = self.view.ask_open_file(title, file_filter, self.settings.last_dir())
        if path:
            then(path)

    def _ask_save(self, title: str, file_filter: str, name: str) -> tuple[str, str]:
        return self.view.ask_save_file(title, file_filter, os.path.join(self.settings.last_dir(), name))

    # -- what to open -------------------------------------------------------------------------
    def open_path(self, path: str) -> None:
        """A dropped or recent file: open it as what it is."""
        kind = kind_of_path(path)
        if kind == "run" and self.runs is not None:
            self.runs.open_run(path)
        elif kind == "checkpoint":
            self.open_checkpoint(path)
        elif kind == "config":
            if self.run.lifecycle.run_in_progress:
                self.view.report_error("Cannot open config", "stop the training run before loading another config")
            else:
                self.open_config(path)
        else:
            self.open_scan(path)

    # -- scans ---------------------------------------------------------------------------------
    def open_scan_dialog(self) -> None:
        self._ask_open("Open scan", SCAN_FILTER, self.open_scan)

    def open_folder_dialog(self) -> None:
        path = self.view.ask_folder("Open DICOM series folder", self.settings.last_dir())
        if path:
            self.open_scan(path)

    def open_scan(self, path: str, then: Optional[Callable] = None) -> None:
        """Read a scan and show it at its own resolution; ``then()`` runs once it is shown.

        Cancelling lets the reader finish (a file read cannot stop half-way) and drops what it read.
        """
        self._opening()
        window = self.state.data_window()
        name = os.path.basename(str(path).rstrip("/")) or str(path)
        job = Job(f"Opening {name}")

        def task():
            scan = backend.load_scan(path)
            job.check()
            return scan, backend.prepare_slices(scan, backend.display_size(scan), window=window)

        def done(result):
            scan, slices = result
            self.remember("scan", path)
            self.scans.opened(path, scan, np.asarray(slices, dtype=np.float32))
            if then:
                then()

        def cancelled():
            self.view.set_status(f"Opening {name} cancelled")
            self.view.log_message("info", f"opening {name} cancelled")

        self.view.set_status(f"Opening {name}…")
        self.view.show_busy(job)
        # a newer scan replaces one still loading, unless a caller waits for this one (then)
        self.tasks.submit(task, done, lambda exc: self.view.report_error("Cannot open scan", exc), name="open scan",
                          supersede=then is None, job=job, on_cancel=cancelled)

    # -- checkpoints -------------------------------------------------------------------------------
    def open_checkpoint_dialog(self) -> None:
        self._ask_open("Open checkpoint", CHECKPOINT_FILTER, self.open_checkpoint)

    def open_checkpoint(self, path: str, then: Optional[Callable] = None) -> None:
        self._opening()
        name = os.path.basename(path)

        def done(model):
            self.state.set_model(model, "checkpoint", os.path.abspath(path))
            self.state.use_training_weights = False
            self.remember("checkpoint", path)
            cfg = getattr(model, "config", None)
            if cfg is not None and not self.run.lifecycle.run_in_progress:
                if self.state.scan is not None and cfg.data.source == "phantom" and \
                        self.state.config.data.source == "files":
                    try:
                        cfg = cfg.replace(**{"data.source": "files", "data.paths": list(self.state.config.data.paths)})
                    except ConfigError:
                        pass
                self.config.set_config(cfg, log=False)
            self.view.show_model_info(f"checkpoint {name}")
            self.view.show_title(self.state.title())
            self.view.log_message("info", f"opened checkpoint {name}")
            self.run.show_actions()
            self.view.clear_equivariance()
            self.scans.checkpoint_opened()
            self.reconstruct(then)

        job = Job(f"Opening {name}")
        self.view.set_status(f"Opening {name}…")
        self.view.show_busy(job)
        self.tasks.submit(lambda: backend.load_model(path), done,
                          lambda exc: self.view.report_error("Cannot open checkpoint", exc), name="open checkpoint",
                          job=job, on_cancel=lambda: self.view.set_status(f"Opening {name} cancelled"))

    def save_checkpoint_dialog(self) -> None:
        path, _ = self._ask_save("Save checkpoint as", CHECKPOINT_FILTER, "model.pt")
        if path:
            self.save_checkpoint(path)

    def save_checkpoint(self, path: str, then: Optional[Callable] = None) -> None:
        run = self.run.training_commands()
        source = self.state.checkpoint_path
        scan_path = self.state.scan_path

        def job():
            backend.check_output_file(path, [scan_path])  # the dialog asked about replacing
            if run is not None:
                run.save_checkpoint(path)  # captured by the training thread between steps
            elif source and os.path.abspath(source) != os.path.abspath(path):
                shutil.copyfile(source, path)
            elif not source:
                raise EquiDEQError("nothing to save yet: train a model or open a checkpoint first")
            return path

        def done(saved):
            self.remember("checkpoint", saved)
            self.view.log_message("info", f"checkpoint saved: {saved}")
            if then:
                then()

        self.tasks.submit(job, done, lambda exc: self.view.report_error("Cannot save checkpoint", exc),
                          name="save checkpoint")

    # -- export ------------------------------------------------------------------------------------
    def export_dialog(self) -> None:
        if self.displayed.current_image() is None:
            self.view.report_error("Nothing to export",
                                   "No reconstruction is displayed yet: press Train or Reconstruct first.")
            return
        path, chosen = self._ask_save("Export reconstruction", EXPORT_FILTER, "reconstruction.png")
        if not path:
            return
        full = export_path(path, chosen)
        # the dialog confirmed the name without the suffix, not this file
        if full != path and os.path.exists(full) and not self.view.confirm("Replace file?",
                                                                          f"{full} exists. Replace it?"):
            return
        self.export_reconstruction(full)

    def export_reconstruction(self, path: str, then: Optional[Callable] = None) -> None:
        image = self.displayed.current_image()
        if image is None:
            self.view.report_error("Nothing to export", "No reconstruction is displayed yet.")
            return
        snap = self.displayed.current()
        levels = self.view.displayed_levels()
        # a reconstruction of the opened scan keeps its lineage (slice, geometry) and, for CT in HU, its units
        of_scan = snap.get("source") is not None and snap["source"][0] == self.state.scan_path
        scan, source_slice = (self.state.scan, snap["source"][1]) if of_scan else (None, None)
        hu = self.state.hu_range() if of_scan else None
        if hu is not None:
            image = backend.to_hu(image, hu).astype(np.float32)
            levels = tuple(float(v) for v in backend.to_hu(np.asarray(levels, dtype=np.float64), hu))
        window = levels  # applied to a PNG, recorded by the other formats (DICOM: WindowCenter / WindowWidth)
        units = "HU" if hu is not None else None
        checkpoint_name = os.path.basename(self.state.checkpoint_path or "")
        description = f"EquiDEQ reconstruction ({snap.get('label', '')})"
        inputs = [self.state.scan_path, self.state.checkpoint_path]  # never written over, even if confirmed

        def done(_result):
            self.view.log_message("info", f"exported reconstruction to {path}")
            self.settings.remember_dir(path)
            if then:
                then()

        self.tasks.submit(lambda: backend.export_image(image.copy(), path, window=window, source_scan=scan,
                                                       source_slice=source_slice, units=units,
                                                       description=description, checkpoint_name=checkpoint_name,
                                                       inputs=inputs),
                          done, lambda exc: self.view.report_error("Export failed", exc), name="export")

    # -- configs -----------------------------------------------------------------------------------
    def open_config_dialog(self) -> None:
        self._ask_open("Open config", CONFIG_FILTER, self.open_config)

    def open_config(self, path: str, then: Optional[Callable] = None) -> None:
        self._opening()

        def done(cfg):
            self.config.set_config(cfg)
            self.state.config_path = path
            self.remember("config", path)
            if then:
                then()

        self.tasks.submit(lambda: load_config(path), done,
                          lambda exc: self.view.report_error("Cannot open config", exc), name="open config")

    def save_config_dialog(self) -> None:
        path, _ = self._ask_save("Save config as", CONFIG_FILTER, "experiment.toml")
        if path:
            self.save_config(path if path.lower().endswith(CONFIG_SUFFIXES) else path + ".toml")

    def save_config(self, path: str) -> None:
        cfg = self.state.config

        def done(_result):
            self.state.config_path = path
            self.remember("config", path)
            self.view.log_message("info", f"config saved: {path}")

        self.tasks.submit(lambda: save_config(cfg, path), done,
                          lambda exc: self.view.report_error("Cannot save config", exc), name="save config")
