"""The reconstructions' data: snapshots (training or Reconstruct), the snapshot shown,
per-view metrics, |difference| images and window presets, and the scan slice the
viewer is on. Qt-free.

A snapshot is a dict of 2D display arrays (measurement, baseline, reconstruction,
reference, mask) plus step, label and modality; a Reconstruct's also has
``source`` = (scan path, slice index), so that it is marked stale when the viewer
moves to another slice and dropped when another scan is opened.
:func:`snapshot_from_result` is the only place in the workbench that reads an
engine reconstruction result.

The panel has two pages: ``"scan"`` (the opened scan's slice at its own
resolution, for browsing) and ``"comparison"`` (the five views of a snapshot).
Opening a scan or moving to another slice shows the scan page; a new snapshot
shows the comparison page.
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
CUSTOM = "custom"  # levels set by a drag or taken from the file: kept as they are
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
    Returns None for auto levels and "keep" for :data:`CUSTOM` (the levels stay as they are).
    """
    if preset == AUTO:
        return None
    if preset == CUSTOM:
        return "keep"
    if preset == FULL:
        return (0.0, 1.0)
    windows = windows if windows is not None else backend.ct_windows()
    if hu_range is not None and preset in windows and hu_range[1] > hu_range[0]:
        lo, hi = windows[preset]
        a, b = float(hu_range[0]), float(hu_range[1])
        return ((lo - a) / (b - a), (hi - a) / (b - a))
    return backend.unit_windows().get(preset, (0.0, 1.0))


class ReconstructionsModel:
    """The snapshots (the first kept, then the newest MAX_SNAPSHOTS), the one shown, metrics per
    snapshot, and the scan slice being viewed."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []
        self.index = -1
        self.follow = True
        self.version = 0
        self._metrics: dict = {}
        self.page = "comparison"
        self.scan: Optional[dict] = None  # {"image", "label", "source", "modality"} of the slice being viewed
        self.scan_version = 0

    def clear(self) -> None:
        """Forget the snapshots (a new run); the scan slice being viewed stays."""
        scan, scan_version, page = self.scan, self.scan_version, self.page
        self.__init__()
        self.scan, self.scan_version = scan, scan_version
        self.page = page if scan is not None else "comparison"

    # -- the scan being viewed ------------------------------------------------------------------
    def view_scan_slice(self, image: np.ndarray, label: str, source: tuple, modality: str = "") -> None:
        """Show a scan's slice (display [0, 1] scale) on the scan page; marks snapshots of other slices stale."""
        self.scan = {"image": image, "label": label, "source": tuple(source), "modality": modality}
        self.scan_version += 1
        self.version += 1  # the comparison page's stale mark may change
        self.page = "scan"

    def forget_scan(self) -> None:
        self.scan = None
        self.scan_version += 1
        self.page = "comparison"

    @property
    def viewing(self) -> Optional[tuple]:
        """(scan path, slice index) being viewed, or None."""
        return None if self.scan is None else self.scan["source"]

    def drop_other_scans(self, path: str) -> None:
        """Remove the reconstructions of any scan but ``path`` (training snapshots stay)."""
        keep = [s for s in self.snapshots if s.get("source") is None or s["source"][0] == path]
        if len(keep) != len(self.snapshots):
            current = self.current()
            self.snapshots = keep
            self.index = next((i for i, snap in enumerate(keep) if snap is current), len(keep) - 1)
            self.version += 1

    def stale_note(self, snap: Optional[dict]) -> str:
        """"" when ``snap`` shows what is viewed; else why it is stale (another slice of the scan)."""
        if snap is None or snap.get("source") is None or self.viewing is None:
            return ""
        if snap["source"] == self.viewing:
            return ""
        index, viewed = snap["source"][1], self.viewing[1]
        return f"stale: reconstructed from slice {index}, viewing slice {viewed}"

    def set_page(self, page: str) -> None:
        if page in ("scan", "comparison") and page != self.page:
            self.page = page
            self.version += 1

    def add_event(self, event) -> None:
        """A training Snapshot event."""
        self.add(snapshot_from_event(event))

    def add(self, snap: dict) -> None:
        self.page = "comparison"
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
