"""Gradient checking as a user feature (``equideq check-gradients``).

On a small float64 sparse-view CT problem with the EI + MC loss and the CT data
step the shipped configs use (``fidelity="ramp"``, stepsize 1.9; ``"l2"`` also
checkable), compare the
parameter gradient of each mode against **unrolled autograd run to
convergence** (the reference: exact for the fixed point once the iteration
has converged far below float64 round-off of the result):

* ``implicit``: the adjoint fixed point in the backward hook; should agree to ~1e-9.
* ``jfb``: Jacobian-free backprop; shown to quantify what it drops.
* a central finite difference of the loss along a random parameter
  direction, against the implicit directional derivative.

Spectral normalisation is off in this check: its power-iteration state
(deliberately) moves when weights move, which a finite difference would
see as noise. The fixed-point map stays contractive through the averaged
denoiser form with a small Lipschitz scale.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from engine.config import ModelConfig, PhysicsConfig, SolverConfig
from engine.data import phantom_batch
from engine.deq import DEQReconstructor, FixedPointOperator
from engine.denoisers import build_denoiser
from engine.losses import TrainingLoss
from engine.config import LossConfig
from engine.physics import build_physics


@dataclass
class GradientCheckReport:
    implicit_rel_error: float
    jfb_rel_error: float
    finite_difference_rel_error: float
    unrolled_iterations: int
    forward_iterations: int
    backward_iterations: int
    image_size: int
    views: int
    dtype: str
    seconds: float
    data_fidelity: str = "ramp"
    stepsize: float = 1.9

    def to_dict(self) -> dict:
        return asdict(self)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def check_gradients(size: int = 16, views: int = 10, batch: int = 2, alpha: float = 1.0, seed: int = 0,
                    unrolled_iterations: int = 400, fd_epsilon: float = 1e-6, fidelity: str = "ramp",
                   stepsize: float = 1.9) -> GradientCheckReport:
    started = time.perf_counter()
    dtype = torch.float64
    torch.manual_seed(seed)
    physics_cfg = PhysicsConfig(modality="ct", img_size=size, views=views, noise="none")
    physics = build_physics(physics_cfg, dtype=dtype)
    x = torch.from_numpy(phantom_batch("ellipses", batch, size, seed=seed)).to(dtype)[:, None]
    y = physics.A(x)
    denoiser = build_denoiser(ModelConfig(channels=8, depth=1, norm="group", spectral_norm=False, lipschitz=0.6), 1)
    operator = FixedPointOperator(denoiser.to(dtype), "pgd", stepsize, fidelity)
    tight = SolverConfig(name="anderson", tol=1e-14, stop_mode="abs", max_iter=500, memory=8)
    model = DEQReconstructor(operator, tight, tight, gradient="implicit", unrolled_iterations=unrolled_iterations)
    model.train()
    loss_fn = TrainingLoss(LossConfig(mode="ei", ei_weight=alpha, transform="rotate", ei_apply_noise=False))

    def loss_value() -> torch.Tensor:
        loss_fn.reseed(seed + 1)  # the same EI rotation in every evaluation
        return loss_fn(model, y, physics).total

    def gradient(mode: str) -> torch.Tensor:
        model.gradient = mode
        model.zero_grad(set_to_none=True)
        loss_value().backward()
        return _flat_grad(model).clone()

    g_unrolled = gradient("unrolled")
    g_implicit = gradient("implicit")
    forward_iterations = model.last_forward_stats.max_iterations_used
    backward_iterations = model.last_backward_stats.max_iterations_used
    g_jfb = gradient("jfb")
    rel = lambda a, b: float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    # central finite difference along a random unit direction in parameter space
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
    direction = [d / norm for d in direction]
    with torch.no_grad():
        model.gradient = "implicit"
        for p, d in zip(params, direction):
            p.add_(fd_epsilon * d)
        plus = float(loss_value())
        for p, d in zip(params, direction):
            p.sub_(2 * fd_epsilon * d)
        minus = float(loss_value())
        for p, d in zip(params, direction):
            p.add_(fd_epsilon * d)
    finite_difference = (plus - minus) / (2 * fd_epsilon)
    analytic = float(sum((p_grad * d).sum() for p_grad, d in
                         zip(torch.split(g_implicit, [p.numel() for p in params]), [d.reshape(-1) for d in direction])))
    fd_rel = abs(finite_difference - analytic) / max(abs(analytic), 1e-300)

    return GradientCheckReport(
        implicit_rel_error=rel(g_implicit, g_unrolled),
        jfb_rel_error=rel(g_jfb, g_unrolled),
        finite_difference_rel_error=fd_rel,
        unrolled_iterations=unrolled_iterations,
        forward_iterations=forward_iterations,
        backward_iterations=backward_iterations,
        image_size=size,
        views=views,
        dtype="float64",
        seconds=time.perf_counter() - started,
        data_fidelity=fidelity,
        stepsize=stepsize,
    )
