"""Long work the user can watch and cancel: a :class:`Job` is shared by the GUI thread
(which shows its progress and may cancel it) and the task thread doing the work
(which reports progress and checks for cancellation). Qt-free.

Cancelling is cooperative: loops call :meth:`Job.check` between their steps (the
equivariance curve between angles), and a single solve is stopped through the
callbacks registered with :meth:`Job.when_cancelled` (``backend.stopped_by``
links them to the engine's ``RunControl.stop``, which the solvers check between
iterations). Whatever a cancelled job still returns is dropped by the task runner.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class JobCancelled(Exception):
    """Raised in the task thread by :meth:`Job.check` once the user cancelled the job."""


class Job:
    """A titled piece of long work: progress ``done / total`` (total 0: unknown) and a cancel flag."""

    def __init__(self, title: str, cancellable: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.title = title
        self.cancellable = cancellable
        self.clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done, self._total, self._detail = 0, 0, ""
        self._on_cancel: list[Callable[[], None]] = []

    # -- the GUI thread ---------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the work to stop (it stops at its next check, a solve within one iteration)."""
        if not self.cancellable:
            return
        with self._lock:
            if self._cancel.is_set():
                return
            self._cancel.set()
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def progress(self) -> tuple[int, int, str]:
        """(done, total, detail); total 0 when the amount of work is unknown."""
        with self._lock:
            return self._done, self._total, self._detail

    def seconds(self) -> float:
        return self.clock() - self.started

    def describe(self) -> str:
        """One line for the status bar: title, progress, detail."""
        done, total, detail = self.progress()
        text = self.title + ("" if self.title.endswith("…") else "…")
        if total:
            text += f" {done}/{total}"
        if detail:
            text += f" ({detail})"
        return text + (" cancelling" if self.cancelled else "")

    # -- the task thread ----------------------------------------------------------------------
    def advance(self, done: int, total: Optional[int] = None, detail: str = "") -> None:
        with self._lock:
            self._done = int(done)
            if total is not None:
                self._total = int(total)
            self._detail = detail

    def check(self) -> None:
        """Raise :class:`JobCancelled` when the job was cancelled (call between steps of the work)."""
        if self._cancel.is_set():
            raise JobCancelled(self.title)

    def when_cancelled(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` (from the cancelling thread) when the job is cancelled; at once if it was.

        Returns a function that unregisters it.
        """
        with self._lock:
            already = self._cancel.is_set()
            if not already:
                self._on_cancel.append(callback)
        if already:
            callback()

        def forget() -> None:
            with self._lock:
                if callback in self._on_cancel:
                    self._on_cancel.remove(callback)

        return forget
