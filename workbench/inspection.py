"""The engine calls of the Solver Inspector, with the heavy imports deferred (as :mod:`workbench.backend`).

Everything here runs in the task thread (:class:`~workbench.worker.TaskRunner`),
never in the GUI thread: fetching a training step's recorded solves (a command
the training thread runs between steps, :class:`~workbench.backend.TrainerCommands`),
building the model a recorded solve ran with, measuring the spectral radius and
replaying a solve with other settings (``engine.diagnostics.inspect``).

A replay or a measurement needs the weights the solve ran with, not the live
ones: a training step's recordings carry a copy of the weights that step started
from, and a recorded Reconstruct keeps a copy of its model's weights
(:func:`reconstruction_event`). :class:`InspectionModels` builds a model from the
config once and loads those weights into it. Nothing here imports Qt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from engine.events import SolveFinished
from workbench.panels.inspector_model import SolveSource


@dataclass
class RecordedSolveFinished(SolveFinished):
    """A Reconstruct's ``SolveFinished`` that carries its recording (``source``), so its row in the
    residual panel opens the Solver Inspector."""

    source: Any = None


def reconstruction_event(loaded, stats, label: str) -> SolveFinished:
    """The reconstruct solve's event; with its recording, weights and settings when it was recorded."""
    event = stats.to_event("forward", step=None, tag="reconstruct")
    recording = getattr(stats, "recording", None)
    if recording is None:
        return event
    recording.tag = "reconstruct"
    model = loaded.model
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    config = loaded.config
    try:  # the step settings the model ran with (they may differ from its config's: apply_settings)
        config = config.replace(**{"deq.stepsize": float(model.operator.stepsize),
                                   "deq.relaxation": float(model.operator.relaxation)})
    except Exception:
        pass
    source = SolveSource(label=f"Reconstruct: {label}", recordings=[recording], weights=weights, config=config)
    return RecordedSolveFinished(**{name: getattr(event, name) for name in event.__dataclass_fields__},
                                 source=source)


def training_source(commands, step: Optional[int] = None) -> tuple[list, Optional[SolveSource]]:
    """(steps kept, the recorded solves of ``step`` or the newest kept step) of a training run."""
    steps = commands.recorded_steps()
    kept = commands.recordings(step if step in steps else None)
    if kept is None:
        return steps, None
    source = SolveSource(label=f"step {kept.step}" + (" (not applied)" if kept.failed else ""),
                         recordings=list(kept.recordings), weights=kept.weights, config=commands.config,
                         step=int(kept.step), failed=bool(kept.failed), message=str(kept.message))
    return steps, source


class InspectionModels:
    """The model of the last source inspected, built from its config with its weights (task thread only)."""

    def __init__(self) -> None:
        self._weights: Optional[dict] = None  # kept: its id must not be reused while cached
        self._config = None
        self._model = None

    def get(self, source: SolveSource):
        if self._model is None or self._weights is not source.weights or self._config is not source.config:
            from engine.inference import model_from_config

            loaded = model_from_config(source.config, load_weights=False)
            loaded.model.load_state_dict(source.weights)
            loaded.model.eval()
            self._model, self._weights, self._config = loaded.model, source.weights, source.config
        return self._model


def diagnoses(source: SolveSource, recording, sample: int) -> list:
    """The diagnoses of one sample without measuring anything (fast: NumPy on the recording)."""
    from engine.diagnostics import Settings, diagnose

    return diagnose(recording, sample, settings=Settings.from_config(source.config, training=source.training))


def measure(models: InspectionModels, source: SolveSource, recording, sample: int):
    """Spectral radius, denoiser Lipschitz estimate and the diagnoses with them (``Inspection``)."""
    from engine.diagnostics.inspect import inspect

    return inspect(models.get(source), None, recording, sample, config=source.config, training=source.training)


def replay(models: InspectionModels, source: SolveSource, recording, changes: dict):
    """The recorded solve again with other solver settings (a new ``SolveRecording``)."""
    from engine.diagnostics.inspect import replay as _replay

    return _replay(models.get(source), None, recording, changes)


def divergence_demonstration() -> dict:
    """The config changes of the built-in divergence demonstration (``engine.diagnostics.MAKE_IT_DIVERGE``)."""
    from engine.diagnostics import MAKE_IT_DIVERGE

    return dict(MAKE_IT_DIVERGE)
