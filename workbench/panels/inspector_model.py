"""The Solver Inspector's data: which recorded solve is open, the frame and sample shown,
its measurements and diagnoses, and the replays to compare. Qt-free.

A :class:`SolveSource` is a group of recorded solves that ran with one model state:
the solves of one training step (with the weights that step started from) or the
forward solve of one Reconstruct (with the weights of the model that ran it). The
model chooses one of its recordings (an ``engine.diagnostics.SolveRecording``) and
one sample of it, and turns the stored frames into display arrays; it computes
nothing heavier than a slice of those arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from engine.solver_names import CONVERGED, DIVERGED, MAX_ITERATIONS, NON_FINITE, SOLVER_NAMES
from workbench.panels.residuals_model import REASON_LABELS

REPLAY_SOLVERS = SOLVER_NAMES  # fixed_point, anderson, broyden
_FAILURE_RANK = {NON_FINITE: 3, DIVERGED: 2, MAX_ITERATIONS: 1}


@dataclass
class SolveSource:
    """Recorded solves sharing one model state (see the module docstring)."""

    label: str  # "step 3" / "Reconstruct: slice 4 of head.dcm"
    recordings: list  # engine.diagnostics.SolveRecording, in call order
    weights: dict  # the model's state_dict (CPU copies) the solves ran with
    config: Any  # the ExperimentConfig that builds that model (its solver / step settings as they ran)
    step: Optional[int] = None  # the training step; None for a reconstruction
    failed: bool = False
    message: str = ""

    @property
    def training(self) -> bool:
        return self.step is not None

    def find(self, direction: Optional[str], tag: Optional[str]) -> Optional[int]:
        """Index of the recording with this direction and tag (either may be None: any)."""
        for i, rec in enumerate(self.recordings):
            if (direction is None or rec.direction == direction) and (not tag or rec.tag == tag):
                return i
        return None

    def worst(self) -> int:
        """Index of the recording that failed worst (the first failed one), else 0."""
        scores = [max((_FAILURE_RANK.get(r, 0) for r in rec.stop_reasons), default=0) for rec in self.recordings]
        return int(np.argmax(scores)) if scores else 0


@dataclass
class ReplaySettings:
    """The solver settings a replay changes (``engine.config.SolverConfig`` fields)."""

    name: str = "anderson"
    memory: int = 5
    damping: float = 1.0
    tol: float = 1e-3
    max_iter: int = 40

    @classmethod
    def of(cls, options: dict) -> "ReplaySettings":
        """The settings a recording ran with (its ``options``)."""
        d = cls()
        return cls(name=str(options.get("name", d.name)), memory=int(options.get("memory", d.memory)),
                   damping=float(options.get("damping", d.damping)), tol=float(options.get("tol", d.tol)),
                   max_iter=int(options.get("max_iter", d.max_iter)))

    def changes(self) -> dict:
        return {"name": self.name, "memory": int(self.memory), "damping": float(self.damping),
                "tol": float(self.tol), "max_iter": int(self.max_iter)}

    def label(self) -> str:
        memory = f" m{self.memory}" if self.name != "fixed_point" else ""
        return f"{self.name}{memory} damping {self.damping:g} tol {self.tol:g} max {self.max_iter}"

    def difference(self, base: "ReplaySettings") -> str:
        """What differs from ``base`` (the recorded settings), short: ``anderson m5, damping 0.5``."""
        parts = []
        if self.name != base.name or (self.name != "fixed_point" and self.memory != base.memory):
            parts.append(self.name + (f" m{self.memory}" if self.name != "fixed_point" else ""))
        for name, value, old in (("damping", self.damping, base.damping), ("tol", self.tol, base.tol),
                                 ("max", self.max_iter, base.max_iter)):
            if value != old:
                parts.append(f"{name} {value:g}")
        return ", ".join(parts) or "as recorded"


@dataclass
class Replay:
    """One replay of the open solve: its settings and its recording."""

    number: int
    settings: ReplaySettings
    recording: Any

    def label(self, sample: int) -> str:
        return f"replay {self.number}: {self.settings.label()} ({outcome(self.recording, sample)})"

    def short_label(self, sample: int, recorded: ReplaySettings) -> str:
        """For the plot's legend: what differs from the recorded solve, and how it ended."""
        return f"replay {self.number}: {self.settings.difference(recorded)} ({outcome(self.recording, sample)})"


