"""File > Open Run and Follow Run: a run directory's record in the panels a live run fills.

The rules:

* a run directory (``equideq train --out``, or a run of this or another
  workbench, on a local or a mounted / synced disk) is read by
  :class:`engine.run_record.RunRecordReader`, always on the task runner: a slow
  disk never blocks the window;
* its events reach the panels by the routes a live run's take
  (:class:`RecordedRunRouter`, an :class:`~workbench.presenters.events.EventRouter`
  that leaves the model in use, the device and the session's run alone);
* Open Run reads the record to its end once; Follow Run then reads what is new
  every :data:`FOLLOW_INTERVAL_MS` (one read at a time) until the run has
  finished, Stop Following is chosen, another run is opened or followed,
  another file is opened, or training starts;
* neither is possible while a training run is in progress (its panels would be
  replaced): the user is told so and nothing changes;
* the panels are cleared only once the folder has been read as a run, so a
  folder that is not one (or cannot be read) leaves what is shown as it was;
* a record rewritten under the reader (a resume cuts it back, an overwrite
  replaces it) is shown again from its beginning.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Protocol

from engine.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, StepFinished
from engine.run_record import RecordPoll, RunRecordReader
from workbench.presenters.events import EventRouter, PanelModels
from workbench.presenters.run import RUN_PANELS, RunPresenter
from workbench.presenters.settings import SettingsPresenter
from workbench.state import WorkbenchState

FOLLOW_INTERVAL_MS = 1000
READ_ERROR_TITLE = "Cannot open run"


class RecordedRunRouter(EventRouter):
    """The live routes, for a recorded run: panels, progress and log as in training, but the
    model in use, the device, the session's run directory and checkpoint stay as they are, and
    failures are logged, not shown in dialogs (the run is not this session's)."""

    def run_started(self, ev: RunStarted) -> None:
        # no "diverged solve" dialog for a recorded run: its failures are in the log and the residuals panel
        self.problem_logs, self.divergence_reported = 0, True
        self.run.run_started(ev.total_steps, ev.start_step)
        self.view.show_run(ev.run_dir, "(recorded)")
        self.view.log_message("info", f"run directory {ev.run_dir}: {ev.total_steps} steps configured")

    def step_finished(self, ev: StepFinished) -> None:
        self.panels.losses.add_step(ev)
        self.run.step_finished(ev.step)

    def checkpoint_saved(self, ev: CheckpointSaved) -> None:
        self.view.log_message("info", f"checkpoint of step {ev.step}: {ev.path}")

    def run_failed(self, ev: RunFailed) -> None:
        self.view.log_message("error", f"the run failed at step {ev.step}: {ev.message}")

    def run_finished(self, ev: RunFinished) -> None:
        self.panels.residuals.run_ended(ev.reason)
        self.view.log_message("info", f"the run {ev.reason} at step {ev.step}")


class RunRecordView(Protocol):
    def ask_folder(self, title: str, start: str) -> str: ...
    def clear_panels(self) -> None: ...
    def mark_stale(self, panels: tuple, note: str) -> None: ...
    def set_status(self, text: str) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...
    def show_following(self, following: bool) -> None: ...
    def refresh(self) -> None: ...
    def call_later(self, ms: int, fn: Callable[[], None]) -> None: ...


class RunRecordPresenter:
    """Open Run / Follow Run / Stop Following.

    ``remember(kind, path)`` adds an opened run to the recent files;
    ``reader_factory(path)`` makes the reader (tests pass fakes).
    """

    def __init__(self, view: RunRecordView, state: WorkbenchState, tasks, run: RunPresenter, panels: PanelModels,
                 settings: SettingsPresenter, remember: Callable[[str, str], None],
                 reader_factory: Callable[[str], Any] = RunRecordReader,
                 interval_ms: int = FOLLOW_INTERVAL_MS) -> None:
        self.view, self.state, self.tasks, self.run = view, state, tasks, run
        self.settings, self.remember = settings, remember
        self.router = RecordedRunRouter(view, state, run, panels)
        self.reader_factory = reader_factory
        self.interval_ms = interval_ms
        self.path: Optional[str] = None  # the run shown
        self.reader = None  # its RunRecordReader, used only on the task runner
        self.following = False
        self.finished: Optional[RunFinished] = None
        self.last_step = 0
        self._reading = 0  # the reads of the run shown; a stop or another run makes older ones stale
        self._opening = 0  # the run being opened; a newer open or a stop makes older ones stale
        self._failing = False  # the last follow read failed (logged once per failing streak)

    # -- commands ----------------------------------------------------------------------------
    def open_run_dialog(self) -> None:
        path = self.view.ask_folder("Open run directory", self.settings.last_dir())
        if path:
            self.open_run(path)

    def follow_run_dialog(self) -> None:
        path = self.view.ask_folder("Follow run directory", self.settings.last_dir())
        if path:
            self.follow_run(path)

    def open_run(self, path: str) -> bool:
        """Show a run directory's record as it is now; False if refused."""
        return self._open(path, follow=False)

    def follow_run(self, path: str) -> bool:
        """Show a run directory's record and keep showing what is added to it; False if refused."""
        return self._open(path, follow=True)

    def stop_following(self, why: str = "") -> None:
        """Stop reading the run shown (following it, or the rest of a long record) and any run being opened;
        the panels stay as they are."""
        self._reading += 1  # reads in progress are dropped when they return
        self._opening += 1
        if not self.following:
            return
        self._set_following(False)
        self.view.set_status(f"Stopped following {self.path}" + (f": {why}" if why else ""))
        self.view.log_message("info", f"stopped following {self.path}" + (f" ({why})" if why else ""))

    # -- reading -------------------------------------------------------------------------------
    def _open(self, path: str, follow: bool) -> bool:
        if self.run.lifecycle.run_in_progress:
            self.view.report_error(READ_ERROR_TITLE, "A training run is in progress. Stop it (or let it finish) "
                                                     "before opening a run directory: its panels would be replaced.")
            return False
        path = os.path.abspath(path)
        self._opening += 1
        opening = self._opening
        self.view.set_status(f"Reading run {path}…")

        def read():
            reader = self.reader_factory(path)
            return reader, reader.poll()

        def first(result) -> None:  # the run shown until now (followed or not) gives way only now
            if opening != self._opening:
                return
            self.stop_following("another run opened")
            self.reader, poll = result
            self.path, self.finished, self.last_step = path, None, 0
            self.view.clear_panels()
            self.view.mark_stale(RUN_PANELS, "")
            self.remember("run", path)
            self._set_following(follow)
            self._show(self._reading, poll)

        def failed(exc: BaseException) -> None:  # what is shown stays, followed or not
            if opening == self._opening:
                self.view.set_status(f"Run {path} not opened")
                self.view.report_error(READ_ERROR_TITLE, exc)

        self.tasks.submit(read, first, failed, name="read run")
        return True

    def _read_more(self, reading: int) -> None:
        if reading != self._reading:
            return
        reader = self.reader
        self.tasks.submit(reader.poll, lambda poll: self._show(reading, poll),
                          lambda exc: self._read_failed(reading, exc), name="read run")

    def _show(self, reading: int, poll: RecordPoll) -> None:
        """A read's events into the panels; then the next read, if any."""
        if reading != self._reading:
            return
        self._failing = False
        if poll.restarted:
            self.view.clear_panels()
            self.view.log_message("info", f"{self.path} was rewritten (a resume or an overwrite): read again")
        self.router.route_batch(poll.events)
        for warning in poll.warnings:
            self.view.log_message("warning", warning)
        self.finished, self.last_step = poll.finished, poll.last_step
        if poll.more:  # a long record: the rest at once, a part per read
            self.view.set_status(f"Reading run {self.path} — step {self.last_step}…")
            self.view.call_later(0, lambda: self._read_more(reading))
            return
        self.view.refresh()
        if self.finished is not None:
            self._set_following(False)
            self.view.set_status(f"Run {self.path}: {self.finished.reason} at step {self.finished.step}")
        elif self.following:
            self.view.set_status(f"Following {self.path} — step {self.last_step}")
            self.view.call_later(self.interval_ms, lambda: self._read_more(reading))
        else:
            self.view.set_status(f"Run {self.path}: step {self.last_step} (not finished; Follow Run shows more "
                                 "as it is written)")

    def _read_failed(self, reading: int, exc: BaseException) -> None:
        """A follow read failed (a mounted disk away, a file unreadable): said once, then tried again."""
        if reading != self._reading:
            return
        if not self._failing:
            self._failing = True
            self.view.log_message("warning", f"following {self.path}: {exc}; trying again")
        self.view.set_status(f"Following {self.path} — step {self.last_step} (cannot read it now: trying again)")
        self.view.call_later(self.interval_ms, lambda: self._read_more(reading))

    def _set_following(self, following: bool) -> None:
        self.following = following
        self.view.show_following(following)
