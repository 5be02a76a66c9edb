"""The bridge between the engine (plain Python threads, observers) and Qt.

* :class:`EventRelay` takes engine events from any thread and hands them to the
  GUI thread in batches: at most one queued wake-up signal is in flight, so a
  solver emitting thousands of events costs one cross-thread emit per GUI
  event-loop turn, not one per event.
* :class:`TrainingController` owns one QThread with a :class:`TrainingWorker`
  in it; the worker builds the engine's Trainer and runs it there, and hands
  the GUI thread a :class:`~workbench.backend.TrainerCommands` (requests the
  training thread executes between steps) instead of the trainer.
* :class:`TaskRunner` runs short jobs (file loading, checkpoint I/O,
  reconstruction, equivariance) on a one-thread QThreadPool and calls back in
  the GUI thread; a task given a :class:`~workbench.jobs.Job` shows its progress
  (``active_jobs``) and can be cancelled.
* :class:`GuiThreadGarbageCollection` keeps Python's cyclic garbage collector
  in the GUI thread while those threads run.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, Qt, QTimer, Signal, Slot

from engine.errors import EquiDEQError
from engine.events import LogMessage, Observers, RunControl, RunFailed, RunFinished
from workbench import backend
from workbench.jobs import Job, JobCancelled

log = logging.getLogger(__name__)


def user_message(exc: BaseException) -> str:
    """What to show for an exception: the engine's own one-liner, else type + text."""
    if isinstance(exc, EquiDEQError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


class EventRelay(QObject):
    """Thread-safe hand-over of engine events to the GUI thread, in batches."""

    eventsReady = Signal(list)
    _wake = Signal()

    def __init__(self, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self._lock = threading.Lock()
        self._pending: list = []
        self._scheduled = False
        self.emitted = 0  # cross-thread wake-ups, for tests / benchmarks
        self._wake.connect(self._drain, Qt.ConnectionType.QueuedConnection)

    def push(self, event) -> None:
        """Observer callback: safe from any thread, cheap."""
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        self.emitted += 1
        self._wake.emit()

    @Slot()
    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
        if batch:
            self.eventsReady.emit(batch)

    def flush(self) -> None:
        """Deliver whatever is pending now (GUI thread)."""
        self._drain()


@dataclass(frozen=True)
class TrainRequest:
    """A run the GUI thread asks the training thread for."""

    config: Any
    control: RunControl
    run_dir: Optional[str] = None
    resume_from: Optional[str] = None


class TrainingWorker(QObject):
    """Lives in the training QThread; builds and runs the engine's trainer there.

    The GUI side never calls the trainer: it gets a
    :class:`~workbench.backend.TrainerCommands` for it through ``trainerReady``,
    whose requests this thread executes between steps.
    """

    trainerReady = Signal(object)  # backend.TrainerCommands of the run just built
    runEnded = Signal(str)  # "completed" | "stopped" | "failed"

    def __init__(self, relay: EventRelay, trainer_factory: Callable) -> None:
        super().__init__()
        self.relay = relay
        self.trainer_factory = trainer_factory
        self._threads_set = False

    @Slot(object)
    def run(self, request: TrainRequest) -> None:
        result = "failed"
        try:
            if not self._threads_set:
                try:
                    backend.configure_torch_thread(int(getattr(request.config.run, "threads", 0) or 0))
                except Exception:  # torch missing in a fake-trainer test: harmless
                    pass
                self._threads_set = True
            observers = Observers([self.relay.push])
            trainer = self.trainer_factory(request.config, run_dir=request.run_dir, observers=observers,
                                           control=request.control, resume_from=request.resume_from)
            self.trainerReady.emit(backend.TrainerCommands(trainer))
            result = str(trainer.run() or "completed")
        except EquiDEQError as exc:
            self.relay.push(RunFailed(message=str(exc)))
            self.relay.push(RunFinished(reason="failed", step=0))
        except Exception as exc:  # engine bug: report, never crash the GUI
            log.exception("training failed")
            self.relay.push(LogMessage("error", traceback.format_exc(limit=6)))
            self.relay.push(RunFailed(message=user_message(exc)))
            self.relay.push(RunFinished(reason="failed", step=0))
        self.runEnded.emit(result)


class TrainingController(QObject):
    """Owns the training thread; start / pause / resume / stop / keep-iterate; clean shutdown.

    Lives in the GUI thread and is only touched there. ``commands`` is the
    :class:`~workbench.backend.TrainerCommands` of the latest run whose trainer
    was built (it stays after the run ends, for saving and probing its model).
    """

    runStarted = Signal()
    runEnded = Signal(str)
    _request = Signal(object)

    def __init__(self, relay: EventRelay, trainer_factory: Callable = backend.make_trainer,
                 parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.relay = relay
        self.thread = QThread()
        self.thread.setObjectName("equideq-training")
        self.worker = TrainingWorker(relay, trainer_factory)
        self.worker.moveToThread(self.thread)
        self._request.connect(self.worker.run, Qt.ConnectionType.QueuedConnection)
        self.worker.trainerReady.connect(self._trainer_ready, Qt.ConnectionType.QueuedConnection)
        self.worker.runEnded.connect(self._on_ended, Qt.ConnectionType.QueuedConnection)
        self.thread.start()
        self.control: Optional[RunControl] = None
        self.commands: Optional[backend.TrainerCommands] = None
        self.running = False
        self.last_result: Optional[str] = None
        #: runs pause themselves when a step fails on a solve (the GUI's persisted setting)
        self.pause_on_divergence = False

    def set_pause_on_divergence(self, on: bool) -> None:
        """For the next runs and the one in progress (a plain bool the trainer reads between steps)."""
        self.pause_on_divergence = bool(on)
        if self.control is not None:
            self.control.pause_on_divergence = bool(on)

    def start(self, config, run_dir=None, resume_from=None) -> bool:
        if self.running:
            return False
        self.control = RunControl()
        self.control.pause_on_divergence = self.pause_on_divergence
        self.running = True
        self._request.emit(TrainRequest(config, self.control, run_dir, resume_from))
        self.runStarted.emit()
        return True

    def _tell(self, order: Callable[[RunControl], None]) -> None:
        if self.control:
            order(self.control)

    def pause(self) -> None:
        self._tell(RunControl.pause)

    def resume(self) -> None:
        self._tell(RunControl.resume)

    def stop(self) -> None:
        self._tell(RunControl.stop)

    def keep_current_iterate(self) -> None:
        self._tell(RunControl.keep_current_iterate)

    @Slot(object)
    def _trainer_ready(self, commands) -> None:
        self.commands = commands

    @Slot(str)
    def _on_ended(self, result: str) -> None:
        self.running = False
        self.last_result = result
        self.relay.flush()
        self.runEnded.emit(result)

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Stop any run and end the thread; True when the thread has finished."""
        self.stop()
        self.thread.quit()
        ok = self.thread.wait(timeout_ms)
        return bool(ok)


class _TaskSignals(QObject):
    done = Signal(int, object, object)  # task id, result, exception


class _Task(QRunnable):
    def __init__(self, task_id: int, fn: Callable, signals: _TaskSignals) -> None:
        super().__init__()
        self.task_id, self.fn, self.signals = task_id, fn, signals
        self.setAutoDelete(True)

    def run(self) -> None:
        try:
            result, exc = self.fn(), None
        except BaseException as e:  # noqa: BLE001 - reported in the GUI thread
            result, exc = None, e
            if not isinstance(e, (EquiDEQError, _Superseded, JobCancelled)):
                log.error("background task failed:\n%s", traceback.format_exc())
        try:
            self.signals.done.emit(self.task_id, result, exc)
        except RuntimeError:  # the window is gone
            pass


class _Superseded(Exception):
    """A task whose result nobody wants any more: a newer one of the same name was submitted."""


class TaskRunner(QObject):
    """Runs callables off the GUI thread, one at a time, and calls back in the GUI thread.

    ``submit(..., supersede=True)`` makes a task replace every earlier one of the
    same name that has not finished: one not yet started never runs, and the
    result of one already running is dropped (its callbacks are not called; its
    job, if any, is cancelled so that its solve stops early). Moving to another
    slice or opening another scan thus never shows a stale reconstruction under
    the new title.

    ``submit(..., job=Job(...))`` makes the task visible to :meth:`active_jobs`
    (the status bar shows its progress and a Cancel button); once its job is
    cancelled, a task not yet started never runs, and whatever a running one
    returns is dropped and ``on_cancel`` is called instead of ``on_done``.
    """

    busyChanged = Signal(bool)

    def __init__(self, parent: Optional[QObject] = None, threads: int = 1) -> None:
        super().__init__(parent)
        self.pool = QThreadPool()
        self.pool.setMaxThreadCount(threads)
        self._signals = _TaskSignals()
        self._signals.done.connect(self._on_done, Qt.ConnectionType.QueuedConnection)
        self._ids = itertools.count(1)
        self._callbacks: dict[int, tuple] = {}
        self._jobs: dict[int, Job] = {}
        self._latest: dict[str, int] = {}  # name -> id of the newest superseding task of that name
        self._torch_ready = False
        self.closed = False  # set at shutdown: late results are dropped

    @property
    def pending(self) -> int:
        return len(self._callbacks)

    def active_jobs(self) -> list[Job]:
        """The jobs of the tasks not finished yet, oldest first (GUI thread)."""
        return [self._jobs[i] for i in sorted(self._jobs)]

    def cancel_all(self) -> None:
        for job in self.active_jobs():
            job.cancel()

    def _stale(self, task_id: int, name: str, supersede: bool) -> bool:
        return supersede and self._latest.get(name, task_id) != task_id

    def submit(self, fn: Callable, on_done: Callable[[Any], None],
               on_error: Optional[Callable[[BaseException], None]] = None, name: str = "",
               supersede: bool = False, job: Optional[Job] = None,
               on_cancel: Optional[Callable[[], None]] = None) -> int:
        task_id = next(self._ids)
        if supersede:
            for other, (_d, _e, other_name, other_supersedes, _c) in self._callbacks.items():
                if other_supersedes and other_name == name and other in self._jobs:
                    self._jobs[other].cancel()  # its result is dropped anyway: stop its solve now
            self._latest[name] = task_id
        self._callbacks[task_id] = (on_done, on_error, name, supersede, on_cancel)
        if job is not None:
            self._jobs[task_id] = job
        runner = self

        def wrapped():
            if runner._stale(task_id, name, supersede):
                raise _Superseded(name)  # skip the work: a newer task of this name is queued
            if job is not None:
                job.check()  # cancelled while queued: never runs
            if not runner._torch_ready:
                try:
                    backend.configure_torch_thread()
                except Exception:
                    pass
                runner._torch_ready = True
            return fn()

        if len(self._callbacks) == 1:
            self.busyChanged.emit(True)
        self.pool.start(_Task(task_id, wrapped, self._signals))
        return task_id

    @Slot(int, object, object)
    def _on_done(self, task_id: int, result, exc) -> None:
        on_done, on_error, name, supersede, on_cancel = self._callbacks.pop(task_id, (None, None, "", False, None))
        job = self._jobs.pop(task_id, None)
        if not self._callbacks:
            self.busyChanged.emit(False)
        if self.closed or isinstance(exc, _Superseded) or self._stale(task_id, name, supersede):
            return
        if isinstance(exc, JobCancelled) or (job is not None and job.cancelled):
            if on_cancel is not None:
                on_cancel()
            return
        if exc is not None:
            if on_error is not None:
                on_error(exc)
        elif on_done is not None:
            on_done(result)

    def wait(self, timeout_ms: int = 30000) -> bool:
        return bool(self.pool.waitForDone(timeout_ms))


class GuiThreadGarbageCollection(QObject):
    """Python's cyclic garbage collector, run only in the GUI thread while this object is active.

    Automatic collection runs in whichever thread happens to allocate, usually
    the training thread. When the garbage holds Qt wrappers (plot items a panel
    removed, a closed window) that thread then destroys Qt objects off their
    own thread: it waits for the GIL while holding Qt's object lock, the GUI
    thread holds the GIL and waits for that lock, and both hang. So automatic
    collection is off while any window is active, and a timer collects in the
    GUI thread by the same generation thresholds (pyqtgraph's GarbageCollector
    does the same). The collector's previous setting comes back when the last
    active one stops.
    """

    _active = 0
    _was_enabled = True

    def __init__(self, parent: Optional[QObject] = None, interval_ms: int = 500) -> None:
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.collect)
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        if GuiThreadGarbageCollection._active == 0:
            GuiThreadGarbageCollection._was_enabled = gc.isenabled()
            gc.disable()
        GuiThreadGarbageCollection._active += 1
        self.running = True
        self._timer.start()

    def stop(self) -> None:
        """Stop collecting on the timer; collect once now (in the GUI thread)."""
        if not self.running:
            return
        self._timer.stop()
        self.running = False
        GuiThreadGarbageCollection._active -= 1
        gc.collect()
        if GuiThreadGarbageCollection._active == 0 and GuiThreadGarbageCollection._was_enabled:
            gc.enable()

    @Slot()
    def collect(self) -> None:
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = -1
        for g in range(3):  # the oldest generation over its threshold, as automatic collection would
            if counts[g] > thresholds[g]:
                generation = g
            else:
                break
        if generation >= 0:
            gc.collect(generation)
