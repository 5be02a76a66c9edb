"""The opened scan in the viewer: its slices, its modality, whether it is training data, and
the size Reconstruct runs at.

The rules, in one place:

* an opened scan is shown at once, at its own resolution, on the middle slice;
  nothing is reconstructed until Reconstruct is asked for, and moving to another
  slice (slider, wheel, spin box) only shows that slice: the reconstruction and the
  equivariance results of another slice are marked stale, those of another scan
  are dropped;
* the scan's modality comes from the file; when the file does not say, the user is
  asked (CT or MRI) rather than a CT sinogram simulated silently. The config's
  ``physics.modality`` follows the scan's, so Reconstruct simulates the matching
  measurements (a trained model of the other modality is not used for it, and the
  log says so); switching the modality (here or in the settings) reconstructs
  again when this scan had been reconstructed;
* a scan becomes the training data only when the user ticks "use this scan as
  training data" (off for every newly opened scan), and unticking restores the
  data used before; not during a run;
* Reconstruct runs at the model's size, the scan's own or a fixed one
  (:data:`~workbench.state.SIZE_CHOICES`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from engine.errors import ConfigError
from workbench import backend
from workbench.presenters.config import ConfigPresenter
from workbench.presenters.events import PanelModels
from workbench.presenters.run import RunPresenter
from workbench.state import MODALITY_NAMES, SIZE_CHOICES, WorkbenchState, training_data_text

MODALITIES = ("ct", "mri")
MEASUREMENTS = {"ct": "a sinogram", "mri": "k-space"}


@dataclass(frozen=True)
class ScanChoices:
    """What the viewer's scan controls show."""

    has_scan: bool
    modality: str  # "ct" | "mri" | "unknown"
    modality_source: str  # "the file" | "your choice" | "the settings" | ""
    training_data: bool
    training_data_allowed: bool
    training_data_tip: str
    size: str  # one of SIZE_CHOICES
    model_size: int
    native_size: Optional[int]


def file_window(scan) -> Optional[tuple[float, float]]:
    """(center, width) HU of the display window the file recommends (DICOM WindowCenter / WindowWidth), or None."""
    metadata = dict(getattr(scan, "metadata", {}) or {})
    try:
        center, width = (float(str(metadata[key]).replace("\\", ",").split(",")[0])
                         for key in ("WindowCenter", "WindowWidth"))
    except (KeyError, ValueError):
        return None
    return (center, width) if width > 0 else None


class ScanView(Protocol):
    def show_scan(self, scan, path: str, n_slices: int, index: int) -> None: ...
    def show_scan_modality(self, text: str) -> None: ...
    def show_levels(self, levels: tuple[float, float]) -> None: ...
    def show_scan_slice(self, index: int, n_slices: int) -> None: ...
    def show_scan_choices(self, choices: ScanChoices) -> None: ...
    def ask_modality(self, name: str) -> Optional[str]: ...
    def show_model_info(self, text: str) -> None: ...
    def show_title(self, title: str) -> None: ...
    def raise_panel(self, key: str) -> None: ...
    def clear_equivariance(self) -> None: ...
    def mark_stale(self, panels: tuple, note: str) -> None: ...
    def refresh_images(self) -> None: ...
    def set_status(self, text: str) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...


