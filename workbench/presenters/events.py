"""Engine events to the panels, the log and the status bar: one handler per event type.

The :class:`~workbench.worker.EventRelay` hands over events in batches in the
GUI thread; :meth:`EventRouter.route_batch` passes each to the handler of its
type (unknown types are ignored), and a failing handler is logged without
stopping the stream. Solver, loss and snapshot events go into the panels'
Qt-free models (:class:`PanelModels`); the panels redraw them on a timer. Run-level bookkeeping (phase, step counts) goes to the
:class:`~workbench.presenters.run.RunPresenter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

from engine.events import (CheckpointSaved, LogMessage, RunFailed, RunFinished, RunStarted, Snapshot, SolveAlarm,
                           SolveFinished, StabilityChecked, StepFinished, ValidationFinished)
from engine.solver_names import DIVERGED, FAILURE_REASONS
from workbench.panels.losses_model import LossesModel
from workbench.panels.reconstructions_model import ReconstructionsModel
from workbench.panels.residuals_model import PROBLEM_REASONS, ResidualsModel
from workbench.presenters.run import RunPresenter
from workbench.state import WorkbenchState

MAX_PROBLEM_LOGS = 20  # problem solves logged per run; the residuals panel lists them all
FAILED_SOLVE = frozenset(FAILURE_REASONS)


@dataclass
class PanelModels:
    """The Qt-free data of the panels that runs fill; each panel draws its own on a timer."""

    residuals: ResidualsModel
    losses: LossesModel
    reconstructions: ReconstructionsModel


class EventView(Protocol):
    def log_message(self, level: str, message: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...
    def close_error(self, title: str) -> None: ...
    def set_status(self, text: str) -> None: ...
    def show_run(self, run_dir: Optional[str], note: str) -> None: ...
    def show_model_info(self, text: str) -> None: ...
    def show_device(self, text: str) -> None: ...


class EventRouter:
    """Routes each engine event to the panel data, the view and the run presenter."""

    def __init__(self, view: EventView, state: WorkbenchState, run: RunPresenter, panels: PanelModels) -> None:
        self.view, self.state, self.run, self.panels = view, state, run, panels
        self.problem_logs = 0  # per run
        self.divergence_reported = False  # per run: one dialog, the rest in the log
        self.known_device = ""  # "CUDA: <name>" / "CPU", once the start-up probe has answered
        self.batch_fails = False  # the batch routed now ends the run with a failure: its one message says it all
        self.alarm_listeners: list[Callable[[SolveAlarm], None]] = []  # the Solver Inspector opens on an alarm
        self.routes: dict[type, Callable[[Any], None]] = {
            SolveFinished: self.solve_finished,
            StepFinished: self.step_finished,
            ValidationFinished: panels.losses.add_validation,
            StabilityChecked: panels.residuals.add_stability,
            Snapshot: panels.reconstructions.add_event,
            RunStarted: self.run_started,
            CheckpointSaved: self.checkpoint_saved,
            LogMessage: lambda ev: self.view.log_message(ev.level, ev.message),
            RunFailed: self.run_failed,
            RunFinished: self.run_finished,
            SolveAlarm: self.solve_alarm,
        }

    def route_batch(self, batch: list) -> None:
        self.batch_fails = any(isinstance(event, RunFailed) for event in batch)
        for event in batch:
            try:
                self.route(event)
            except Exception as exc:  # a display bug must not kill the event stream
                self.view.log_message("error", f"display error for {type(event).__name__}: {exc}")

    def route(self, event) -> None:
        handler = self.routes.get(type(event))
        if handler is not None:
            handler(event)

    # -- the device shown in the status bar ----------------------------------------------------
    def device_found(self, name: str) -> None:
        self.known_device = name
        self.view.show_device(f"device: {name}")

    def device_unknown(self) -> None:
        self.view.show_device("CPU")

    # -- handlers ----------------------------------------------------------------------------
    def solve_finished(self, ev: SolveFinished) -> None:
        self.panels.residuals.add(ev)
        bad = set(ev.stop_reasons or []) & set(PROBLEM_REASONS)
        if bad and self.problem_logs < MAX_PROBLEM_LOGS:
            self.problem_logs += 1
            level = "error" if bad & FAILED_SOLVE else "warning"
            iterations = int(np.max(ev.iterations)) if np.size(ev.iterations) else 0
            self.view.log_message(level, f"step {ev.step}: {ev.direction} solve ({ev.solver}) ended with "
                                 f"{', '.join(sorted(bad))} after {iterations} iterations"
                                 + (f"; fallback {ev.fallback}" if ev.fallback else ""))
            if self.problem_logs == MAX_PROBLEM_LOGS:
                self.view.log_message("warning", "further problem solves are listed in the residuals panel only")
        if bad & FAILED_SOLVE and not self.divergence_reported and not self.batch_fails:
            self.divergence_reported = True
            what = "diverged" if DIVERGED in bad else "produced non-finite values"
            self.view.report_error("Diverged solve", f"The {ev.direction} solve at step {ev.step} {what}. "
                                                     "Training continues; see the Solver residuals panel.", log=False)

    def solve_alarm(self, ev: SolveAlarm) -> None:
        """A step failed on a solve: the residual panel flags it; the run may have paused itself."""
        self.view.close_error("Diverged solve")  # one message per failure: the banner (and inspector) say it
        self.panels.residuals.set_alarm(ev)
        if ev.paused:
            self.run.paused_by_run(f"step {ev.step}'s {ev.direction} solve {ev.stop_reason.replace('_', ' ')}")
        for listener in list(self.alarm_listeners):
            listener(ev)

    def run_failed(self, ev: RunFailed) -> None:
        """One message per failure: it replaces an earlier diverged-solve one ("training continues" no longer holds)."""
        self.view.close_error("Diverged solve")
        self.view.report_error("Training failed", ev.message)

    def step_finished(self, ev: StepFinished) -> None:
        self.panels.losses.add_step(ev)
        self.run.step_finished(ev.step)
        losses = ev.losses or {}
        total = losses.get("total", next(iter(losses.values()), float("nan"))) if losses else float("nan")
        self.view.set_status(f"Training: step {ev.step}/{self.run.total_steps}  loss {total:.4g}  "
                             f"({ev.seconds:.2f} s/step)")

    def run_started(self, ev: RunStarted) -> None:
        self.problem_logs, self.divergence_reported = 0, False
        self.run.run_started(ev.total_steps, ev.start_step)
        self.state.run_dir = ev.run_dir
        self.view.show_run(ev.run_dir, f"(from step {ev.start_step})" if ev.start_step else "")
        self.view.show_model_info("training in progress")
        if ev.device:
            device = str(ev.device)
            if device.startswith("cuda") and "CUDA" in self.known_device:
                device = self.known_device  # the probe's name says more than "cuda:0"
            self.view.show_device(f"device: {device.upper() if device == 'cpu' else device}")
        self.view.log_message("info", f"run started on {ev.device}: {ev.total_steps} steps"
                              + (f", run directory {ev.run_dir}" if ev.run_dir else ""))

    def checkpoint_saved(self, ev: CheckpointSaved) -> None:
        self.view.log_message("info", f"checkpoint saved at step {ev.step}: {ev.path}")
        if self.state.model_source != "checkpoint":  # an opened checkpoint stays the one to resume
            self.state.checkpoint_path = ev.path
        self.run.show_actions()

    def run_finished(self, ev: RunFinished) -> None:
        self.panels.residuals.run_ended(ev.reason)
        self.view.log_message("info", f"run {ev.reason} at step {ev.step} ({self.run.seconds_running():.1f} s)")
