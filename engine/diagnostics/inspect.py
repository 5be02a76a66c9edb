"""Run, measure and replay a recorded solve: what the Solver Inspector and ``equideq diagnose`` call.

* :func:`record_forward` solves ``x = F(x; y)`` once with a :class:`SolveRecorder`
  attached and keeps what a replay needs (``y``, the start ``x0``).
* :func:`measure` adds, for one sample, the spectral radius of ``dF/dx`` at the
  last iterate (Arnoldi on JVPs, :func:`engine.linalg.jacobian_spectral_radius`)
  and an empirical Lipschitz estimate of the denoiser at the point it sees.
* :func:`replay` solves the same problem again (the same ``F``, the same start,
  or for an adjoint solve the same ``(dF/dx)^T g + v`` at the same fixed point)
  with other solver settings, and returns a new recording to compare. With the
  original settings it reproduces the original trace exactly: the solvers are
  deterministic.
* :func:`inspect` = measure + :func:`~engine.diagnostics.diagnosis.diagnose`.

The model passed in must hold the weights the solve was recorded with (the
trainer's recordings carry a copy of them in ``replay["weights"]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from engine.config import SolverConfig
from engine.diagnostics.diagnosis import Diagnosis, Settings, diagnose
from engine.diagnostics.recording import SolveRecorder, SolveRecording
from engine.linalg import jacobian_spectral_radius, lipschitz_estimate
from engine.solvers import solve

#: config sections that belong to a trainer, not to a model (apply_settings leaves them to the trainer)
TRAINING_SECTIONS = ("optim", "jacobian", "loss", "run")

#: Arnoldi budget of the inspector's spectral radius (more than the training monitor's: it runs once)
INSPECT_RADIUS_ITERS = 60


@dataclass
class Inspection:
    """A recording with its measurements and diagnoses for one sample."""

    recording: SolveRecording
    sample: int
    spectral_radius: Optional[float] = None
    denoiser_lipschitz: Optional[float] = None
    diagnoses: list[Diagnosis] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON of ``equideq diagnose --json``: ``spectral_radius``, ``stop_reason``, ``diagnoses`` and the trace."""
        summary = self.recording.summary(self.sample)
        return {"spectral_radius": self.spectral_radius, "denoiser_lipschitz": self.denoiser_lipschitz,
                "stop_reason": summary["stop_reason"], **summary,
                "trace": [None if v != v else float(v)
                          for v in self.recording.trace(self.sample, summary["stop_mode"]).tolist()],
                "diagnoses": [d.to_dict() for d in self.diagnoses]}


