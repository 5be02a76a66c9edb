"""The engine calls the workbench makes, with the heavy imports deferred.

Functions here import torch / deepinv (and the engine modules built on them)
only when called, and the workbench calls them from worker threads, so the
window opens without waiting for torch; :func:`ct_windows`, :func:`unit_windows`,
:func:`scan_hu_window`, :func:`to_hu`, :func:`versions` and :func:`new_run_dir` are the
exceptions the GUI thread calls, and they import no torch. The light engine modules (config, events, errors) are imported directly
where they are used. :class:`TrainerCommands` is the only way the workbench
reaches a running trainer. Nothing here imports Qt.
"""

from __future__ import annotations

from typing import Optional

from contextlib import contextmanager

import numpy as np


def make_trainer(config, run_dir=None, observers=None, control=None, resume_from=None):
    from engine.trainer import Trainer

    return Trainer(config, run_dir=run_dir, observers=observers, control=control, resume_from=resume_from)


def new_run_dir(root: str, name: str) -> str:
    """A fresh ``<root>/<timestamp>-<safe run name>`` folder path (not created)."""
    import time

    from engine.outputs import new_run_dir as _new

    return str(_new(root, name, time.strftime("%Y%m%d-%H%M%S")))


def load_model(path: str):
    from engine.inference import load_model as _load

    return _load(path)


def model_from_config(config):
    from engine.inference import model_from_config as _from

    return _from(config)


def apply_solve_settings(loaded, settings: dict) -> None:
    """Set a LoadedModel's solver and step settings (``solver.*``, ``backward_solver.*``, ``deq.stepsize``,
    ``deq.relaxation``) on the live model; ValueError for any other key (a trained model's are fixed)."""
    from engine.diagnostics.inspect import apply_settings

    skipped = apply_settings(loaded.model, settings)
    if skipped:
        raise ValueError(f"not settings of a live model: {', '.join(skipped)}")


def solve_settings(loaded) -> dict:
    """The forward solve's settings a LoadedModel runs with now, by dotted config key."""
    network, solver = loaded.model, loaded.model.forward_solver
    return {"solver.name": solver.name, "solver.tol": solver.tol, "solver.max_iter": solver.max_iter,
            "solver.memory": solver.memory, "solver.damping": solver.damping, "solver.fallback": solver.fallback,
            "deq.stepsize": float(network.operator.stepsize), "deq.relaxation": float(network.operator.relaxation)}


class TrainerCommands:
    """What the workbench may ask of a training run: each request is a command that the
    training thread executes between steps (``Trainer.between_steps``).

    Built in the training thread right after the trainer, then handed to the GUI
    thread by a queued signal. The GUI thread only passes it on to worker threads;
    the methods block for at most the rest of the current step, so call them from a
    worker thread. Nothing here returns a live tensor: weights and checkpoints are
    copies made by the training thread.
    """

    def __init__(self, trainer) -> None:
        self._trainer = trainer
        self.config = trainer.config  # immutable: the run's config

    def weights(self) -> dict:
        """A CPU copy of the model's weights, taken between steps."""
        return self._trainer.between_steps(self._trainer.weights_copy)

    def save_checkpoint(self, path: str) -> str:
        """Write a checkpoint of the state between steps (captured by the training thread) to ``path``."""
        return str(self._trainer.save_checkpoint(path))

    def recorded_steps(self) -> list:
        """The training steps whose recorded solves are kept (oldest first)."""
        return list(self._trainer.between_steps(self._trainer.recorded_steps))

    def recordings(self, step=None):
        """The recorded solves of ``step`` (default: the newest kept) with their weights
        (``engine.trainer.StepRecordings``), or None."""
        return self._trainer.between_steps(lambda: self._trainer.recordings_of(step))


