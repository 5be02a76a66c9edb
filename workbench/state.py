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


@dataclass
class RecentFile:
    kind: str  # "scan" | "checkpoint" | "config"
    path: str

    def label(self) -> str:
        return f"{os.path.basename(self.path.rstrip('/')) or self.path}  ({self.kind})"


@dataclass
class WorkbenchState:
    config: ExperimentConfig = field(default_factory=default_config)
    config_path: Optional[str] = None
    scan: Any = None  # engine.data.scans.Scan
    scan_path: Optional[str] = None
    slices: Any = None  # np.ndarray [N, size, size] in [0, 1]
    slice_index: int = 0
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
            if kind in ("scan", "checkpoint", "config") and isinstance(path, str) and path:
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
        """The config's HU window (low, high) for scans, or None for the scan's own range."""
        window = list(self.config.data.window or [])
        return tuple(window) if len(window) == 2 else None

    def hu_range(self) -> Optional[tuple]:
        """The HU range that displayed [0, 1] stands for: only for a CT scan in HU."""
        scan = self.scan
        if scan is not None and getattr(scan, "units", "") == "HU" and getattr(scan, "modality", "") == "ct":
            return self.data_window()
        return None

    def set_scan(self, path: str, scan, slices) -> None:
        self.scan, self.scan_path, self.slices = scan, path, slices
        n = 0 if slices is None else len(slices)
        self.slice_index = n // 2 if n else 0

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