def apply_settings(model, changes: dict) -> list[str]:
    """Apply solver / DEQ settings (dotted config keys) to a live model; returns the keys it cannot apply.

    ``solver.*`` and ``backward_solver.*`` replace the model's solver options,
    ``deq.stepsize`` and ``deq.relaxation`` change its fixed-point map; training
    settings (``optim.*``, ``jacobian.*``) belong to a trainer and are returned.
    """
    skipped, forward, backward = [], {}, {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if section == "solver":
            forward[name] = value
        elif section == "backward_solver":
            backward[name] = value
        elif key == "deq.stepsize":
            model.operator.stepsize = float(value)
        elif key == "deq.relaxation":
            model.operator.relaxation = float(value)
        else:
            skipped.append(key)
    if forward:
        model.forward_solver = options_with(model.forward_solver, forward)
    if backward:
        model.backward_solver = options_with(model.backward_solver, backward)
    return skipped


def options_with(options: SolverConfig, changes: dict) -> SolverConfig:
    """A copy of ``options`` with fields changed (keys with or without a ``solver.`` prefix)."""
    plain = {k.split(".", 1)[-1]: v for k, v in changes.items()}
    unknown = set(plain) - {f.name for f in dataclasses.fields(SolverConfig)}
    if unknown:
        raise ValueError(f"unknown solver setting(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(options, **plain)


@torch.no_grad()
def record_forward(model, y: torch.Tensor, physics, options: Optional[SolverConfig] = None,
                   x0: Optional[torch.Tensor] = None, every: int = 1, max_frames: Optional[int] = None,
                   tag: str = "") -> SolveRecording:
    """Solve ``model``'s fixed point for ``y`` with a recorder (``options``: default the model's forward solver)."""
    options = options or model.forward_solver
    y = y.detach()
    x0 = model.initial(y, physics) if x0 is None else x0.detach()
    recorder = SolveRecorder("forward", every=every, **({} if max_frames is None else {"max_frames": max_frames}))
    x, stats = solve(model.fixed_point_map(y, physics), x0, options, model.control, recorder=recorder)
    rec = recorder.finish(stats, options, replay={"y": y, "x0": x0, "x_final": x, "physics": physics})
    rec.tag = tag
    return rec


def last_iterate(rec: SolveRecording, sample: int) -> Optional[torch.Tensor]:
    """The last stored iterate of one sample (``[1, C, H, W]``), None if none was stored."""
    if rec.iterates.ndim != 5 or rec.iterates.shape[0] == 0:
        return None
    return torch.from_numpy(rec.iterates[-1, sample:sample + 1].copy())


def _physics_of(physics, rec: SolveRecording):
    """The physics given, else the one the recorded solve ran with."""
    physics = physics if physics is not None else rec.replay.get("physics")
    if physics is None:
        raise ValueError("no physics given and the recording keeps none")
    return physics


def measure(model, physics, rec: SolveRecording, sample: int,
            generator: Optional[torch.Generator] = None) -> tuple[Optional[float], Optional[float]]:
    """(spectral radius of dF/dx, denoiser Lipschitz estimate) where the solve ended; None if unknown.

    "Where it ended" is the solver's answer (its best iterate; for a diverged
    sample the point it got closest from), else the last stored iterate.

    For an adjoint solve the point is the forward fixed point it was solved at:
    its map's Jacobian ``(dF/dx)^T`` has the same spectrum.
    """
    physics = _physics_of(physics, rec)
    y = rec.replay.get("y")
    x = rec.replay.get("x_star" if rec.direction == "backward" else "x_final")
    if x is not None:
        x = x[sample:sample + 1]
    elif rec.direction == "forward":
        x = last_iterate(rec, sample)
    if y is None or x is None:
        return None, None
    device = y.device
    x = x.to(device=device, dtype=y.dtype)
    if not torch.isfinite(x).all():
        return None, None
    y1 = y[sample:sample + 1]
    generator = generator or torch.Generator(device=device).manual_seed(0)
    radius = float(jacobian_spectral_radius(model.fixed_point_map(y1, physics), x, iters=INSPECT_RADIUS_ITERS,
                                            generator=generator, per_sample=True)[0])
    operator = model.operator
    with torch.no_grad():
        point = operator.data_step(x, y1, physics)
    lip = float(lipschitz_estimate(lambda z: operator.denoiser(z, operator.sigma), point, generator=generator))
    return radius, lip


def replay(model, physics, rec: SolveRecording, changes: Optional[dict] = None, every: int = 1) -> SolveRecording:
    """Solve the recorded problem again with ``changes`` to the solver settings (``{}``: as recorded).

    ``physics`` None: the physics the recorded solve ran with.
    """
    physics = _physics_of(physics, rec)
    options = options_with(SolverConfig(**{k: v for k, v in rec.options.items()
                                            if k in {f.name for f in dataclasses.fields(SolverConfig)}}),
                           changes or {})
    y = rec.replay.get("y")
    if y is None:
        raise ValueError("this recording keeps no input to replay (y)")
    if rec.direction == "forward":
        out = record_forward(model, y, physics, options, x0=rec.replay.get("x0"), every=every, tag=rec.tag)
    else:
        out = _replay_backward(model, physics, rec, options, every)
    out.step, out.replay = rec.step, {**rec.replay, **out.replay}
    return out


def _replay_backward(model, physics, rec: SolveRecording, options: SolverConfig, every: int) -> SolveRecording:
    x_star, rhs = rec.replay.get("x_star"), rec.replay.get("rhs")
    if x_star is None or rhs is None:
        raise ValueError("this adjoint recording keeps no fixed point / right-hand side to replay")
    with torch.enable_grad():
        x_leaf = x_star.detach().clone().requires_grad_(True)
        z = model.operator(x_leaf, rec.replay["y"], physics)

        def adjoint_map(g: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(z, x_leaf, g, retain_graph=True)
            return vjp + rhs

        recorder = SolveRecorder("backward", every=every)
        _, stats = solve(adjoint_map, rhs, options, None, recorder=recorder)
    out = recorder.finish(stats, options, replay={})
    out.tag = rec.tag
    return out


def inspect(model, physics, rec: SolveRecording, sample: Optional[int] = None, config: Any = None,
            training: bool = False, measure_jacobian: bool = True) -> Inspection:
    """Measure and diagnose one sample of a recording (default: its worst); ``physics`` None: the recorded one."""
    sample = rec.worst_sample() if sample is None else int(sample)
    radius = lip = None
    if measure_jacobian:
        radius, lip = measure(model, physics, rec, sample)
    settings = Settings.from_config(config, training=training) if config is not None else Settings(
        operator=model.operator.kind, stepsize=float(model.operator.stepsize),
        relaxation=model.operator.relaxation, training=training)
    found = diagnose(rec, sample, spectral_radius=radius, denoiser_lipschitz=lip, settings=settings)
    return Inspection(recording=rec, sample=sample, spectral_radius=radius, denoiser_lipschitz=lip, diagnoses=found)
