"""The training run's life cycle: one phase, its legal transitions, and what each command does.

:class:`RunPhase` is the whole state of a run as the GUI sees it, including
closing the window while a run is in progress::

    IDLE ──Train──> STARTING ──RunStarted──> RUNNING <──Pause/Resume──> PAUSED
                       │                        │                          │
                       └──────────── Stop ──────┴─────> STOPPING <─────────┘
    STARTING / RUNNING / PAUSED / STOPPING ──run ended──> FINISHED (completed, stopped) | FAILED
    FINISHED / FAILED ──Train──> STARTING
    STARTING / RUNNING / PAUSED / STOPPING ──close──> CLOSING ──run ended, or grace time over──> CLOSED
    IDLE / FINISHED / FAILED ──close──> CLOSED

Anything else is refused (:meth:`RunLifecycle.advance` returns False and the
phase stays). Pausing is refused while stopping: a pause after a stop would
hold the trainer in its pause loop for good.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Protocol

from workbench import backend
from workbench.presenters.config import refuse_invalid_settings
from workbench.state import WorkbenchState, training_data_text

CLOSE_GRACE_MS = 20000  # after this, close even if the engine has not come back (without killing it)


class RunPhase(Enum):
    IDLE = "idle"  # no run yet
    STARTING = "starting"  # Train pressed; the trainer has not reported RunStarted yet
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"  # stop requested; the run ends within one solver iteration
    FINISHED = "finished"  # the last run completed or was stopped
    FAILED = "failed"  # the last run failed
    CLOSING = "closing"  # the window closes once the run has stopped
    CLOSED = "closed"  # shut down: threads ended


_LEAVING_A_RUN = frozenset({RunPhase.FINISHED, RunPhase.FAILED, RunPhase.CLOSING})  # it ends, or the window closes
TRANSITIONS: dict[RunPhase, frozenset[RunPhase]] = {
    RunPhase.IDLE: frozenset({RunPhase.STARTING, RunPhase.CLOSED}),
    RunPhase.STARTING: _LEAVING_A_RUN | {RunPhase.RUNNING, RunPhase.PAUSED, RunPhase.STOPPING},
    RunPhase.RUNNING: _LEAVING_A_RUN | {RunPhase.PAUSED, RunPhase.STOPPING},
    RunPhase.PAUSED: _LEAVING_A_RUN | {RunPhase.RUNNING, RunPhase.STOPPING},
    RunPhase.STOPPING: _LEAVING_A_RUN,
    RunPhase.FINISHED: frozenset({RunPhase.STARTING, RunPhase.CLOSED}),
    RunPhase.FAILED: frozenset({RunPhase.STARTING, RunPhase.CLOSED}),
    RunPhase.CLOSING: frozenset({RunPhase.CLOSED}),
    RunPhase.CLOSED: frozenset(),
}
STOPPABLE = frozenset({RunPhase.STARTING, RunPhase.RUNNING, RunPhase.PAUSED})
ITERATE_KEEPABLE = STOPPABLE | {RunPhase.STOPPING}  # a solve may be in progress, not yet asked to end
RUN_IN_PROGRESS = ITERATE_KEEPABLE | {RunPhase.CLOSING}  # the training thread is busy
END_STATUS = {"completed": "Training completed", "stopped": "Training stopped", "failed": "Training failed"}
#: the docks a run fills; after a failed run their titles say they are stale until the next run
RUN_PANELS = ("reconstructions", "residuals", "losses", "equivariance")
#: the docks a reconstruction (and the equivariance probe it asks for) shows afresh
RECONSTRUCTION_PANELS = ("reconstructions", "residuals", "equivariance")


class RunLifecycle:
    """The current :class:`RunPhase`; moves only along :data:`TRANSITIONS`."""

    def __init__(self) -> None:
        self.phase = RunPhase.IDLE

    def can(self, target: RunPhase) -> bool:
        return target in TRANSITIONS[self.phase]

    def advance(self, target: RunPhase) -> bool:
        """Move to ``target`` if that is legal from here; False (phase unchanged) if not."""
        if not self.can(target):
            return False
        self.phase = target
        return True

    @property
    def run_in_progress(self) -> bool:
        return self.phase in RUN_IN_PROGRESS


@dataclass(frozen=True)
class ActionStates:
    """Which run and config actions are enabled, and the pause action's text."""

    train: bool
    pause: bool
    pause_text: str
    stop: bool
    keep_iterate: bool
    edit_config: bool
    save_checkpoint: bool


