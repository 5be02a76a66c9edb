"""Reconstruct, the equivariance probe and curve, and per-view metrics, on the model in use.

The model is chosen in the GUI thread and resolved in the task thread:

* after Train, the latest run's weights: a copy the training thread makes
  between steps (:meth:`~workbench.backend.TrainerCommands.weights`), loaded
  into a separate model, so the live training model is never touched;
* else the opened checkpoint's model;
* else a model built from the config, which the task hands back through its
  result and ``on_done`` keeps for the next request (until the config changes).

The input is the chosen slice of the opened scan, at the size chosen for
Reconstruct (the model's own, the scan's own or a fixed one: the model is then
``backend.model_at_size``, the same weights with the operator built for that
size), or a phantom without a scan. Nothing here runs by itself when the slice
changes: Reconstruct is asked for.

Every request is a :class:`~workbench.jobs.Job` the status bar shows with a
Cancel button. Cancelling stops the solve in progress within one iteration (the
engine's ``RunControl``, :func:`~workbench.backend.solves_stopped_by`) and the
error-vs-angle curve between angles; whatever a cancelled task returns is dropped.

Every task sets the model's solve settings from the settings dock first
(:func:`use_settings`): a trained model's own solver / step values are
overridden by the dock's, its fixed settings are refused (and listed), and the
info panel says which settings the reconstruction used. A field the dock
refused blocks the request (:func:`~workbench.presenters.config.refuse_invalid_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Protocol

import numpy as np

from workbench import backend, inspection
from workbench.jobs import Job
from workbench.panels.reconstructions_model import snapshot_from_result
from workbench.presenters.config import (fixed_by_weights, flat_settings, format_setting, overridable,
                                         refuse_invalid_settings)
from workbench.presenters.events import PanelModels
from workbench.presenters.run import RECONSTRUCTION_PANELS, RunPresenter
from workbench.state import WorkbenchState, reconstruction_size

CURVE_ANGLES = tuple(range(0, 361, 15))
#: the solve settings the info panel lists for a reconstruction, with their labels
SHOWN_SETTINGS = (("solver.name", "solver"), ("solver.tol", "tol"), ("solver.max_iter", "max iter"),
                  ("solver.memory", "memory"), ("solver.damping", "damping"), ("deq.stepsize", "stepsize"),
                  ("deq.relaxation", "relaxation"))


@dataclass(frozen=True)
class ReconstructionSettings:
    """What a reconstruction ran with: the live model's solve settings, where the model came from,
    which dock settings overrode the model's own and which were refused (``key -> (own, asked)``)."""

    used: dict
    source: str
    overridden: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the solver, its tolerance and cap, and how many settings were overridden."""
        used = self.used
        text = (f"{used.get('solver.name')}, tol {format_setting(used.get('solver.tol'))}, "
                f"max iter {used.get('solver.max_iter')}, stepsize {format_setting(used.get('deq.stepsize'))}")
        if self.overridden:
            text += f"; {len(self.overridden)} setting{'s' if len(self.overridden) > 1 else ''} overridden"
        if self.refused:
            text += f"; {len(self.refused)} not applied"
        return text

    def describe(self, solve: str = "") -> str:
        """The info panel's lines: settings used, model source, overrides, refusals, the solve's outcome."""
        lines = [", ".join(f"{label} {format_setting(self.used.get(key))}" for key, label in SHOWN_SETTINGS),
                 f"model: {self.source}"]
        if self.overridden:
            lines.append("overridden from the settings: " + ", ".join(
                f"{key} {format_setting(own)} \u2192 {format_setting(asked)}"
                for key, (own, asked) in self.overridden.items()))
        else:
            lines.append("no settings overridden")
        if self.refused:
            lines.append("not applied (fixed by the trained weights; they apply to the next Train): " + ", ".join(
                f"{key} {format_setting(asked)} (kept {format_setting(own)})"
                for key, (own, asked) in self.refused.items()))
        if solve:
            lines.append(f"solve: {solve}")
        return "\n".join(lines)


def use_settings(loaded, config, source: str) -> ReconstructionSettings:
    """Give ``loaded`` (a LoadedModel) the solve settings of ``config`` and say what it runs with (task thread).

    Every overridable setting is applied, not only the changed ones, so a setting
    edited back restores the model's own value on a model used before.
    """
    own, asked = flat_settings(loaded.config), flat_settings(config)
    changes = {key: value for key, value in asked.items() if overridable(key)}
    backend.apply_solve_settings(loaded, changes)
    overridden = {key: (own.get(key), value) for key, value in changes.items() if own.get(key) != value}
    refused = {key: (own.get(key), value) for key, value in asked.items()
               if fixed_by_weights(key) and own.get(key) != value}
    return ReconstructionSettings(backend.solve_settings(loaded), source, overridden, refused)


def model_size(model) -> int:
    """The image size a LoadedModel reconstructs."""
    return int(model.config.physics.img_size)


def solve_outcome(record) -> str:
    """How a solve ended, e.g. "anderson \u2192 fixed_point fallback, 51 iterations (max 40), converged"."""
    cap = f" (max {record.max_iter})" if record.max_iter else ""
    return f"{record.solver_label()}, {record.iterations} iterations{cap}, {record.reason.replace('_', ' ')}"


class ModelRun(NamedTuple):
    """A task's outcome on the model in use."""

    result: Any
    built: Any  # the model it built from the config, or None
    settings: ReconstructionSettings
    size: int = 0  # the image size it ran at


