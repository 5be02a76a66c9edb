"""The reconstructions' data: snapshots (training or Reconstruct), the snapshot shown,
per-view metrics, |difference| images and window presets. Qt-free.

A snapshot is a dict of 2D display arrays (measurement, baseline, reconstruction,
reference, mask) plus step, label and modality. :func:`snapshot_from_result` is
the only place in the workbench that reads an engine reconstruction result.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from workbench import backend

VIEWS = ("measurement", "baseline", "reconstruction", "reference", "difference")
TITLES = {
    "measurement": "Measurement y",
    "baseline": "Baseline A\u2020y",
    "reconstruction": "DEQ reconstruction",
    "reference": "Ground truth",
    "difference": "|DEQ \u2212 truth|",
}
LINKED_LEVELS = ("baseline", "reconstruction", "reference")
MAX_SNAPSHOTS = 200
FULL = "full range [0, 1]"
AUTO = "auto (data range)"
COLORMAPS = ("grey", "viridis", "inferno", "magma", "plasma", "CET-L4")


def _squeeze(arr) -> Optional[np.ndarray]:
    """First image of a batch, as a float32 2D array (None stays None)."""
    if arr is None:
        return None
    a = np.asarray(arr)
    while a.ndim > 2:
        a = a[0]
    if np.iscomplexobj(a):
        a = np.abs(a)
    return a.astype(np.float32, copy=False)


def snapshot_from_event(event) -> dict:
    return {
        "step": int(event.step),
        "label": f"step {int(event.step)}",
        "measurement": _squeeze(event.measurement),
        "baseline": _squeeze(event.baseline),
        "reconstruction": _squeeze(event.reconstruction),
        "reference": _squeeze(event.reference),
        "mask": _squeeze(event.mask),
        "modality": str(event.modality),
    }


def snapshot_from_result(result, label: str = "reconstruction") -> tuple[dict, Any]:
    """The display snapshot of an ``engine.evaluation.Reconstruction`` and its forward-solve statistics (or None).

    The one place that reads a reconstruction result.
    """
    snap = {
        "step": None,
        "label": label,
        "measurement": _squeeze(result.measurement),
        "baseline": _squeeze(result.baseline),
        "reconstruction": _squeeze(result.reconstruction),
        "reference": _squeeze(result.reference),
        "mask": _squeeze(result.mask),
        "modality": str(result.modality),
    }
    return snap, result.forward_stats


def difference(snap: dict) -> tuple[Optional[np.ndarray], str]:
    """|reconstruction - reference| (or - baseline when there is no reference) for display."""
    rec = snap.get("reconstruction")
    if rec is None:
        return None, TITLES["difference"]
    ref = snap.get("reference")
    if ref is not None and ref.shape == rec.shape:
        return np.abs(rec - ref), "|DEQ \u2212 truth|"
    base = snap.get("baseline")
    if base is not None and base.shape == rec.shape:
        return np.abs(rec - base), "|DEQ \u2212 baseline|"
    return None, TITLES["difference"]


def preset_levels(preset: str, hu_range: Optional[tuple] = None, windows: Optional[dict] = None):
    """Display levels for a window preset.

    ``hu_range`` = the (low, high) HU that the displayed [0, 1] corresponds to,
    when the data came from a CT scan in HU; otherwise [0, 1] equivalents are used.
    Returns None for auto levels.
    """
    if preset == AUTO:
        return None
    if preset == FULL:
        return (0.0, 1.0)
    windows = windows if windows is not None else backend.ct_windows()
    if hu_range is not None and preset in windows and hu_range[1] > hu_range[0]:
        lo, hi = windows[preset]
        a, b = float(hu_range[0]), float(hu_range[1])
        return ((lo - a) / (b - a), (hi - a) / (b - a))
    return backend.unit_windows().get(preset, (0.0, 1.0))


class ReconstructionsModel:
    """The snapshots (the first kept, then the newest MAX_SNAPSHOTS), the one shown, and metrics per snapshot."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []
        self.index = -1
        self.follow = True
        self.version = 0
        self._metrics: dict = {}

    def clear(self) -> None:
        self.__init__()

    def add_event(self, event) -> None:
        """A training Snapshot event."""
        self.add(snapshot_from_event(event))

    def add(self, snap: dict) -> None:
        self.snapshots.append(snap)
        if len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[1: 1 + len(self.snapshots) - MAX_SNAPSHOTS]  # keep the very first
        if self.follow or self.index < 0:
            self.index = len(self.snapshots) - 1
        self.version += 1

    def select(self, index: int) -> None:
        if not self.snapshots:
            return
        index = min(max(0, int(index)), len(self.snapshots) - 1)
        self.follow = index == len(self.snapshots) - 1
        if index != self.index:
            self.index = index
            self.version += 1

    def current(self) -> Optional[dict]:
        if 0 <= self.index < len(self.snapshots):
            return self.snapshots[self.index]
        return None

    def current_image(self, view: str = "reconstruction") -> Optional[np.ndarray]:
        snap = self.current()
        return None if snap is None else snap.get(view)

    def metrics(self, snap: dict) -> Optional[dict]:
        """view -> (psnr, ssim) against the reference, or None while not computed."""
        return self._metrics.get(id(snap))

    def metrics_jobs(self, snap: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(view, image, reference) pairs whose metrics the engine should compute."""
        ref = snap.get("reference")
        if ref is None:
            return []
        return [(v, snap[v], ref) for v in ("baseline", "reconstruction")
                if snap.get(v) is not None and snap[v].shape == ref.shape]

    def set_metrics(self, snap: dict, values: dict) -> None:
        self._metrics[id(snap)] = values
        if snap is self.current():
            self.version += 1