class RunView(Protocol):
    def clear_panels(self) -> None: ...
    def set_progress(self, value: int, maximum: Optional[int] = None) -> None: ...
    def set_status(self, text: str) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def set_settings_editable(self, editable: bool) -> None: ...
    def show_actions(self, actions: ActionStates) -> None: ...
    def show_model_info(self, text: str) -> None: ...
    def mark_stale(self, panels: tuple, note: str) -> None: ...
    def show_invalid_setting(self, key: str) -> None: ...
    def report_error(self, title: str, message, log: bool = True) -> None: ...
    def refresh(self) -> None: ...
    def confirm(self, title: str, question: str) -> bool: ...
    def save_settings(self) -> None: ...
    def shut_down(self) -> None: ...
    def close_window(self) -> None: ...
    def call_later(self, ms: int, fn: Callable[[], None]) -> None: ...


class RunPresenter:
    """Train, Pause / Resume, Stop, Keep iterate and closing, on a training controller.

    ``controller`` is a :class:`~workbench.worker.TrainingController` (or a fake):
    ``start(config, run_dir=, resume_from=) -> bool``, ``pause()``, ``resume()``,
    ``stop()``, ``keep_current_iterate()`` and ``commands`` (the latest run's
    :class:`~workbench.backend.TrainerCommands`, or None). Call :meth:`run_ended`
    when the controller reports the end of a run.
    """

    def __init__(self, view: RunView, controller, state: WorkbenchState, run_root: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.view, self.controller, self.state = view, controller, state
        self.run_root = run_root
        self.clock = clock
        self.lifecycle = RunLifecycle()
        self.total_steps = 0
        self.last_step = 0
        self.started_at = 0.0
        self.on_run_ended: list[Callable[[str], None]] = []  # called with "completed" | "stopped" | "failed"

    @property
    def phase(self) -> RunPhase:
        return self.lifecycle.phase

    @property
    def closing(self) -> bool:
        return self.phase in (RunPhase.CLOSING, RunPhase.CLOSED)

    def training_commands(self):
        """The latest run's :class:`~workbench.backend.TrainerCommands` while its weights are the ones
        in use (since Train, until a checkpoint is opened); else None."""
        return self.controller.commands if self.state.use_training_weights else None

    # -- commands --------------------------------------------------------------------------
    def train(self) -> bool:
        """Start a run on the current config (resuming the opened checkpoint); False if refused."""
        if not self.lifecycle.can(RunPhase.STARTING):
            return False
        if refuse_invalid_settings(self.view, self.state, "Train"):
            return False
        cfg = self.state.config
        resume = self.state.checkpoint_path if self.state.model_source == "checkpoint" else None
        run_dir = backend.new_run_dir(self.run_root, cfg.run.name) if self.run_root else None  # a safe name
        self.view.clear_panels()
        self.view.mark_stale(RUN_PANELS, "")
        self.state.use_training_weights = True
        self.state.run_config = cfg
        self.total_steps, self.last_step = int(cfg.optim.steps), 0
        self.view.set_progress(0, max(1, self.total_steps))
        self.started_at = self.clock()
        if not self.controller.start(cfg, run_dir=run_dir, resume_from=resume):
            return False
        self.lifecycle.advance(RunPhase.STARTING)
        self.view.log_message("info", "training started" + (f" from {os.path.basename(resume)}" if resume else "")
                              + f" on {training_data_text(cfg)}")
        self.view.set_status("Starting training…")
        self.view.set_settings_editable(False)
        self.show_actions()
        return True

    def toggle_pause(self) -> None:
        if self.phase is RunPhase.PAUSED:
            self.lifecycle.advance(RunPhase.RUNNING)
            self.controller.resume()
            self.view.set_status("Resumed")
            self.view.log_message("info", "resumed")
        elif self.lifecycle.advance(RunPhase.PAUSED):
            self.controller.pause()
            self.view.set_status("Paused (Resume to continue, Stop to end)")
            self.view.log_message("info", "paused")
        else:
            return
        self.show_actions()

    def paused_by_run(self, why: str) -> None:
        """The run paused itself (a failed solve, ``RunControl.pause_on_divergence``): Resume / Stop as after Pause."""
        if self.lifecycle.advance(RunPhase.PAUSED):
            self.view.set_status(f"Paused: {why} (Resume to continue, Stop to end)")
            self.show_actions()

    def stop(self) -> None:
        if self.lifecycle.advance(RunPhase.STOPPING):
            self.controller.stop()
            self.view.set_status("Stopping…")
            self.view.log_message("info", "stop requested")
            self.show_actions()

    def keep_current_iterate(self) -> None:
        if self.phase in ITERATE_KEEPABLE:
            self.controller.keep_current_iterate()
            self.view.log_message("info", "keeping the current iterate of the solve in progress")

    # -- what the run reports ----------------------------------------------------------------
    def run_started(self, total_steps: int, start_step: int) -> None:
        """The trainer's RunStarted: its loop is running (a pause asked for meanwhile stays)."""
        if self.phase is RunPhase.STARTING:
            self.lifecycle.advance(RunPhase.RUNNING)
        self.total_steps = int(total_steps)
        self.view.set_progress(int(start_step), max(1, self.total_steps))

    def step_finished(self, step: int) -> None:
        self.last_step = int(step)
        self.view.set_progress(min(self.last_step, max(1, self.total_steps)))

    def seconds_running(self) -> float:
        return self.clock() - self.started_at if self.started_at else 0.0

    def run_ended(self, result: str) -> None:
        """The training thread is free again; ``result`` is "completed", "stopped" or "failed"."""
        closing = self.phase is RunPhase.CLOSING
        if not closing:
            self.lifecycle.advance(RunPhase.FAILED if result == "failed" else RunPhase.FINISHED)
        self.view.set_settings_editable(True)
        self.view.set_status(END_STATUS.get(result, f"Training {result}"))
        if self.controller.commands is not None and result != "failed":
            self.view.show_model_info(f"trained in this session ({result} at step {self.last_step})")
        if result == "failed" and not closing:  # what the panels show is the failed run's, up to its last step
            self.view.mark_stale(RUN_PANELS, f"stale: run failed at step {self.last_step}")
        self.view.refresh()
        self.show_actions()
        for callback in list(self.on_run_ended):
            callback(result)
        if closing:
            self.view.call_later(0, self._finish_closing)

    # -- actions -------------------------------------------------------------------------------
    def actions(self) -> ActionStates:
        phase = self.phase
        in_progress = self.lifecycle.run_in_progress
        return ActionStates(
            train=self.lifecycle.can(RunPhase.STARTING),
            pause=phase is RunPhase.PAUSED or self.lifecycle.can(RunPhase.PAUSED),
            pause_text="Resume" if phase is RunPhase.PAUSED else "Pause",
            stop=phase in STOPPABLE,
            keep_iterate=phase in ITERATE_KEEPABLE,
            edit_config=not in_progress,
            save_checkpoint=self.controller.commands is not None or bool(self.state.checkpoint_path),
        )

    def show_actions(self) -> None:
        self.view.show_actions(self.actions())

    # -- closing -------------------------------------------------------------------------------
    def request_close(self, ask: bool = True) -> bool:
        """The window wants to close; True when it may close now.

        With a run in progress: ask (unless ``ask`` is False), stop the run and
        close once it has ended (or after :data:`CLOSE_GRACE_MS`); refused if the
        user says no. Settings are saved once, when closing begins.
        """
        if self.phase is RunPhase.CLOSED:
            return True
        if self.phase is RunPhase.CLOSING:
            return False
        if self.lifecycle.run_in_progress:
            if ask and not self.view.confirm("Quit EquiDEQ Workbench",
                                             "A training run is in progress. Stop it and quit?"):
                return False
            self.lifecycle.advance(RunPhase.CLOSING)
            self.view.save_settings()
            self.controller.stop()
            self.view.set_status("Stopping the run before quitting…")
            self.show_actions()
            self.view.call_later(CLOSE_GRACE_MS, self._finish_closing)
            return False
        self.view.save_settings()
        self._shut_down()
        return True

    def _finish_closing(self) -> None:
        if self.phase is RunPhase.CLOSING:
            self._shut_down()
            self.view.close_window()

    def _shut_down(self) -> None:
        self.view.shut_down()
        self.lifecycle.advance(RunPhase.CLOSED)
