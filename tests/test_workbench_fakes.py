"""Synthetic engine stand-ins for the workbench tests: a fake Trainer that emits
realistic events through engine.events.Observers and honours RunControl (its
commands included), a fake LoadedModel, and the helpers that open, wait for and
close a test window. Imported by the other test_workbench_* modules."""

from __future__ import annotations

import threading
import time

import numpy as np

from engine.config import ExperimentConfig
from engine.evaluation import EquivarianceProbe, Reconstruction
from engine.events import (CheckpointSaved, LogMessage, Observers, RunControl, RunFinished, RunStarted, Snapshot,
                           SolveFinished, StepFinished, ValidationFinished)


def solve_event(step: int, direction: str = "forward", iters: int = 6, batch: int = 2, reason: str = "converged",
                tol: float = 1e-3, seed: int = 0) -> SolveFinished:
    rng = np.random.default_rng(seed + step)
    rel = np.full((iters, batch), np.nan)
    for b in range(batch):
        n = iters - b  # later samples stop earlier
        rel[:n, b] = 10.0 ** -np.linspace(0.5, 3.5, n) * (1 + 0.1 * rng.random(n))
    if reason == "diverged":
        rel[:, 0] = 10.0 ** np.linspace(-1, 3, iters)
    abs_ = rel * 5.0
    reasons = [reason] + ["converged"] * (batch - 1)
    return SolveFinished(direction=direction, solver="anderson", abs_residuals=abs_, rel_residuals=rel,
                         iterations=np.array([iters - b for b in range(batch)]), stop_reasons=reasons,
                         f_evals=iters, seconds=0.01, tolerance=tol, tolerance_mode="rel", step=step)


def snapshot_event(step: int, size: int = 16, modality: str = "ct") -> Snapshot:
    rng = np.random.default_rng(step)
    ref = rng.random((size, size)).astype(np.float32)
    return Snapshot(step=step, measurement=rng.random((12, size + 4)).astype(np.float32),
                    baseline=(ref * 0.5).astype(np.float32), reconstruction=(ref * 0.9).astype(np.float32),
                    reference=ref, mask=None, modality=modality)


class FakeOperator:
    """The fixed-point map's settings that ``engine.diagnostics.inspect.apply_settings`` changes."""

    def __init__(self, stepsize: float, relaxation: float) -> None:
        self.stepsize, self.relaxation = stepsize, relaxation


class FakeNetwork:
    """Stands in for ``LoadedModel.model``: one weight, the gain of the reconstruction, and the
    solve settings of a DEQReconstructor (its solvers' options, its step)."""

    def __init__(self, gain: float = 0.9, config: ExperimentConfig | None = None) -> None:
        self.gain = gain
        config = config or ExperimentConfig()
        self.forward_solver, self.backward_solver = config.solver, config.backward_solver
        self.operator = FakeOperator(config.deq.stepsize, config.deq.relaxation)

    def load_state_dict(self, state: dict) -> None:
        self.gain = float(state["gain"])

    def eval(self) -> "FakeNetwork":
        return self


class FakeModel:
    def __init__(self, config: ExperimentConfig | None = None, network: FakeNetwork | None = None) -> None:
        self.config = config or ExperimentConfig().replace(**{"physics.img_size": 16})
        self.model = network or FakeNetwork(config=self.config)
        self.sized: list[int] = []  # the sizes at_size was asked for

    def at_size(self, size: int) -> "FakeModel":
        """The same network reconstructing ``size`` px images (LoadedModel.at_size)."""
        self.sized.append(int(size))
        return FakeModel(self.config.replace(**{"physics.img_size": int(size)}), self.model)

    def reconstruct(self, images) -> Reconstruction:
        images = np.asarray(images, dtype=np.float32)
        nan = np.full(len(images), np.nan)
        return Reconstruction(measurement=images[0, :12, :] + 1.0, baseline=images * 0.5,
                              reconstruction=images * self.model.gain, reference=None, mask=None, modality="ct",
                              domain="image", psnr=nan, baseline_psnr=nan, residual=nan, baseline_residual=nan)

    def equivariance(self, image, angle_deg) -> EquivarianceProbe:
        rot = np.rot90(image, k=int(round(angle_deg / 90.0)) % 4).copy()
        other = rot * 0.95
        return EquivarianceProbe(rotated_reconstruction=rot, reconstruction_of_rotated=other, difference=rot - other,
                                 error=0.05 + angle_deg / 3600.0, angle=float(angle_deg))

    def equivariance_curve(self, image, angles):
        angles = np.asarray(angles, dtype=np.float64)
        return angles, 0.05 + angles / 3600.0