def outcome(rec, sample: int) -> str:
    """'diverged after 18 it' / 'converged in 10 it' for one sample of a recording."""
    reason = rec.stop_reasons[sample] if sample < len(rec.stop_reasons) else "?"
    iterations = int(rec.iterations[sample]) if sample < len(rec.iterations) else 0
    word = "in" if reason == CONVERGED else "after"
    return f"{REASON_LABELS.get(reason, reason).replace('_', ' ')} {word} {iterations} it"


def magnitude(image: np.ndarray) -> np.ndarray:
    """``[C, H, W] -> [H, W]``: the single channel, or the channels' modulus (MRI's complex images)."""
    image = np.asarray(image, dtype=np.float32)
    return image[0] if image.shape[0] == 1 else np.sqrt((image.astype(np.float64) ** 2).sum(0)).astype(np.float32)


class InspectorModel:
    """What the inspector shows; ``version`` grows with every change the window must draw."""

    def __init__(self) -> None:
        self.steps: list[int] = []  # training steps whose recordings are kept
        self.reconstructions: list[SolveSource] = []  # recorded Reconstruct solves, newest last
        self.source: Optional[SolveSource] = None
        self.index = 0  # which recording of the source
        self.sample = 0
        self.frame = 0  # index into recording.frames
        self.spectral_radius: Optional[float] = None
        self.denoiser_lipschitz: Optional[float] = None
        self.measured = False  # the spectral radius has been measured for this (recording, sample)
        self.diagnoses: list = []  # engine.diagnostics.Diagnosis
        self.replays: list[Replay] = []
        self.replays_made = 0
        self.working = 0  # inspector tasks in flight
        self.note = ""  # why nothing is shown, or what failed
        self.version = 0

    def changed(self) -> None:
        self.version += 1

    # -- what is open ------------------------------------------------------------------------
    @property
    def recording(self):
        if self.source is None or not self.source.recordings:
            return None
        return self.source.recordings[min(self.index, len(self.source.recordings) - 1)]

    def open(self, source: SolveSource, index: int, sample: Optional[int] = None) -> None:
        """Show recording ``index`` of ``source``; ``sample`` None: its worst sample. The last frame is shown."""
        self.source, self.index = source, int(index)
        rec = self.recording
        self.sample = rec.worst_sample() if sample is None or not 0 <= sample < rec.batch else int(sample)
        self.frame = max(0, len(rec.frames) - 1)
        self.replays.clear()
        self.note = ""
        self._unmeasured()

    def choose_sample(self, sample: int) -> bool:
        rec = self.recording
        if rec is None or not 0 <= sample < rec.batch or sample == self.sample:
            return False
        self.sample = int(sample)
        self._unmeasured()
        return True

    def set_frame(self, frame: int) -> None:
        rec = self.recording
        if rec is None or len(rec.frames) == 0:
            return
        frame = int(min(max(0, frame), len(rec.frames) - 1))
        if frame != self.frame:
            self.frame = frame
            self.changed()

    def show_nothing(self, note: str) -> None:
        self.source, self.note = None, note
        self.replays.clear()
        self._unmeasured()

    def _unmeasured(self) -> None:
        self.spectral_radius = self.denoiser_lipschitz = None
        self.measured = False
        self.diagnoses = []
        self.changed()

    def set_inspection(self, diagnoses: list, radius: Optional[float] = None, lipschitz: Optional[float] = None,
                       measured: bool = False) -> None:
        self.diagnoses = list(diagnoses)
        self.spectral_radius, self.denoiser_lipschitz, self.measured = radius, lipschitz, measured
        self.changed()

    def add_replay(self, settings: ReplaySettings, recording) -> Replay:
        self.replays_made += 1
        replay = Replay(self.replays_made, settings, recording)
        self.replays.append(replay)
        self.changed()
        return replay

    def clear_replays(self) -> None:
        self.replays.clear()
        self.changed()

    # -- display arrays and text -------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """The iteration (1-based) of the frame shown, 0 when none is stored."""
        rec = self.recording
        return int(rec.frames[self.frame]) if rec is not None and len(rec.frames) else 0

    def iterate_image(self) -> Optional[np.ndarray]:
        rec = self.recording
        if rec is None or rec.iterates.ndim != 5 or not len(rec.frames):
            return None
        return magnitude(rec.iterates[self.frame, self.sample])

    def residual_map(self) -> Optional[np.ndarray]:
        rec = self.recording
        if rec is None or rec.residual_maps.ndim != 4 or not len(rec.frames):
            return None
        return np.asarray(rec.residual_maps[self.frame, self.sample], dtype=np.float32)

    def trace(self) -> np.ndarray:
        """The open sample's residual trace in the solve's stop mode (index 0 = iteration 1)."""
        rec = self.recording
        if rec is None:
            return np.zeros(0)
        return np.asarray(rec.trace(self.sample, self.stop_mode()), dtype=np.float64)

    def stop_mode(self) -> str:
        rec = self.recording
        return str(rec.options.get("stop_mode", "rel")) if rec is not None else "rel"

    def tolerance(self) -> float:
        rec = self.recording
        return float(rec.options.get("tol", float("nan"))) if rec is not None else float("nan")

    def replay_trace(self, replay: Replay) -> np.ndarray:
        return np.asarray(replay.recording.trace(self.sample, self.stop_mode()), dtype=np.float64)

    def stop_reason(self) -> str:
        rec = self.recording
        return rec.stop_reasons[self.sample] if rec is not None and self.sample < len(rec.stop_reasons) else ""

    def solve_labels(self) -> list[str]:
        """One line per recording of the source: direction, call and outcome of its worst sample."""
        if self.source is None:
            return []
        return [f"{rec.direction} · {rec.tag or 'solve'} · {rec.solver}: {outcome(rec, rec.worst_sample())}"
                for rec in self.source.recordings]

    def sample_labels(self) -> list[str]:
        rec = self.recording
        if rec is None:
            return []
        worst = rec.worst_sample()
        return [f"sample {b}: {outcome(rec, b)}" + (" (worst)" if b == worst else "") for b in range(rec.batch)]

    def title(self) -> str:
        rec = self.recording
        if rec is None:
            return self.note or "no recorded solve open"
        where = self.source.label
        return f"{where}: {rec.direction} solve ({rec.tag}), sample {self.sample}"

    def summary(self) -> str:
        rec = self.recording
        if rec is None:
            return ""
        s = rec.summary(self.sample)
        text = (f"{s['solver']}: {REASON_LABELS.get(s['stop_reason'], s['stop_reason'])} after {s['iterations']} "
                f"iterations (max_iter {s['max_iter']}); {s['stop_mode']} residual {s['first_residual']:.3g} -> best "
                f"{s['best_residual']:.3g} -> final {s['final_residual']:.3g}, tolerance {s['tolerance']:.3g} "
                f"({s['dtype']})")
        if s["fallback"]:
            text += f"; fallback {s['fallback']} from iteration {s['fallback_from']}"
        return text

    def frame_text(self) -> str:
        rec = self.recording
        if rec is None or not len(rec.frames):
            return "no stored iterates"
        return (f"iteration {self.iteration} of {int(rec.iterations[self.sample])} "
                f"(stored frame {self.frame + 1} of {len(rec.frames)})")

    def readout(self) -> str:
        """The spectral radius and Lipschitz line."""
        if self.recording is None:
            return ""
        if not self.measured:
            return "spectral radius of dF/dx: " + ("measuring…" if self.working else "not measured")
        if self.spectral_radius is None:
            return "spectral radius of dF/dx: not measurable here (no finite end point)"
        state = "contractive" if self.spectral_radius < 1 else "NOT contractive"
        text = f"spectral radius of dF/dx where the solve ended: {self.spectral_radius:.3f} ({state})"
        if self.denoiser_lipschitz is not None:
            text += f"   ·   denoiser Lipschitz estimate: {self.denoiser_lipschitz:.3f}"
        return text


def evidence_text(evidence: dict) -> str:
    """``{"stepsize": 5.0, ...}`` -> ``stepsize 5, ...`` (numbers to 3 significant digits)."""
    parts = []
    for key, value in evidence.items():
        if isinstance(value, (float, np.floating)):
            value = f"{float(value):.3g}"
        parts.append(f"{key.replace('_', ' ')} {value}")
    return ", ".join(parts)


def changes_text(changes: dict, before: Optional[dict] = None) -> str:
    """``deq.stepsize 5 -> 1`` (with the values before, when known), comma-separated."""
    parts = []
    for key, value in changes.items():
        old = (before or {}).get(key)
        parts.append(f"{key} {old!r} -> {value!r}" if old is not None else f"{key} = {value!r}")
    return ", ".join(parts)

