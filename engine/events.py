"""The plain event objects every observer receives.

The engine reports through observers: callables that take one event. Events are
small, copyable dataclasses holding NumPy arrays and floats, never live tensors
with graphs, so the GUI thread, the CLI progress bar and the run-directory
writer can all keep them safely.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class Event:
    """Base class of all engine events."""


@dataclass
class SolveFinished(Event):
    """Statistics of one fixed-point solve (forward or adjoint/backward).

    ``abs_residuals`` and ``rel_residuals`` have shape ``[iterations, batch]``;
    an entry is NaN once that sample has stopped. ``stop_reasons`` holds one of
    ``converged``, ``max_iterations``, ``diverged``, ``non_finite``, ``stopped``
    per sample. ``iterations`` counts the fallback solver's iterations too, so
    with a ``fallback`` they may exceed ``max_iter``.
    """

    direction: str
    solver: str
    abs_residuals: np.ndarray
    rel_residuals: np.ndarray
    iterations: np.ndarray
    stop_reasons: list[str]
    f_evals: int
    seconds: float
    tolerance: float
    tolerance_mode: str
    fallback: Optional[str] = None
    step: Optional[int] = None
    tag: str = ""
    max_iter: Optional[int] = None  # the iteration cap the solve ran with (a fallback may add as many again)


@dataclass
class RunStarted(Event):
    run_dir: Optional[str]
    config: dict
    device: str
    total_steps: int
    start_step: int = 0


@dataclass
class StepFinished(Event):
    step: int
    losses: dict[str, float]
    lr: float
    seconds: float
    grad_norm: float = float("nan")


@dataclass
class ValidationFinished(Event):
    """Validation metrics at a step.

    ``domain`` is ``"image"`` when reference images exist (PSNR/SSIM of the
    reconstruction against them) and ``"measurement"`` for measured data
    without references: ``psnr`` is then the PSNR of ``A x_hat`` against the
    measured ``y`` (data consistency, not image quality) and ``ssim`` is NaN.
    """

    step: int
    psnr: float
    ssim: float
    baseline_psnr: float = float("nan")
    baseline_ssim: float = float("nan")
    equivariance_error: float = float("nan")
    domain: str = "image"
    spectral_radius: float = float("nan")  # of dF/dx at the first validation fixed point (NaN: not measured)


@dataclass
class StabilityChecked(Event):
    """A spectral-radius estimate of ``dF/dx`` at a training step's fixed points, and what the safeguard did.

    ``action`` is ``"none"``, ``"strengthened"`` (penalty weight raised) or
    ``"rolled_back"`` (also the last good weights restored); ``message`` says so in words.
    """

    step: int
    spectral_radius: float
    limit: float
    penalty_weight: float
    action: str = "none"
    message: str = ""


@dataclass
class Snapshot(Event):
    """Images of one validation sample at a training step, for display.

    ``measurement`` is a sinogram (CT) or k-space log-magnitude (MRI) as a 2D
    array; the images are 2D magnitude arrays. ``mask`` is the MRI sampling
    mask (2D) or None.
    """

    step: int
    measurement: np.ndarray
    baseline: np.ndarray
    reconstruction: np.ndarray
    reference: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    modality: str = "ct"


@dataclass
class CheckpointSaved(Event):
    step: int
    path: str


@dataclass
class LogMessage(Event):
    level: str  # "info" | "warning" | "error"
    message: str


@dataclass
class RunFinished(Event):
    reason: str  # "completed" | "stopped" | "failed"
    step: int
    run_dir: Optional[str] = None


@dataclass
class SolveAlarm(Event):
    """A training step was not applied because a solve failed (diverged / non-finite).

    ``direction`` and ``tag`` name the solve as :class:`SolveFinished` does,
    ``sample`` the first failed sample; ``paused`` is True when the run paused
    itself (:attr:`RunControl.pause_on_divergence`) so the solve can be inspected
    (the step's recordings: :meth:`engine.trainer.Trainer.recordings_of`).
    """

    step: int
    direction: str
    tag: str
    sample: int
    stop_reason: str
    message: str
    paused: bool = False


@dataclass
class RunFailed(Event):
    message: str
    step: int = 0


Observer = Callable[[Event], None]


@dataclass
class Observers:
    """A list of observers; emitting to no one costs nothing.

    Producers check :attr:`active` before building expensive events (converting
    residual traces to NumPy), so recording is free when nobody listens.
    """

    callbacks: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.callbacks)

    def add(self, callback: Observer) -> None:
        self.callbacks.append(callback)

    def remove(self, callback: Observer) -> None:
        self.callbacks.remove(callback)

    def emit(self, event: Event) -> None:
        for callback in list(self.callbacks):
            callback(event)


class RunControl:
    """Thread-safe pause / resume / stop flags and a command queue shared by a run and its controller.

    The trainer checks :meth:`wait_while_paused` between steps and solvers call
    :meth:`should_stop_solve` between iterations, so a stop takes effect within
    one solver iteration and "keep current iterate" ends a long solve early.

    Anything that reads or changes the trainer's live state from another thread
    (save a checkpoint, copy the weights, change a setting) goes through
    :meth:`submit`: the training thread runs it between steps (also while
    paused), so it never sees a half-applied optimiser step. When no run is in
    its loop, :meth:`submit` runs the command at once in the caller's thread,
    since nothing else is touching the state then.
    """

    def __init__(self) -> None:
        #: pause the run when a step fails on a diverged solve (set by whoever can inspect it: the GUI).
        #: A plain bool: assignment is atomic, and the trainer reads it between steps.
        self.pause_on_divergence = False
        self._resume = threading.Event()
        self._resume.set()
        self._stop = threading.Event()
        self._keep_iterate = threading.Event()
        self._wake = threading.Condition()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._serving_thread: Optional[int] = None

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()
        self._notify()

    def stop(self) -> None:
        self._stop.set()
        self._resume.set()
        self._notify()

    def keep_current_iterate(self) -> None:
        """Ask the solve in progress to return its current iterate now."""
        self._keep_iterate.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def should_stop_solve(self) -> bool:
        if self._keep_iterate.is_set():
            self._keep_iterate.clear()
            return True
        return self._stop.is_set()

    def wait_while_paused(self, timeout: Optional[float] = None) -> bool:
        """Run queued commands, then block while paused (running commands that arrive meanwhile).

        Returns False if a stop was requested.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.run_commands()
            if self._resume.is_set():
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            with self._wake:
                if not self._commands and not self._resume.is_set():
                    self._wake.wait(remaining)
        return not self._stop.is_set()

    # -- commands into the training thread ---------------------------------------------------
    def submit(self, command: Callable[[], T]) -> "Future[T]":
        """Run ``command()`` in the training thread between steps; returns a Future of its result."""
        future: Future = Future()
        with self._wake:
            serving = self._serving_thread
            if serving is not None and serving != threading.get_ident():
                self._commands.append((command, future))
                self._wake.notify_all()
                return future
        _run_into(command, future)  # no loop is running, or we are the training thread
        return future

    def run_commands(self) -> int:
        """Run the queued commands (call from the training thread); returns how many ran."""
        count = 0
        while True:
            with self._wake:
                if not self._commands:
                    return count
                command, future = self._commands.popleft()
            _run_into(command, future)
            count += 1

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Mark the calling thread as the training thread for the duration of a run's loop."""
        with self._wake:
            self._serving_thread = threading.get_ident()
        try:
            yield
        finally:
            with self._wake:
                self._serving_thread = None
            self.run_commands()  # whatever was queued before the loop ended

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()


def _run_into(command: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(command())
    except BaseException as exc:  # handed to the caller through the future
        future.set_exception(exc)
