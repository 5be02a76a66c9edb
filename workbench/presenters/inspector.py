"""The Solver Inspector: open a recorded solve, scrub its iterates, measure, diagnose, replay, remedy.

What it opens:

* a training step's solves: fetched from the run with the commands the training
  thread runs between steps (``TrainerCommands.recorded_steps`` / ``recordings``),
  also while the run is paused and after it ended;
* a Reconstruct's solve: carried by its row of the residual panel
  (``SolveRecord.source``, kept in ``ResidualsModel.recorded``).

Choosing a recording or a sample (the worst by default) shows its diagnoses at
once (NumPy on the recording) and then measures the spectral radius of ``dF/dx``
and the denoiser's Lipschitz estimate, which re-diagnoses with them. Measuring
and replaying build the model the solve ran with (its config and the weights it
ran with) and run on the task runner: nothing here blocks the GUI thread, and a
result that comes back for a solve no longer open is dropped. A remedy's config
changes go through the config presenter, so the next Train / Reconstruct uses them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Protocol

from workbench import inspection
from workbench.panels.inspector_model import InspectorModel, ReplaySettings, SolveSource, changes_text
from workbench.panels.residuals_model import ResidualsModel, SolveRecord
from workbench.state import WorkbenchState

NOTHING_RECORDED = ("No recorded solve yet: every training step's solves are recorded (Train), and so is "
                    "Reconstruct's.")


class InspectorView(Protocol):
    def show_inspector(self) -> None: ...  # open (or raise) the inspector window
    def log_message(self, level: str, message: str) -> None: ...
    def set_status(self, text: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...


class InspectorPresenter:
    """Drives :class:`~workbench.panels.inspector_model.InspectorModel`; the inspector window draws it.

    ``controller``: the training controller (its ``commands`` are the latest run's,
    or None); ``config_editor``: the :class:`~workbench.presenters.config.ConfigPresenter`
    remedies go through; ``tasks``: the task runner.
    """

    def __init__(self, view: InspectorView, state: WorkbenchState, tasks, controller, config_editor,
                 residuals: ResidualsModel) -> None:
        self.view, self.state, self.tasks = view, state, tasks
        self.controller, self.config_editor, self.residuals = controller, config_editor, residuals
        self.model = InspectorModel()
        self.models = inspection.InspectionModels()  # used in the task thread only
        self.on_changed: list[Callable[[], None]] = []  # the window redraws
        self._pending: dict[str, int] = {}  # task name -> token of its newest submission
        self._tokens = itertools.count(1)
        self._replay_numbers = itertools.count(1)

    # -- tasks --------------------------------------------------------------------------------
    def _submit(self, name: str, work: Callable[[], Any], done: Callable[[Any], None],
                failed: Optional[Callable[[BaseException], None]] = None) -> None:
        """Run ``work`` on the task runner; a newer task of the same ``name`` supersedes it."""
        token = next(self._tokens)
        self._pending[name] = token

        def finish() -> bool:
            if self._pending.get(name) != token:
                return False
            del self._pending[name]
            self.model.working = len(self._pending)
            return True

        def on_done(result) -> None:
            if finish():
                done(result)
            self._changed()

        def on_error(exc: BaseException) -> None:
            if finish():
                (failed or self._failed)(exc)
            self._changed()

        self.model.working = len(self._pending)
        self._changed()
        self.tasks.submit(work, on_done, on_error, name=name, supersede=True)

    def _failed(self, exc: BaseException) -> None:
        self.model.note = f"failed: {exc}"
        self.view.report_error("Solver Inspector", exc)

    def _changed(self) -> None:
        self.model.changed()
        for callback in list(self.on_changed):
            callback()

    # -- opening --------------------------------------------------------------------------------
    def sources(self) -> list[str]:
        """What the step chooser lists: the training steps kept, then the recorded reconstructions."""
        return [f"step {s}" for s in self.model.steps] + [r.source.label for r in self.reconstructions()]

    def reconstructions(self) -> list[SolveRecord]:
        return list(self.residuals.recorded)

    def current_source_index(self) -> int:
        source = self.model.source
        if source is None:
            return -1
        if source.step is not None:
            return self.model.steps.index(source.step) if source.step in self.model.steps else -1
        for i, record in enumerate(self.reconstructions()):
            if record.source is source:
                return len(self.model.steps) + i
        return -1

    def open(self, step: Optional[int] = None, direction: Optional[str] = None, tag: Optional[str] = None,
             sample: Optional[int] = None) -> None:
        """Open a training step's solve (default: the newest step kept, its worst solve and sample)."""
        self.view.show_inspector()
        commands = self.controller.commands
        if commands is None:
            recorded = self.reconstructions()
            if recorded and step is None:
                self.open_source(recorded[-1].source)
            else:
                self.model.show_nothing(NOTHING_RECORDED)
                self._changed()
            return

        def done(result) -> None:
            steps, source = result
            self.model.steps = list(steps)
            if source is None:
                self.model.show_nothing(NOTHING_RECORDED if not steps else f"step {step} is no longer kept")
                return
            if step is not None and source.step != step:
                self.view.log_message("warning", f"Solver Inspector: step {step} is no longer kept; showing step "
                                                 f"{source.step}")
            index = source.find(direction, tag) if direction or tag else None
            self._show(source, source.worst() if index is None else index, sample)

        def failed(exc: BaseException) -> None:
            self.model.show_nothing(f"the run's recorded solves could not be read: {exc}")
            self.view.log_message("warning", f"Solver Inspector: {self.model.note}")

        self._submit("inspector open", lambda: inspection.training_source(commands, step), done, failed)

    def open_record(self, record: SolveRecord) -> None:
        """A double-clicked row of the residual panel: its own recording (Reconstruct) or the run's."""
        if record.source is not None:
            self.view.show_inspector()
            self.open_source(record.source)
        elif record.tag == "reconstruct":
            self.view.show_inspector()
            self.model.show_nothing("this reconstruction's solve was not recorded")
            self._changed()
        else:
            self.open(record.step, record.direction, record.tag or None)

    def open_source(self, source: SolveSource, index: Optional[int] = None, sample: Optional[int] = None) -> None:
        self._show(source, source.worst() if index is None else index, sample)

    def choose_source(self, index: int) -> None:
        """The step chooser: a training step (fetched from the run) or a recorded reconstruction."""
        steps = self.model.steps
        if 0 <= index < len(steps):
            self.open(steps[index])
        elif 0 <= index - len(steps) < len(self.reconstructions()):
            self.open_source(self.reconstructions()[index - len(steps)].source)

    def choose_solve(self, index: int) -> None:
        source = self.model.source
        if source is not None and 0 <= index < len(source.recordings) and index != self.model.index:
            self._show(source, index, None)

    def choose_sample(self, sample: int) -> None:
        if self.model.choose_sample(sample):
            self._inspect()

    def set_frame(self, frame: int) -> None:
        self.model.set_frame(frame)
        self._changed()

    def _show(self, source: SolveSource, index: int, sample: Optional[int]) -> None:
        if not source.recordings:
            self.model.show_nothing(f"{source.label}: no solve was recorded")
            self._changed()
            return
        self.model.open(source, index, sample)
        self._inspect()

    # -- measuring and diagnosing ------------------------------------------------------------------
    def _inspect(self) -> None:
        """Diagnoses at once (cheap), then again with the measured spectral radius (a few seconds)."""
        source, rec, sample = self.model.source, self.model.recording, self.model.sample
        models = self.models

        def current() -> bool:
            return self.model.recording is rec and self.model.sample == sample

        def diagnosed(found) -> None:
            if current() and not self.model.measured:
                self.model.set_inspection(found)

        def measured(result) -> None:
            if current():
                self.model.set_inspection(result.diagnoses, result.spectral_radius, result.denoiser_lipschitz,
                                          measured=True)

        def not_measured(exc: BaseException) -> None:
            if current():
                self.model.set_inspection(self.model.diagnoses, measured=True)
                self.view.log_message("warning", f"Solver Inspector: the spectral radius could not be measured: {exc}")

        self._submit("inspector diagnose", lambda: inspection.diagnoses(source, rec, sample), diagnosed)
        self._submit("inspector measure", lambda: inspection.measure(models, source, rec, sample), measured,
                     not_measured)
        self._changed()

    # -- replays -------------------------------------------------------------------------------
    def replay_defaults(self) -> ReplaySettings:
        rec = self.model.recording
        return ReplaySettings.of(rec.options) if rec is not None else ReplaySettings()

    def replay(self, settings: ReplaySettings) -> None:
        """Solve the open problem again with ``settings``; its trace joins the plot when done."""
        source, rec = self.model.source, self.model.recording
        if rec is None:
            return
        models, changes = self.models, settings.changes()

        def done(result) -> None:
            if self.model.recording is rec:
                replay = self.model.add_replay(settings, result)
                self.view.log_message("info", f"Solver Inspector: {replay.label(self.model.sample)}")

        def failed(exc: BaseException) -> None:
            self.view.report_error("Replay failed", exc)

        name = f"inspector replay {next(self._replay_numbers)}"  # side by side: a name each, none supersedes
        self._submit(name, lambda: inspection.replay(models, source, rec, changes), done, failed)

    def clear_replays(self) -> None:
        self.model.clear_replays()
        self._changed()

    # -- remedies ------------------------------------------------------------------------------
    def apply_remedy(self, index: int) -> bool:
        """Apply diagnosis ``index``'s remedy to the workbench's config; False if refused."""
        if not 0 <= index < len(self.model.diagnoses):
            return False
        remedy = self.model.diagnoses[index].remedy
        config = self.state.config
        before = {}
        for key in remedy.changes:
            section, _, name = key.partition(".")
            before[key] = getattr(getattr(config, section, None), name, None)
        try:
            changed = config.replace(**remedy.changes)
        except Exception as exc:  # a value the config refuses: say so, keep the config
            self.view.report_error("Remedy refused", exc)
            return False
        self.config_editor.set_config(changed, log=False)
        what = changes_text(remedy.changes, before)
        running = self.controller.running if hasattr(self.controller, "running") else False
        later = ("; Reconstruct uses it now, the run in progress keeps its own (Stop, then Train to use it)"
                 if running else "; the next Train / Reconstruct uses it")
        self.view.log_message("info", f"remedy '{remedy.label}' applied to the config: {what}{later}")
        self.view.set_status(f"Remedy applied: {what}")
        return True
