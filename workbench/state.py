"""What the main window currently holds: Qt-free, so it can be tested without a screen.

The window keeps exactly one of each: the config being edited, the scan that
was opened (and its display-ready slices), the checkpoint / model in use, the
run directory of the last run and the recent-files list. Failed operations
never touch this object, so "the previous state stays intact" is a property of
only assigning to it after an operation succeeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.config import CHECKPOINT_SUFFIXES, CONFIG_SUFFIXES, ExperimentConfig, builtin_config

DEFAULT_CONFIG = "ct_phantom_quick"
MAX_RECENT = 10
#: the sizes Reconstruct offers: the model's own, the scan's own, or a fixed one
SIZE_CHOICES = ("model", "native", "128", "256", "512")
MODALITY_NAMES = {"ct": "CT", "mri": "MRI", "unknown": "unknown"}


def default_config() -> ExperimentConfig:
    """The embedded default: the built-in quick phantom CT config (or plain defaults)."""
    try:
        return builtin_config(DEFAULT_CONFIG)
    except Exception:  # resources missing in a partial checkout: fall back to defaults
        return ExperimentConfig()


def classify_path(path: str) -> str:
    """'checkpoint', 'config' or 'scan' for a dropped / recent file."""
    low = str(path).lower()
    if low.endswith(CHECKPOINT_SUFFIXES):
        return "checkpoint"
    if low.endswith(CONFIG_SUFFIXES):
        return "config"
    return "scan"


def reconstruction_size(choice: str, model_size: int, native_size: Optional[int]) -> int:
    """The image size a reconstruction runs at for a :data:`SIZE_CHOICES` entry."""
    if choice == "native":
        return int(native_size or model_size)
    if choice.isdigit():
        return int(choice)
    return int(model_size)


def training_data_text(config: ExperimentConfig) -> str:
    """What Train trains on, in words: "built-in phantom CT images (ellipses, 64 px)" or the files."""
    data, physics = config.data, config.physics
    modality = MODALITY_NAMES.get(physics.modality, physics.modality)
    if data.source == "files" and data.paths:
        names = ", ".join(os.path.basename(str(p).rstrip("/")) for p in data.paths)
        return f"{names} (simulated {modality} measurements, {physics.img_size} px)"
    return f"built-in phantom {modality} images ({getattr(data, 'phantom', 'phantoms')}, {physics.img_size} px)"


@dataclass
class RecentFile:
    kind: str  # "scan" | "checkpoint" | "config" | "run"
    path: str

    def label(self) -> str:
        return f"{os.path.basename(self.path.rstrip('/')) or self.path}  ({self.kind})"


@dataclass
class WorkbenchState:
    config: ExperimentConfig = field(default_factory=default_config)
    config_path: Optional[str] = None
    scan: Any = None  # engine.data.scans.Scan
    scan_path: Optional[str] = None
    slices: Any = None  # np.ndarray [N, S, S] in [0, 1]: the scan's slices as displayed, S its own size
    slice_index: int = 0
    scan_modality: str = "unknown"  # "ct" | "mri" | "unknown": from the file, or asked
    modality_source: str = ""  # "the file" | "your choice" | "the settings"
    reconstruct_size: str = "model"  # one of SIZE_CHOICES
    checkpoint_path: Optional[str] = None
    model: Any = None  # engine.inference.LoadedModel
    model_source: str = ""  # "checkpoint" | "config" | ""
    # Reconstruct / equivariance / Save checkpoint use the weights of the latest training
    # run (set by Train, cleared by opening a checkpoint); ``model`` otherwise.
    use_training_weights: bool = False
    run_dir: Optional[str] = None
    run_config: Optional[ExperimentConfig] = None  # the config of the latest training run (set by Train)
    recent: list = field(default_factory=list)
    # settings fields the dock refused (dotted key -> message); they block Train / Reconstruct until corrected
    invalid_settings: dict = field(default_factory=dict)

    # -- recent files ------------------------------------------------------------------
    def add_recent(self, kind: str, path: str) -> None:
        path = os.path.abspath(path)
        self.recent = [r for r in self.recent if r.path != path]
        self.recent.insert(0, RecentFile(kind, path))
        del self.recent[MAX_RECENT:]

    def recent_as_list(self) -> list:
        return [[r.kind, r.path] for r in self.recent]

    def recent_from_list(self, items) -> None:
        out = []
        for item in items or []:
            try:
                kind, path = item[0], item[1]
            except (TypeError, IndexError, KeyError):
                continue
            if kind in ("scan", "checkpoint", "config", "run") and isinstance(path, str) and path:
                out.append(RecentFile(kind, path))
        self.recent = out[:MAX_RECENT]

    # -- the current input image for reconstruction / equivariance ----------------------
    def current_slice(self):
        """The display-ready slice [H, W] chosen in the info panel, or None without a scan."""
        if self.slices is None or len(self.slices) == 0:
            return None
        i = min(max(0, int(self.slice_index)), len(self.slices) - 1)
        return self.slices[i]

    def data_window(self) -> Optional[tuple]:
        """The config's HU window (low, high) for scans, or None for prepare_slices' automatic one."""
        window = list(self.config.data.window or [])
        return tuple(window) if len(window) == 2 else None

    def hu_range(self) -> Optional[tuple]:
        """The (low, high) HU that displayed [0, 1] stands for: only for a CT scan in HU."""
        if self.scan is None or self.scan_modality != "ct":
            return None
        from workbench import backend  # engine.data.intensity: no torch

        return backend.scan_hu_window(self.scan, self.data_window())

    def set_scan(self, path: str, scan, slices) -> None:
        self.scan, self.scan_path, self.slices = scan, path, slices
        n = 0 if slices is None else len(slices)
        self.slice_index = n // 2 if n else 0
        self.scan_modality = str(getattr(scan, "modality", "unknown") or "unknown")
        self.modality_source = "the file" if self.scan_modality != "unknown" else ""

    @property
    def n_slices(self) -> int:
        return 0 if self.slices is None else len(self.slices)

    def native_size(self) -> Optional[int]:
        """The side of the displayed slices (the scan's own resolution), or None without a scan."""
        return None if self.slices is None else int(self.slices.shape[-1])

    def scan_name(self) -> str:
        return os.path.basename(self.scan_path.rstrip("/")) if self.scan_path else ""

    def scan_is_training_data(self) -> bool:
        data = self.config.data
        return bool(self.scan_path) and data.source == "files" and \
            os.path.abspath(self.scan_path) in [os.path.abspath(p) for p in data.paths or []]

    def set_model(self, model, source: str, checkpoint_path: Optional[str] = None) -> None:
        self.model, self.model_source = model, source
        if checkpoint_path is not None:
            self.checkpoint_path = checkpoint_path

    def trained_config(self) -> Optional[ExperimentConfig]:
        """The config the weights Reconstruct uses were trained with; None for a model built from the config."""
        if self.use_training_weights:
            return self.run_config
        if self.model_source == "checkpoint":
            return getattr(self.model, "config", None)
        return None

    def trained_model_name(self) -> str:
        if self.use_training_weights:
            return "this session's training run"
        return f"checkpoint {os.path.basename(self.checkpoint_path or '')}"

    def title(self) -> str:
        parts = ["EquiDEQ Workbench"]
        if self.scan_path:
            parts.append(os.path.basename(self.scan_path.rstrip("/")))
        if self.checkpoint_path:
            parts.append(os.path.basename(self.checkpoint_path))
        return " — ".join(parts)