class FakeTrainer:
    """Emits RunStarted, per step forward + backward SolveFinished and StepFinished,
    validation + snapshot every ``run.validate_every`` steps, RunFinished; runs the
    commands of other threads between steps, like the engine's Trainer."""

    step_seconds = 0.02
    gain = 0.9  # the one weight of the model it trains
    instances: list = []

    def __init__(self, config, run_dir=None, observers=None, control=None, resume_from=None):
        self.config = config
        self.observers = observers or Observers()
        self.control = control or RunControl()
        self.run_dir = run_dir
        self.step = 0
        self.events: list = []
        self.thread: int | None = None  # the thread that ran the loop
        self.command_threads: list[int] = []  # the threads that read the live state
        FakeTrainer.instances.append(self)

    def emit(self, ev) -> None:
        self.events.append(ev)
        self.observers.emit(ev)

    def run(self) -> str:
        self.thread = threading.get_ident()
        with self.control.serving():
            return self._run()

    def _run(self) -> str:
        cfg = self.config
        total = cfg.optim.steps
        self.emit(RunStarted(run_dir=self.run_dir, config=cfg.to_dict(), device="cpu", total_steps=total))
        self.emit(LogMessage("info", "fake training"))
        while self.step < total:
            if not self.control.wait_while_paused() or self.control.stopped:
                break
            time.sleep(self.step_seconds)
            s = self.step + 1
            self.emit(solve_event(s, "forward", iters=5 + s % 3))
            self.emit(solve_event(s, "backward", iters=4 + s % 2))
            self.step = s
            self.emit(StepFinished(step=s, losses={"total": 1.0 / s, "mc": 0.6 / s, "ei": 0.4 / s}, lr=1e-3,
                                   seconds=self.step_seconds))
            if s % cfg.run.validate_every == 0 or s == total:
                self.emit(ValidationFinished(step=s, psnr=20.0 + s, ssim=0.5 + s / 100))
                self.emit(snapshot_event(s))
        reason = "completed" if self.step >= total else "stopped"
        self.emit(RunFinished(reason=reason, step=self.step))
        return reason

    def between_steps(self, command):
        return self.control.submit(command).result()

    def weights_copy(self) -> dict:
        self.command_threads.append(threading.get_ident())
        return {"gain": self.gain}

    def save_checkpoint(self, path):
        def capture():
            self.command_threads.append(threading.get_ident())
            return b"fake checkpoint"

        data = self.between_steps(capture)
        with open(path, "wb") as fh:
            fh.write(data)
        self.emit(CheckpointSaved(step=self.step, path=str(path)))
        return path


# -- test windows -------------------------------------------------------------------------
def assert_imports_no_qt(modules: list[str]) -> None:
    """Import ``modules`` in a fresh interpreter and assert no PySide6 / pyqtgraph / shiboken6 came with them."""
    import os
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "qt = sorted(m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'shiboken6')))\n"
            "assert not qt, qt\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def open_window(qtbot, modality_answer: str | None = "ct", **kwargs):
    """A shown MainWindow whose error dialogs go to ``window.dialogs``, whose questions get yes, and whose
    "which modality?" question gets ``modality_answer`` (the names asked about go to ``window.asked_modality``)."""
    from workbench.main_window import MainWindow

    dialogs: list = []
    window = MainWindow(error_dialog=lambda t, m: dialogs.append((t, m)), confirm=lambda t, q: True, **kwargs)
    window.dialogs = dialogs
    window.asked_modality = []
    window.ask_modality = lambda name: window.asked_modality.append(name) or modality_answer
    qtbot.addWidget(window)
    window.show()
    return window


def wait_idle(qtbot, window, timeout=10000) -> None:
    """Wait until no run and no task is in progress, then draw everything that arrived."""
    qtbot.waitUntil(lambda: not window.training.running and window.tasks.pending == 0, timeout=timeout)
    window.relay.flush()
    window.refresh()


def shut_down(qtbot, window, timeout=10000) -> None:
    """Close a test window the way SIGTERM does (stopping any run) and wait until its threads ended."""
    if not window.shut_down_done:
        window.request_shutdown()
        qtbot.waitUntil(lambda: window.shut_down_done, timeout=timeout)


def test_fake_trainer_emits_a_consistent_stream():
    cfg = ExperimentConfig().replace(**{"optim.steps": 3, "run.validate_every": 1})
    seen = []
    t = FakeTrainer(cfg, observers=Observers([seen.append]))
    t.step_seconds = 0.0
    assert t.run() == "completed"
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("StepFinished") == 3 and kinds.count("Snapshot") == 3
