"""DEQ gradients: implicit == unrolled autograd (float64), finite differences, JFB differs,
backward-solve statistics, memory independent of forward iterations, divergence reporting."""

import pytest
import torch

from engine.config import LossConfig, PhysicsConfig
from engine.data import phantom_batch
from engine.gradcheck import check_gradients
from engine.losses import TrainingLoss
from engine.physics import build_physics
from helpers import ExpansiveDenoiser, SmoothDenoiser, make_deq, tiny_ct

DT = torch.float64


@pytest.fixture(scope="module")
def problem():
    physics = tiny_ct(16, 8)
    x = torch.from_numpy(phantom_batch("ellipses", 2, 16, seed=3)).to(DT)[:, None]
    return physics, x, physics.A(x)


def param_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def gradient_for(mode, loss_name, problem, denoiser):
    physics, x, y = problem
    model = make_deq(denoiser, gradient=mode, iters=300)
    denoiser.zero_grad(set_to_none=True)
    if loss_name == "mse":
        loss = ((model(y, physics) - x) ** 2).sum()
    else:
        loss_fn = TrainingLoss(LossConfig(mode=loss_name, ei_weight=1.0, ei_apply_noise=False))
        loss_fn.reseed(7)
        loss = loss_fn(model, y, physics, x).total
    loss.backward()
    return param_grad(denoiser), model


@pytest.mark.parametrize("loss_name", ["mse", "mc", "ei"])
def test_implicit_gradient_equals_unrolled_autograd(problem, loss_name):
    denoiser = SmoothDenoiser().to(DT)
    g_unrolled, _ = gradient_for("unrolled", loss_name, problem, denoiser)
    g_implicit, model = gradient_for("implicit", loss_name, problem, denoiser)
    rel = (g_implicit - g_unrolled).norm() / g_unrolled.norm()
    assert rel < 1e-6, f"{loss_name}: implicit vs unrolled rel. error {rel:.2e}"
    assert model.last_backward_stats is not None and model.last_backward_stats.converged


@pytest.mark.parametrize("loss_name", ["mse", "ei"])
def test_jfb_gradient_differs(problem, loss_name):
    denoiser = SmoothDenoiser(scale=0.8).to(DT)
    g_unrolled, _ = gradient_for("unrolled", loss_name, problem, denoiser)
    g_jfb, _ = gradient_for("jfb", loss_name, problem, denoiser)
    assert (g_jfb - g_unrolled).norm() / g_unrolled.norm() > 1e-3


@pytest.mark.parametrize("fidelity", ["ramp", "l2"])
def test_gradient_check_report_with_project_denoiser(fidelity):
    report = check_gradients(size=16, views=10, batch=1, fidelity=fidelity)
    assert report.data_fidelity == fidelity
    assert report.implicit_rel_error < 1e-6
    assert report.finite_difference_rel_error < 1e-5
    assert report.jfb_rel_error > 10 * report.implicit_rel_error
    assert report.forward_iterations > 1 and report.backward_iterations > 1


def test_gradient_flows_into_measurements_as_implicit_function_theorem_says(problem):
    """d x*/d y through the hook equals unrolled autograd (EI differentiates the second call's input)."""
    physics, x, y = problem
    denoiser = SmoothDenoiser().to(DT)
    grads = {}
    for mode in ("implicit", "unrolled"):
        y_var = y.clone().requires_grad_()
        model = make_deq(denoiser, gradient=mode, iters=300)
        (model(y_var, physics) ** 2).sum().backward()
        grads[mode] = y_var.grad
    assert ((grads["implicit"] - grads["unrolled"]).norm() / grads["unrolled"].norm()) < 1e-6


def test_backward_solve_statistics_are_recorded_and_emitted(problem):
    physics, x, y = problem
    events = []
    model = make_deq(SmoothDenoiser().to(DT), tol=1e-8)
    model.on_solve = lambda direction, stats: events.append(stats.to_event(direction))
    loss_fn = TrainingLoss(LossConfig(mode="ei", ei_weight=1.0))
    loss_fn(model, y, physics).total.backward()
    directions = [e.direction for e in events]
    assert directions.count("forward") == 2 and directions.count("backward") == 2  # EI: two model calls
    for event in events:
        assert event.abs_residuals.shape[1] == 2 and event.f_evals >= event.iterations.max()
        assert event.stop_reasons == ["converged", "converged"]
        last = event.abs_residuals[event.iterations - 1, [0, 1]]
        assert (last <= 1e-8).all()


def saved_bytes_of_step(model, physics, y, x):
    """Bytes autograd keeps for backward during one step's forward (what grows when unrolling)."""
    total = {"bytes": 0}

    def pack(t):
        total["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ((model(y, physics) - x) ** 2).sum()
    loss.backward()
    return total["bytes"]


def test_implicit_memory_does_not_grow_with_forward_iterations(problem):
    physics, x, y = problem
    denoiser = SmoothDenoiser().to(DT)
    implicit = {}
    for iters in (20, 200):
        model = make_deq(denoiser, tol=0.0, max_iter=iters)  # tol 0: exactly `iters` iterations
        implicit[iters] = saved_bytes_of_step(model, physics, y, x)
        assert model.last_forward_stats.f_evals == iters
    unrolled = {iters: saved_bytes_of_step(make_deq(denoiser, gradient="unrolled", iters=iters), physics, y, x)
                for iters in (20, 200)}
    assert implicit[20] == implicit[200]
    assert unrolled[200] > 8 * unrolled[20]
    assert unrolled[20] > implicit[20]


def test_expansive_denoiser_is_reported_as_diverged(problem):
    physics, x, y = problem
    model = make_deq(ExpansiveDenoiser(), solver="fixed_point", tol=1e-6, max_iter=500)
    model.forward_solver.fallback = ""
    with torch.no_grad():
        model(y, physics)
    stats = model.last_forward_stats
    assert set(stats.stop_reasons) == {"diverged"}
    assert stats.max_iterations_used < 100


def test_accelerated_solvers_use_fewer_evaluations_on_a_ct_deq():
    from helpers import SlowSmoothingDenoiser

    physics = build_physics(PhysicsConfig(img_size=32, views=12, noise="none"))
    x = torch.from_numpy(phantom_batch("ellipses", 2, 32, seed=1))[:, None]
    y = physics.A(x)
    denoiser = SlowSmoothingDenoiser(0.99)
    evals = {}
    for solver in ("fixed_point", "anderson", "broyden"):
        model = make_deq(denoiser, solver=solver, tol=1e-4, max_iter=2000, stop_mode="rel")
        with torch.no_grad():
            model(y, physics)
        assert model.last_forward_stats.converged, solver
        evals[solver] = model.last_forward_stats.f_evals
    assert evals["anderson"] < 0.5 * evals["fixed_point"], evals
    assert evals["broyden"] < 0.5 * evals["fixed_point"], evals
