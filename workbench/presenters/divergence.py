"""Divergence during training: the alarm, pausing on it, and the built-in demonstration.

* **Alarm.** The trainer emits ``SolveAlarm`` when a step fails on a solve; the
  event router flags it in the residual panel and moves the run to PAUSED when the
  run paused itself. :meth:`DivergencePresenter.alarm` then opens the Solver
  Inspector on the offending solve: on every alarm that paused the run, and on the
  first of a run that did not pause (a window popping up at every failed step of a
  run the user chose not to pause would be noise; the banner's Inspect stays).
* **Pause on divergence** (``RunControl.pause_on_divergence``): on by default,
  persisted with the settings, applied to the next runs and the one in progress.
* **Demonstration.** ``engine.diagnostics.MAKE_IT_DIVERGE`` (no Jacobian penalty,
  data step 5, plain iteration without fallback) applied to the current config,
  then Train: a user sees what divergence looks like, and the tests use it.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from engine.events import SolveAlarm
from workbench import inspection
from workbench.panels.inspector_model import changes_text
from workbench.presenters.inspector import InspectorPresenter
from workbench.presenters.run import RunPhase, RunPresenter
from workbench.state import WorkbenchState

PAUSE_ON_DIVERGENCE_KEY = "inspector/pause_on_divergence"
UNDO_HINT = ("undo with File > Reset Config to Default, or with the remedy buttons of the Solver Inspector "
             "(Run > Solver Inspector…)")


def stored_bool(value: Any, default: bool) -> bool:
    """A bool from a settings store (QSettings' INI gives back "true" / "false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower(), default)
    if isinstance(value, int):
        return bool(value)
    return default


class DivergenceView(Protocol):
    def show_pause_on_divergence(self, on: bool) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def set_status(self, text: str) -> None: ...


class DivergencePresenter:
    def __init__(self, view: DivergenceView, store, state: WorkbenchState, tasks, run: RunPresenter,
                 config_editor, inspector: InspectorPresenter) -> None:
        self.view, self.store, self.state, self.tasks = view, store, state, tasks
        self.run, self.config_editor, self.inspector = run, config_editor, inspector
        self.pause_on_divergence = True

    # -- the setting -------------------------------------------------------------------------------
    def restore(self) -> None:
        self._apply(stored_bool(self.store.value(PAUSE_ON_DIVERGENCE_KEY, True), True))

    def set_pause_on_divergence(self, on: bool) -> None:
        self._apply(bool(on))
        self.store.setValue(PAUSE_ON_DIVERGENCE_KEY, bool(on))
        self.view.log_message("info", "training pauses when a step fails on a solve" if on else
                              "training no longer pauses when a step fails on a solve (the step is retried)")

    def _apply(self, on: bool) -> None:
        self.pause_on_divergence = on
        controller = self.run.controller
        if hasattr(controller, "set_pause_on_divergence"):
            controller.set_pause_on_divergence(on)
        self.view.show_pause_on_divergence(on)

    # -- the alarm ---------------------------------------------------------------------------------
    def alarm(self, ev: SolveAlarm) -> None:
        """After the router flagged it: open the inspector on the failed solve (see the module docstring)."""
        note = self.inspector.residuals.alarm
        if ev.paused or note is None or note.count == 1:
            self.inspector.open(ev.step, ev.direction, ev.tag, ev.sample)

    def inspect_alarm(self) -> None:
        """The banner's Inspect button."""
        note = self.inspector.residuals.alarm
        if note is not None:
            self.inspector.open(note.step, note.direction, note.tag, note.sample)

    # -- the demonstration -------------------------------------------------------------------------
    def demonstrate(self) -> None:
        """Apply the divergence demonstration's settings to the config and Train."""
        if not self.run.lifecycle.can(RunPhase.STARTING):
            self.view.log_message("warning", "Divergence demonstration: a run is in progress; Stop it first")
            return
        self.view.set_status("Divergence demonstration: preparing…")
        self.tasks.submit(inspection.divergence_demonstration, self._demonstrate,
                          lambda exc: self.view.log_message("error", f"Divergence demonstration: {exc}"),
                          name="divergence demonstration")

    def _demonstrate(self, changes: dict) -> Optional[bool]:
        config = self.state.config
        before = {k: getattr(getattr(config, k.split(".")[0]), k.split(".")[1], None) for k in changes}
        try:
            changed = config.replace(**changes)
        except Exception as exc:  # a config these settings do not fit: say so, keep it
            self.view.log_message("error", f"Divergence demonstration refused: {exc}")
            return False
        self.config_editor.set_config(changed, log=False)
        self.view.log_message("warning", f"Divergence demonstration: {changes_text(changes, before)}. The data "
                              "step now stretches the measured directions past contraction; watch the residuals "
                              f"blow up. To {UNDO_HINT}.")
        if not self.pause_on_divergence:
            self.view.log_message("info", "Pause on divergence is off: the run retries the failed step and stops "
                                          "after three failures")
        return self.run.train()