class ScanPresenter:
    """``reconstruct()`` is the analysis presenter's; ``equivariance_note()`` says whether the
    equivariance panel's results are of another slice."""

    def __init__(self, view: ScanView, state: WorkbenchState, config: ConfigPresenter, run: RunPresenter,
                 panels: PanelModels, reconstruct: Callable[[], None],
                 equivariance_note: Callable[[], str] = lambda: "") -> None:
        self.view, self.state, self.config, self.run, self.panels = view, state, config, run, panels
        self.reconstruct = reconstruct
        self.equivariance_note = equivariance_note
        self._data_before: Optional[tuple] = None  # (data.source, data.paths) before a scan became the training data

    # -- opening ---------------------------------------------------------------------------------
    def opened(self, path: str, scan, slices) -> None:
        """A scan was read (``slices``: its display stack [N, S, S] in [0, 1]): show it, ask what the file
        does not say, reconstruct nothing."""
        state = self.state
        state.set_scan(path, scan, slices)
        self.panels.reconstructions.drop_other_scans(path)
        self.view.clear_equivariance()
        self.view.mark_stale(("reconstructions", "equivariance"), "")
        self.view.show_scan(scan, path, state.n_slices, state.slice_index)
        self.view.show_title(state.title())
        self.config.show_hu_range()
        self._use_file_window()
        self._show_slice()  # the scan is on screen before any question
        if state.scan_modality not in MODALITIES:
            answer = self.view.ask_modality(state.scan_name())
            if answer in MODALITIES:
                state.scan_modality, state.modality_source = answer, "your choice"
                self.config.show_hu_range()
                self._use_file_window()
                self._show_slice()
        switched = self.follow_scan_modality()
        self.show_choices()
        summary = scan.summary() if hasattr(scan, "summary") else state.scan_name()
        modality = MODALITY_NAMES.get(state.scan_modality, state.scan_modality)
        self.view.log_message("info", f"opened scan {summary}; modality {modality}"
                              + (f" (from {state.modality_source})" if state.modality_source else "")
                              + f"; shown at {state.native_size()} px. Training data: "
                              + training_data_text(state.config)
                              + (" (tick 'Use as training data' to train on this scan)"
                                 if self.can_train_on_scan() else ""))
        if state.scan_modality not in MODALITIES:
            self.view.log_message("warning", f"the modality of {state.scan_name()} is unknown: Reconstruct "
                                  f"simulates {MEASUREMENTS.get(state.config.physics.modality, 'measurements')} "
                                  "from it (choose CT or MRI in the viewer)")
        self.view.set_status(f"Opened {state.scan_name()}: slice {state.slice_index} / {state.n_slices - 1}"
                             + ("; modality switched" if switched else "") + ". Press Reconstruct (F6) to reconstruct it")
        self.view.raise_panel("info")

    def _use_file_window(self) -> None:
        """Start a CT in HU on the window its file recommends, as radiology viewers do."""
        hu, window = self.state.hu_range(), file_window(self.state.scan)
        if hu is None or window is None:
            return
        center, width = window
        low, high = (float(v) for v in backend.from_hu([center - width / 2, center + width / 2], hu))
        self.view.show_levels((low, high))
        self.view.log_message("info", f"window from the file: level {center:g} / width {width:g} HU")

    # -- slices ------------------------------------------------------------------------------------
    def choose_slice(self, index: int) -> None:
        """Show another slice at once; reconstructions and probes of the previous one become stale."""
        n = self.state.n_slices
        if not n:
            return
        index = min(max(0, int(index)), n - 1)
        if index == self.state.slice_index and self.panels.reconstructions.scan is not None:
            return
        self.state.slice_index = index
        self._show_slice()

    def step_slice(self, steps: int) -> None:
        """The wheel over an image: ``steps`` slices on (negative: back)."""
        if steps:
            self.choose_slice(self.state.slice_index + int(steps))

    def _show_slice(self) -> None:
        state = self.state
        image = state.current_slice()
        if image is None:
            return
        label = f"{state.scan_name()} \u2014 slice {state.slice_index} / {state.n_slices - 1}"
        self.panels.reconstructions.view_scan_slice(image, label, (state.scan_path, state.slice_index),
                                                    state.scan_modality)
        self.view.show_scan_slice(state.slice_index, state.n_slices)
        self.view.mark_stale(("equivariance",), self.equivariance_note())
        self.view.refresh_images()

    # -- modality ----------------------------------------------------------------------------------
    def choose_modality(self, modality: str) -> None:
        """The user says what the scan is: the config follows, and a reconstruction of it is redone."""
        if modality not in MODALITIES or self.state.scan is None or modality == self.state.scan_modality:
            return
        self.state.scan_modality, self.state.modality_source = modality, "your choice"
        self._modality_changed()

    def config_changed(self, config) -> None:
        """The settings dock changed the config: a new ``physics.modality`` is the scan's too."""
        modality = config.physics.modality
        if self.state.scan is None or modality == self.state.scan_modality or modality not in MODALITIES:
            return
        self.state.scan_modality, self.state.modality_source = modality, "the settings"
        self._modality_changed()

    def _modality_changed(self) -> None:
        self.config.show_hu_range()
        self._use_file_window()
        self.follow_scan_modality()
        self._show_slice()
        self.show_choices()
        if self._reconstructed_this_scan() and self.state.config.physics.modality == self.state.scan_modality:
            self.view.log_message("info", "modality changed: reconstructing again")
            self.reconstruct()
        else:
            self.view.set_status("Modality changed; press Reconstruct (F6) to reconstruct with it")

    def follow_scan_modality(self) -> bool:
        """Make ``physics.modality`` the scan's (also after the config was replaced); True when it changed."""
        state, modality = self.state, self.state.scan_modality
        config = state.config
        if modality not in MODALITIES or config.physics.modality == modality:
            return False
        name, scan_is = MODALITY_NAMES[config.physics.modality], MODALITY_NAMES[modality]
        if self.run.lifecycle.run_in_progress:
            self.view.log_message("warning", f"the training run is {name}: until it ends, Reconstruct simulates "
                                  f"{MEASUREMENTS[config.physics.modality]} from this {scan_is} scan")
            return False
        trained = state.trained_config()
        if trained is not None and trained.physics.modality != modality:
            self.view.log_message("warning", f"{state.trained_model_name()} reconstructs {name}: for this "
                                  f"{scan_is} scan Reconstruct uses a model built from the config (open an "
                                  f"{scan_is} checkpoint to use trained weights)")
            state.use_training_weights = False
            state.set_model(None, "")
            state.checkpoint_path = None
            self.view.show_model_info(f"untrained (from config, {scan_is})")
            self.view.show_title(state.title())
            self.run.show_actions()
        try:
            self.config.set_config(config.replace(**{"physics.modality": modality}), log=False)
        except ConfigError as exc:
            self.view.log_message("warning", str(exc))
            return False
        self.view.log_message("info", f"physics.modality = {modality}: the scan is {scan_is}, so Reconstruct "
                              f"simulates {MEASUREMENTS[modality]} from it")
        return True

    def checkpoint_opened(self) -> None:
        """A checkpoint's model is in use: say so when it reconstructs another modality than the scan's."""
        config, state = self.state.config, self.state
        if state.scan is not None and state.scan_modality in MODALITIES and \
                config.physics.modality != state.scan_modality:
            self.view.log_message("warning", f"{state.trained_model_name()} reconstructs "
                                  f"{MODALITY_NAMES[config.physics.modality]}: Reconstruct simulates "
                                  f"{MEASUREMENTS[config.physics.modality]} from this "
                                  f"{MODALITY_NAMES[state.scan_modality]} scan")
        self.show_choices()

    def _reconstructed_this_scan(self) -> bool:
        path = self.state.scan_path
        return any((snap.get("source") or (None,))[0] == path for snap in self.panels.reconstructions.snapshots)

    # -- training data --------------------------------------------------------------------------------
    def can_train_on_scan(self) -> bool:
        scan = self.state.scan
        return scan is not None and getattr(scan, "kind", "image") == "image" and \
            not self.run.lifecycle.run_in_progress

    def use_as_training_data(self, on: bool) -> None:
        """Make the scan the training data (``data.source = files``) or give the previous data back."""
        state = self.state
        if bool(on) == state.scan_is_training_data():
            return
        if not self.can_train_on_scan():
            self.view.set_status("This scan cannot become the training data now"
                                 + (" (a run is in progress)" if self.run.lifecycle.run_in_progress else ""))
            self.show_choices()
            return
        config = state.config
        try:
            if on:
                self._data_before = (config.data.source, list(config.data.paths or []))
                config = config.replace(**{"data.source": "files", "data.paths": [os.path.abspath(state.scan_path)]})
            else:
                source, paths = self._data_before or ("phantom", [])
                config = config.replace(**{"data.source": source, "data.paths": paths})
        except ConfigError as exc:
            self.view.report_error("Cannot use this scan as training data", exc)
            self.show_choices()
            return
        self.config.set_config(config, log=False)
        self.view.log_message("info", f"training data: {training_data_text(config)}")
        self.view.set_status(f"Train will use {training_data_text(config)}")
        self.show_choices()

    # -- size ----------------------------------------------------------------------------------------
    def choose_size(self, choice: str) -> None:
        if choice not in SIZE_CHOICES or choice == self.state.reconstruct_size:
            return
        self.state.reconstruct_size = choice
        self.view.set_status(f"Reconstruct runs at {self._size_words()}: press Reconstruct (F6)")
        self.show_choices()

    def _size_words(self) -> str:
        choice, state = self.state.reconstruct_size, self.state
        if choice == "model":
            return f"the model's size ({state.config.physics.img_size} px)"
        if choice == "native":
            return f"the scan's own size ({state.native_size()} px)" if state.native_size() else \
                "the scan's own size (no scan open: the model's)"
        return f"{choice} px"

    # -- the controls ---------------------------------------------------------------------------------
    def show_choices(self) -> None:
        state = self.state
        if state.scan is not None:
            file_says = str(getattr(state.scan, "modality", "unknown"))
            shown = MODALITY_NAMES.get(state.scan_modality, state.scan_modality)
            self.view.show_scan_modality(shown if state.modality_source == "the file" else
                                         f"{shown} ({state.modality_source or 'not chosen'}; the file says "
                                         f"{MODALITY_NAMES.get(file_says, file_says)})")
        allowed = self.can_train_on_scan()
        if state.scan is None:
            tip = "Open a 2D image scan first"
        elif self.run.lifecycle.run_in_progress:
            tip = "Not while a training run is in progress"
        elif not allowed:
            tip = "Only image scans can be training data (this file holds measurements)"
        else:
            tip = ("Train on this scan's slices (data.source = files); unticked, Train uses "
                   + (training_data_text(state.config) if not state.scan_is_training_data() else "the previous data"))
        self.view.show_scan_choices(ScanChoices(
            has_scan=state.scan is not None, modality=state.scan_modality, modality_source=state.modality_source,
            training_data=state.scan_is_training_data(), training_data_allowed=allowed, training_data_tip=tip,
            size=state.reconstruct_size, model_size=int(state.config.physics.img_size),
            native_size=state.native_size()))