class TrainerModelView:
    """A LoadedModel that mirrors a training run's current weights, for reconstruct / equivariance.

    Built once per run from its config, then refreshed on every use from a copy
    of the weights that the training thread makes between steps
    (:meth:`TrainerCommands.weights`), so probing the model never switches the
    live training model to eval mode, races its autograd graph, or sees half of
    an optimiser step. Used from the task thread only.
    """

    def __init__(self) -> None:
        self._loaded = None
        self._run: Optional[TrainerCommands] = None

    def get(self, run: TrainerCommands):
        weights = run.weights()
        if self._loaded is None or self._run is not run:
            self._loaded = model_from_config(run.config)
            self._run = run
        self._loaded.model.load_state_dict(weights)
        self._loaded.model.eval()
        return self._loaded


def load_scan(path: str):
    try:
        from engine.data import load_scan as _load
    except ImportError:
        from engine.data.loading import load_scan as _load
    return _load(path)


def prepare_slices(scan, size: int, window=None) -> np.ndarray:
    from engine.data.intensity import prepare_slices as _prep

    return _prep(scan, size, window=window)


#: the most memory the displayed stack of a scan may take (its slices at their own resolution)
DISPLAY_STACK_BYTES = 768 * 2**20


def display_size(scan, budget_bytes: int = DISPLAY_STACK_BYTES) -> int:
    """The side of the square slices the viewer shows: the scan's own (its longer side, as
    prepare_slices pads), smaller only when the whole stack would not fit ``budget_bytes``."""
    rows, cols = scan.slice_shape if scan.kind == "image" or scan.reference is None \
        else np.asarray(scan.reference).shape[-2:]
    side = int(max(rows, cols))
    n = max(1, int(scan.n_slices))
    fits = int((budget_bytes / (4.0 * n)) ** 0.5)
    return max(16, min(side, fits))


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """One displayed [0, 1] slice at ``size x size`` (the engine's antialiased resize; imports torch)."""
    from engine.data.intensity import resize

    return np.asarray(resize(np.asarray(image, dtype=np.float32), int(size)), dtype=np.float32)


def scan_hu_window(scan, window=None) -> Optional[tuple[float, float]]:
    """(low, high) HU that prepare_slices maps ``scan`` onto [0, 1] with (``window``: the config's, None for
    its automatic one); None for a scan not in HU."""
    from engine.data.intensity import scan_hu_window as _window

    hu = _window(scan, window)
    return None if hu is None else (float(hu[0]), float(hu[1]))


def to_hu(values, window) -> np.ndarray:
    """Displayed [0, 1] values -> HU through the window prepare_slices used (engine.data.intensity.to_hu)."""
    from engine.data.intensity import to_hu as _to_hu

    return _to_hu(values, window)


def from_hu(hu, window) -> np.ndarray:
    """HU -> the displayed [0, 1] scale through the window prepare_slices used (engine.data.intensity.from_hu)."""
    from engine.data.intensity import from_hu as _from_hu

    return _from_hu(hu, window)


def model_at_size(loaded, size: int):
    """``loaded`` (a LoadedModel) reconstructing ``size x size`` images: the same weights with the
    operator built for that size (``LoadedModel.at_size``); the engine says when the physics does not allow it."""
    own = int(loaded.config.physics.img_size)
    if int(size) == own:
        return loaded
    return loaded.at_size(int(size))


@contextmanager
def solves_recorded(loaded):
    """While inside, ``loaded``'s solves are recorded (``SolveStats.recording``, which the Solver Inspector
    opens): Reconstruct's; equivariance probes and curves, dozens of solves, run unrecorded."""
    from engine.diagnostics import SolveRecorder

    network = loaded.model
    previous = getattr(network, "recorder_factory", None)
    network.recorder_factory = SolveRecorder  # called with the direction
    try:
        yield
    finally:
        network.recorder_factory = previous


@contextmanager
def solves_stopped_by(loaded, job):
    """While inside, cancelling ``job`` stops the solve in progress on ``loaded`` within one iteration
    (the engine's RunControl, which DEQReconstructor's solvers check between iterations)."""
    from engine.events import RunControl

    network = loaded.model
    control = RunControl()
    forget = job.when_cancelled(control.stop)
    previous = getattr(network, "control", None)
    network.control = control
    try:
        yield
    finally:
        network.control = previous
        forget()


