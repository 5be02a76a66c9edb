"""Warm starts: EI's second solve started at ``T_g x1`` (``loss.ei_warm_start``).

The start changes neither the fixed point nor the implicit gradient, only the iterations needed.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ExperimentConfig, LossConfig
from engine.losses import TrainingLoss, warm_startable

from helpers import SmoothDenoiser, make_deq
from test_deq import DT, problem  # noqa: F401  (the float64 16 px CT problem, a module fixture)


class BlockProjection(nn.Module):
    """``D = P``, the projection onto 2x2-block-constant images: a perfect reconstructor of its own
    (90-degree-rotation invariant) image class, so ``T_g x1`` is exactly the EI call's fixed point."""

    def forward(self, x, sigma=None):
        return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")


def ei_step(problem, warm, gradient="implicit", tol=1e-10, denoiser=None, transform="rotate"):
    """One MC + EI step; returns (EI output x3, EI forward-solve stats, flat parameter gradient or None)."""
    physics, _, y = problem
    torch.manual_seed(0)
    trainable = denoiser is None
    denoiser = SmoothDenoiser().to(DT) if denoiser is None else denoiser
    solves = []
    model = make_deq(denoiser, gradient=gradient, tol=tol, stop_mode="rel", iters=300, max_iter=600)
    model.on_solve = lambda direction, stats: solves.append((direction, stats))
    outputs = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    loss_fn = TrainingLoss(LossConfig(mode="ei", ei_weight=1.0, ei_apply_noise=False, ei_warm_start=warm,
                                      transform=transform))
    loss_fn.reseed(7)
    grad = None
    if trainable:
        loss_fn(model, y, physics).total.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in denoiser.parameters()])
    else:
        with torch.no_grad():
            loss_fn(model, y, physics)
    forward = [s for d, s in solves if d == "forward"]
    return outputs[1], (forward[1] if len(forward) > 1 else None), grad


def test_warm_started_ei_call_reaches_the_same_fixed_point_in_fewer_iterations(problem):
    kw = dict(tol=1e-11, denoiser=BlockProjection(), transform="rotate90")
    x3_cold, cold, _ = ei_step(problem, warm=False, **kw)
    x3_warm, warm, _ = ei_step(problem, warm=True, **kw)
    assert cold.converged and warm.converged
    # both at the one fixed point (error <= tol / (1 - rate): this map contracts slowly, ~0.97)
    assert float((x3_warm - x3_cold).norm() / x3_cold.norm()) < 1e-6
    assert warm.max_iterations_used < cold.max_iterations_used // 10, (warm.summary(), cold.summary())


@pytest.mark.parametrize("gradient", ["implicit", "jfb"])
def test_warm_start_keeps_the_gradient(problem, gradient):
    _, _, g_cold = ei_step(problem, warm=False, gradient=gradient)
    _, _, g_warm = ei_step(problem, warm=True, gradient=gradient)
    assert float((g_warm - g_cold).norm() / g_cold.norm()) < 1e-8


def test_warm_started_implicit_gradient_equals_unrolled(problem):
    _, _, g_unrolled = ei_step(problem, warm=False, gradient="unrolled")
    _, _, g_warm = ei_step(problem, warm=True, gradient="implicit", tol=1e-12)
    assert float((g_warm - g_unrolled).norm() / g_unrolled.norm()) < 1e-6


def test_unrolled_network_is_never_warm_started(problem):
    # an unrolled network's output depends on its start: the option leaves it as trained
    assert not warm_startable(make_deq(SmoothDenoiser().to(DT), gradient="unrolled"))
    _, _, g_cold = ei_step(problem, warm=False, gradient="unrolled")
    _, _, g_warm = ei_step(problem, warm=True, gradient="unrolled")
    assert torch.equal(g_cold, g_warm)


def test_ei_warm_start_config_key():
    assert ExperimentConfig().loss.ei_warm_start is False  # off: no net saving measured (benchmarks/README.md)
    assert ExperimentConfig.from_dict({"loss": {"ei_warm_start": True}}).loss.ei_warm_start is True


def test_reused_fixed_points_start_each_image_where_it_last_ended():
    # the same images every step (batch = training set): from step 2 on, the first model call
    # starts at last step's fixed points and needs fewer iterations for the same losses
    from engine.fixed_point_cache import FixedPointCache
    from engine.trainer import Trainer
    from test_trainer import tiny_config

    def first_call_iterations(reuse):
        # a provable 0.9-contraction: one fixed point, whatever the start
        cfg = tiny_config(**{"data.n_train": 2, "optim.batch_size": 2, "optim.steps": 3, "optim.lr": 1e-5,
                             "solver.tol": 1e-5, "solver.max_iter": 200, "model.norm": "none",
                             "model.spectral_norm": True, "model.lipschitz": 0.9, "jacobian.penalty": 0.0,
                             "loss.reuse_fixed_points": reuse, "loss.ei_weight": 1.0, "run.validate_every": 100})
        trainer = Trainer(cfg)
        iterations, losses = [], []
        trainer.model.on_solve = lambda direction, stats: iterations.append((direction, stats.max_iterations_used))
        for _ in range(3):
            before = len(iterations)
            losses.append(trainer.train_step()["total"])
            iterations[before:] = [n for d, n in iterations[before:] if d == "forward"][:1]
        return iterations, losses, trainer

    cold, cold_losses, _ = first_call_iterations(False)
    warm, warm_losses, trainer = first_call_iterations(True)
    assert isinstance(trainer._fixed_point_cache, FixedPointCache) and len(trainer._fixed_point_cache) == 2
    assert warm[0] == cold[0]  # nothing cached before the first step
    assert all(w < c for w, c in zip(warm[1:], cold[1:])), (warm, cold)
    assert warm_losses == pytest.approx(cold_losses, rel=1e-3), (warm, cold)