class AnalysisView(Protocol):
    def refresh_images(self) -> None: ...
    def request_equivariance(self) -> None: ...
    def show_equivariance(self, angle: float, result) -> None: ...
    def show_equivariance_curve(self, angles, errors) -> None: ...
    def equivariance_failed(self) -> None: ...
    def show_reconstruction_settings(self, text: str) -> None: ...
    def mark_stale(self, panels: tuple, note: str) -> None: ...
    def show_invalid_setting(self, key: str) -> None: ...
    def show_busy(self, job: Job) -> None: ...
    def set_status(self, text: str) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...


class AnalysisPresenter:
    """Reconstructions go to the reconstructions panel (their solver statistics to the residuals
    panel), probes and curves to the equivariance panel through the view."""

    def __init__(self, view: AnalysisView, state: WorkbenchState, tasks, run: RunPresenter,
                 panels: PanelModels) -> None:
        self.view, self.state, self.tasks, self.run, self.panels = view, state, tasks, run, panels
        self.training_model = backend.TrainerModelView()  # used in the task thread only
        self.last_refused: dict = {}  # the settings the latest reconstruction could not apply
        self.probed: Optional[tuple] = None  # (scan path, slice) the equivariance panel's results are of

    # -- the model and the input (captured in the GUI thread, resolved in the task thread) --------
    def _model_getter(self) -> Callable[[], tuple[Any, Any]]:
        """A function returning (model, the model it built from the config or None)."""
        run = self.run.training_commands()
        if run is not None:
            training_model = self.training_model
            return lambda: (training_model.get(run), None)
        model = self.state.model
        if model is not None:
            return lambda: (model, None)
        config = self.state.config

        def build():
            built = backend.model_from_config(config)
            return built, built

        return build

    def _model_source(self) -> str:
        """Where the model in use comes from, for the info panel (GUI thread)."""
        if self.run.training_commands() is not None:
            return "this session's training run" + (f" ({self.state.run_dir})" if self.state.run_dir else "")
        if self.state.model is not None and self.state.model_source == "checkpoint":
            return f"checkpoint {self.state.checkpoint_path}"
        config = self.state.config
        return f"config '{config.run.name}'" + (f" ({self.state.config_path})" if self.state.config_path else "")

    def _image_getter(self) -> Callable[[Any], np.ndarray]:
        """A function giving the input image for a model: the viewed slice at the model's size, or a phantom."""
        scan, slices, index = self.state.scan, self.state.slices, self.state.slice_index

        def image_for(model) -> np.ndarray:
            size = model_size(model)
            if scan is None or slices is None:
                return backend.default_images(model.config, 1)[0]
            image = np.asarray(slices[min(max(0, index), len(slices) - 1)], dtype=np.float32)
            return image if image.shape[-1] == size else backend.resize_image(image, size)

        return image_for

    def _keep_built(self, built) -> None:
        """Keep a model the task built from the config, unless something else is in use by now."""
        if built is not None and self.state.model is None and not self.state.use_training_weights:
            self.state.set_model(built, "config")

    def _on_model(self, compute: Callable[[Any, np.ndarray], Any], job: Job) -> Callable[[], ModelRun]:
        """A task computing ``compute(model, image)`` with the dock's solve settings on the model, at the
        chosen size; cancelling ``job`` stops its solves."""
        get_model, get_image = self._model_getter(), self._image_getter()
        config, source = self.state.config, self._model_source()
        size_choice, native = self.state.reconstruct_size, self.state.native_size()

        def task():
            model, built = get_model()
            settings = use_settings(model, config, source)
            size = reconstruction_size(size_choice, model_size(model), native)
            job.advance(0, detail=f"{size} px" if size != model_size(model) else "")
            sized = backend.model_at_size(model, size)  # the engine keeps it: built once per size
            if sized is not model:  # the dock's solve settings on the model that solves
                backend.apply_solve_settings(sized, {key: value for key, value in flat_settings(config).items()
                                                     if overridable(key)})
            job.check()
            with backend.solves_stopped_by(sized, job):
                result = compute(sized, get_image(sized))
            job.check()
            return ModelRun(result, built, settings, size)

        return task

    def _submit(self, job: Job, task, done, on_error, name: str, supersede: bool, cancelled) -> None:
        self.view.show_busy(job)
        self.tasks.submit(task, done, on_error, name=name, supersede=supersede, job=job, on_cancel=cancelled)

    def _viewing(self) -> Optional[tuple]:
        """(scan path, slice) the requests are about, or None for a phantom."""
        return (self.state.scan_path, int(self.state.slice_index)) if self.state.scan_path else None

    # -- requests ------------------------------------------------------------------------------
    def reconstruct(self, then: Optional[Callable] = None) -> None:
        """Reconstruct the viewed slice (or a phantom) at the chosen size; ``then()`` runs after it is shown."""
        if refuse_invalid_settings(self.view, self.state, "Reconstruct"):
            return
        source = self._viewing()
        name = self.state.scan_name()
        label = f"slice {source[1]} of {name}" if source else "phantom"
        job = Job(f"Reconstructing {label}")
        trained_size = int(self.state.config.physics.img_size)

        def compute(model, image):
            size = model_size(model)
            at = f" at {size}\u00d7{size}" if size != trained_size else ""  # the model's own size goes unsaid
            with backend.solves_recorded(model):
                result = model.reconstruct(image[None])
            snapshot, stats = snapshot_from_result(result, f"Reconstruct: {label}{at}")
            snapshot["source"] = source
            if stats is not None and hasattr(stats, "to_event"):  # numpy conversion off the GUI thread
                stats = inspection.reconstruction_event(model, stats, label)  # with its recording: inspectable
            return snapshot, stats

        def done(outcome: ModelRun):
            (snapshot, stats), settings = outcome.result, outcome.settings
            self._keep_built(outcome.built)
            self.panels.reconstructions.add(snapshot)
            self.view.refresh_images()
            solve = ""
            if stats is not None:
                try:
                    record = self.panels.residuals.add(stats)
                    solve = solve_outcome(record)
                except Exception as exc:
                    self.view.log_message("warning", f"solver statistics of the reconstruction not shown: {exc}")
            self.view.mark_stale(RECONSTRUCTION_PANELS, "")
            self.view.show_reconstruction_settings(settings.describe(solve))
            where = f"{label} at {outcome.size} px"
            self.view.log_message("info", f"reconstructed {where} ({settings.summary()})")
            if settings.refused and settings.refused != self.last_refused:  # said once, not at every slice
                self.view.log_message("warning", "Reconstruct did not apply " + ", ".join(settings.refused)
                                      + ": a trained model's physics, network and fixed-point form are fixed by "
                                        "its weights (they apply to the next Train)")
            self.view.set_status(f"Reconstructed {where} ({settings.summary()})")
            self.last_refused = settings.refused
            self.view.request_equivariance()
            if then:
                then()

        def cancelled():
            self.view.set_status(f"Reconstruction of {label} cancelled: its solve was stopped and nothing is shown")
            self.view.log_message("info", f"reconstruction of {label} cancelled")

        self.view.set_status(f"Reconstructing {label}…")
        # a newer reconstruction (another slice, scan or model) replaces one still queued or running,
        # unless a caller waits for this one (then)
        self._submit(job, self._on_model(compute, job), done,
                     lambda exc: self.view.report_error("Reconstruction failed", exc), "reconstruct",
                     then is None, cancelled)

    def _equivariance_failed(self, exc: BaseException) -> None:
        self.view.equivariance_failed()
        self.view.report_error("Equivariance failed", exc)

    def _equivariance_cancelled(self, what: str) -> Callable[[], None]:
        def cancelled():
            self.view.equivariance_failed()  # the panel's controls are free again
            self.view.set_status(f"{what} cancelled")
            self.view.log_message("info", f"{what} cancelled")

        return cancelled

    def _probe_refused(self) -> bool:
        if refuse_invalid_settings(self.view, self.state, "Equivariance"):
            self.view.equivariance_failed()
            return True
        return False

    def equivariance(self, angle: float) -> None:
        if self._probe_refused():
            return
        source = self._viewing()
        job = Job(f"Equivariance probe at {float(angle):.0f}\u00b0")

        def done(outcome: ModelRun):
            self._keep_built(outcome.built)
            self.probed = source
            self.view.show_equivariance(angle, outcome.result)

        self._submit(job, self._on_model(lambda model, image: model.equivariance(image, float(angle)), job), done,
                     self._equivariance_failed, "equivariance", True,  # the latest angle wins
                     self._equivariance_cancelled(job.title))

    def equivariance_curve(self) -> None:
        """The equivariance error at every angle of CURVE_ANGLES, one probe after another (cancellable between them)."""
        if self._probe_refused():
            return
        angles = np.asarray(CURVE_ANGLES, dtype=np.float64)
        source = self._viewing()
        job = Job("Equivariance error vs angle")

        def compute(model, image):
            errors = []
            for i, angle in enumerate(angles):
                job.advance(i, len(angles), f"{angle:.0f}\u00b0")
                job.check()
                errors.append(float(model.equivariance(image, float(angle)).error))
            job.advance(len(angles), len(angles))
            return angles, np.asarray(errors)

        def done(outcome: ModelRun):
            curve_angles, errors = outcome.result
            self._keep_built(outcome.built)
            self.probed = source
            self.view.show_equivariance_curve(curve_angles, errors)

        self._submit(job, self._on_model(compute, job), done, self._equivariance_failed, "equivariance curve", True,
                     self._equivariance_cancelled("Error vs angle"))

    def equivariance_note(self) -> str:
        """Why the equivariance panel's results no longer fit the viewed slice ("" when they do)."""
        viewing = self._viewing()
        if self.probed is None or viewing is None or self.probed == viewing:
            return ""
        return f"stale: slice {self.probed[1]}"

    def metrics(self, snapshot: dict, jobs: list) -> None:
        """PSNR / SSIM of the snapshot's views against its reference (``jobs``: (view, image, reference))."""
        def job():
            values = {}
            for view, image, reference in jobs:
                m = backend.image_metrics(image, reference)
                if m is not None:
                    values[view] = m
            return values

        self.tasks.submit(job, lambda values: self.panels.reconstructions.set_metrics(snapshot, values),
                          lambda exc: None, name="metrics")