def versions() -> dict:
    """name -> version of the app and the libraries it runs on, read from the installed packages
    (importlib.metadata: nothing is imported, so the GUI thread may call it)."""
    from importlib import metadata
    import platform

    from workbench import __version__

    out = {"EquiDEQ Workbench": __version__, "Python": platform.python_version()}
    for label, dist in (("torch", "torch"), ("deepinv", "deepinv"), ("PySide6", "PySide6-Essentials"),
                        ("pyqtgraph", "pyqtgraph"), ("NumPy", "numpy")):
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "PySide6-Essentials":
                try:
                    out[label] = metadata.version("PySide6")
                    continue
                except metadata.PackageNotFoundError:
                    pass
            out[label] = "not installed"
    return out


def unit_windows() -> dict:
    """The same presets as (low, high) in [0, 1], for images not in HU (phantoms, MR)."""
    from engine.data.intensity import UNIT_WINDOWS

    return dict(UNIT_WINDOWS)


def ct_windows() -> dict:
    """Preset name -> (low, high) HU (the engine's table; engine.data.intensity imports no torch)."""
    from engine.data.intensity import CT_WINDOWS

    return {name: (float(low), float(high)) for name, (low, high) in CT_WINDOWS.items()}


def check_output_file(path, inputs) -> None:
    """Refuse ``path`` when it is one of ``inputs`` (replacing other files was confirmed in the dialog)."""
    from engine.outputs import check_output_file as _check

    _check(path, [p for p in inputs if p], overwrite=True)


def export_image(image, path, window=None, source_scan=None, source_slice=None, units=None, description="",
                 checkpoint_name="", inputs=()):
    """Write one reconstructed slice (in ``units``: HU for a CT scan in HU) with its display window in those units."""
    from engine.export import export_image as _export

    check_output_file(path, inputs)

    return _export(image, path, window=window, source_scan=source_scan, source_slice=source_slice, units=units,
                   description=description, checkpoint_name=checkpoint_name)


def default_images(config, n: int = 1) -> np.ndarray:
    """Phantom input images [n, size, size] for reconstruction when no scan is open."""
    from engine.data.phantoms import phantom_batch

    kind = getattr(config.data, "phantom", "ellipses")
    return phantom_batch(kind, n, int(config.physics.img_size), seed=int(config.data.seed) + 10_000)


def image_metrics(image, reference) -> Optional[tuple[float, float]]:
    """(PSNR, SSIM) of ``image`` against ``reference`` ([H, W] in [0, 1]) via engine.metrics.

    Imports torch/deepinv: call it off the GUI thread. None when unavailable.
    """
    if image is None or reference is None:
        return None
    try:
        import torch

        from engine import metrics

        est = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None]
        with torch.no_grad():
            return float(metrics.psnr(est, ref)[0]), float(metrics.ssim(est, ref)[0])
    except Exception:
        return None


def configure_torch_thread(requested: int = 0) -> None:
    """Call inside a worker thread before running engine code (the engine's thread policy)."""
    from engine.trainer import configure_threads

    configure_threads(requested)


def warm_up() -> None:
    """Import the engine's heavy modules (torch, deepinv) ahead of the first Train.

    Loading torch's shared libraries holds the GIL for a while; doing it once at
    start-up keeps those stalls out of the training run.
    """
    try:
        import engine.trainer  # noqa: F401
        import engine.inference  # noqa: F401
    except Exception:
        pass


def device_name(config=None) -> str:
    """'CUDA: <name>' when a GPU is used, else 'CPU' (imports torch: call off the GUI thread)."""
    want = getattr(getattr(config, "run", None), "device", "auto") if config is not None else "auto"
    try:
        import torch

        if want != "cpu" and torch.cuda.is_available():
            return f"CUDA: {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return "CPU"
