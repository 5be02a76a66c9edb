"""Reconstruct, the equivariance probe and curve, and per-view metrics, on the model in use.

The model is chosen in the GUI thread and resolved in the task thread:

* after Train, the latest run's weights: a copy the training thread makes
  between steps (:meth:`~workbench.backend.TrainerCommands.weights`), loaded
  into a separate model, so the live training model is never touched;
* else the opened checkpoint's model;
* else a model built from the config, which the task hands back through its
  result and ``on_done`` keeps for the next request (until the config changes).

The input is the chosen slice of the opened scan (re-prepared when the model's
image size differs from the displayed slices), or a phantom without a scan.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Protocol

import numpy as np

from workbench import backend
from workbench.panels.reconstructions_model import snapshot_from_result
from workbench.presenters.events import PanelModels
from workbench.presenters.run import RunPresenter
from workbench.state import WorkbenchState

CURVE_ANGLES = tuple(range(0, 361, 15))


class AnalysisView(Protocol):
    def refresh_images(self) -> None: ...
    def request_equivariance(self) -> None: ...
    def show_equivariance(self, angle: float, result) -> None: ...
    def show_equivariance_curve(self, angles, errors) -> None: ...
    def equivariance_failed(self) -> None: ...
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

    def _image_getter(self) -> Callable[[Any], np.ndarray]:
        scan, slices, index = self.state.scan, self.state.slices, self.state.slice_index
        window = self.state.data_window()

        def image_for(model) -> np.ndarray:
            size = int(model.config.physics.img_size)
            if scan is None:
                return backend.default_images(model.config, 1)[0]
            stack = slices
            if stack is None or stack.shape[-1] != size:
                stack = backend.prepare_slices(scan, size, window=window)
            return np.asarray(stack[min(max(0, index), len(stack) - 1)], dtype=np.float32)

        return image_for

    def _keep_built(self, built) -> None:
        """Keep a model the task built from the config, unless something else is in use by now."""
        if built is not None and self.state.model is None and not self.state.use_training_weights:
            self.state.set_model(built, "config")

    def _on_model(self, compute: Callable[[Any, np.ndarray], Any]) -> Callable[[], tuple[Any, Any]]:
        """A task computing ``compute(model, image)``; returns (its result, the model built or None)."""
        get_model, get_image = self._model_getter(), self._image_getter()

        def job():
            model, built = get_model()
            return compute(model, get_image(model)), built

        return job

    # -- requests ------------------------------------------------------------------------------
    def slice_chosen(self, index: int) -> None:
        self.state.slice_index = int(index)
        self.reconstruct()

    def reconstruct(self, then: Optional[Callable] = None) -> None:
        """Reconstruct the current slice (or a phantom); ``then()`` runs after it is shown."""
        label = (f"slice {self.state.slice_index} of {os.path.basename(self.state.scan_path.rstrip('/'))}"
                 if self.state.scan_path else "phantom")

        def compute(model, image):
            snapshot, stats = snapshot_from_result(model.reconstruct(image[None]), f"Reconstruct: {label}")
            if stats is not None and hasattr(stats, "to_event"):  # numpy conversion off the GUI thread
                stats = stats.to_event("forward", step=None, tag="reconstruct")
            return snapshot, stats

        def done(outcome):
            (snapshot, stats), built = outcome
            self._keep_built(built)
            self.panels.reconstructions.add(snapshot)
            self.view.refresh_images()
            if stats is not None:
                try:
                    self.panels.residuals.add(stats)
                except Exception as exc:
                    self.view.log_message("warning", f"solver statistics of the reconstruction not shown: {exc}")
            self.view.log_message("info", f"reconstructed {label}")
            self.view.set_status(f"Reconstructed {label}")
            self.view.request_equivariance()
            if then:
                then()

        self.view.set_status("Reconstructing…")
        # a newer reconstruction (another slice, scan or model) replaces one still queued or running,
        # unless a caller waits for this one (then)
        self.tasks.submit(self._on_model(compute), done,
                          lambda exc: self.view.report_error("Reconstruction failed", exc), name="reconstruct",
                          supersede=then is None)

    def _equivariance_failed(self, exc: BaseException) -> None:
        self.view.equivariance_failed()
        self.view.report_error("Equivariance failed", exc)

    def equivariance(self, angle: float) -> None:
        def done(outcome):
            result, built = outcome
            self._keep_built(built)
            self.view.show_equivariance(angle, result)

        self.tasks.submit(self._on_model(lambda model, image: model.equivariance(image, float(angle))), done,
                          self._equivariance_failed, name="equivariance", supersede=True)  # the latest angle wins

    def equivariance_curve(self) -> None:
        angles = np.asarray(CURVE_ANGLES, dtype=np.float64)

        def done(outcome):
            (curve_angles, errors), built = outcome
            self._keep_built(built)
            self.view.show_equivariance_curve(curve_angles, errors)

        self.tasks.submit(self._on_model(lambda model, image: model.equivariance_curve(image, angles)), done,
                          self._equivariance_failed, name="equivariance curve", supersede=True)

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
