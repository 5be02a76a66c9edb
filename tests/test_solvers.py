"""Solvers: convergence, per-sample stopping, divergence and non-finite reporting, fallback."""

import math

import numpy as np
import pytest
import torch

from engine.config import SolverConfig
from engine.events import RunControl
from engine.solvers import SOLVERS, solve

DT = torch.float64


def contractive_linear(d=60, rho=0.95, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    w = q @ torch.diag(torch.linspace(-0.5, rho, d, dtype=DT)) @ q.T
    b = torch.randn(batch, d, generator=g, dtype=DT)
    exact = torch.linalg.solve(torch.eye(d, dtype=DT) - w, b.T).T
    return (lambda x: x @ w.T + b), exact


@pytest.mark.parametrize("name", list(SOLVERS))
def test_reaches_tolerance_on_contractive_linear_map(name):
    f, exact = contractive_linear()
    x, stats = solve(f, torch.zeros_like(exact), SolverConfig(name=name, tol=1e-10, stop_mode="abs",
                                                                max_iter=3000, memory=10, fallback=""))
    assert stats.stop_reasons == ["converged"] * 3
    assert np.all(stats.final_residual("abs") <= 1e-10)
    # residual 1e-10 and contraction 0.95 -> error <= 1e-10 / (1 - 0.95)
    assert torch.linalg.vector_norm(x - exact, dim=1).max() < 1e-10 / 0.05 * 1.01
    assert stats.f_evals == stats.abs_residuals.__len__()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_reaches_tolerance_on_nonlinear_map(name):
    f_lin, exact = contractive_linear(d=40, rho=0.9)
    f = lambda x: 0.9 * torch.tanh(f_lin(x))
    x, stats = solve(f, torch.zeros_like(exact), SolverConfig(name=name, tol=1e-9, max_iter=2000, fallback=""))
    assert stats.converged
    assert torch.all(torch.linalg.vector_norm(f(x) - x, dim=1) / torch.linalg.vector_norm(f(x), dim=1) <= 1.01e-9)


def test_accelerated_solvers_need_fewer_evaluations_on_hard_linear_map():
    f, exact = contractive_linear(d=200, rho=0.99)
    evals = {}
    for name in SOLVERS:
        _, stats = solve(f, torch.zeros_like(exact), SolverConfig(name=name, tol=1e-8, max_iter=5000, memory=30,
                                                                    fallback=""))
        assert stats.converged, name
        evals[name] = stats.f_evals
    assert evals["anderson"] < evals["fixed_point"] / 3
    assert evals["broyden"] < evals["fixed_point"] / 3


def test_each_sample_stops_on_its_own_tolerance():
    # sample 0 is already at its fixed point, sample 1 needs many iterations
    f = lambda x: 0.9 * x + torch.tensor([[0.0], [1.0]], dtype=DT)
    x0 = torch.tensor([[0.0], [0.0]], dtype=DT)
    x, stats = solve(f, x0, SolverConfig(name="fixed_point", tol=1e-6, stop_mode="abs", max_iter=500))
    assert stats.iterations.tolist()[0] == 1
    assert stats.iterations.tolist()[1] > 100
    trace = stats.trace("abs")
    assert np.isnan(trace[1:, 0]).all() and np.isfinite(trace[: stats.iterations[1], 1]).all()
    assert x[0].item() == 0.0  # frozen once converged
    assert abs(x[1].item() - 10.0) < 1e-4


@pytest.mark.parametrize("name", ["fixed_point", "broyden", "anderson"])
def test_expansive_map_without_fixed_point_is_reported_not_looped(name):
    # x -> 1.5 x + 1 + x^2 / 10 has no real fixed point and runs away
    f = lambda x: 1.5 * x + 1 + 0.1 * x ** 2
    x0 = torch.zeros(2, 5, dtype=DT)
    _, stats = solve(f, x0, SolverConfig(name=name, tol=1e-8, max_iter=500, fallback=""))
    assert set(stats.stop_reasons) <= {"diverged", "non_finite"}
    assert stats.failed
    assert stats.max_iterations_used < 500


def test_expansive_affine_map_diverges_under_plain_iteration():
    f = lambda x: 1.8 * x + 0.1
    _, stats = solve(f, torch.zeros(3, 4, dtype=DT), SolverConfig(name="fixed_point", tol=1e-8, max_iter=500,
                                                                   fallback=""))
    assert stats.stop_reasons == ["diverged"] * 3
    assert stats.max_iterations_used < 50


def test_non_finite_input_is_reported():
    f = lambda x: 0.5 * x
    x0 = torch.zeros(3, 4, dtype=DT)
    x0[1, 2] = float("nan")
    for name in SOLVERS:
        _, stats = solve(f, x0, SolverConfig(name=name, tol=1e-8, max_iter=100, fallback=""))
        assert stats.stop_reasons[1] == "non_finite", name
        assert stats.stop_reasons[0] == stats.stop_reasons[2] == "converged", name


def test_fallback_takes_over_diverged_samples_and_is_logged():
    # Broyden with memory 1 and an aggressive step on a stiff map fails; damped iteration converges
    calls = {"n": 0}

    def f(x):
        calls["n"] += 1
        return -0.95 * x + 1.0

    x, stats = solve(f, torch.zeros(2, 3, dtype=DT), SolverConfig(name="fixed_point", tol=1e-9, max_iter=3,
                                                                   fallback="anderson"))
    # plain iteration hits the cap (not a failure): no fallback
    assert stats.fallback is None and set(stats.stop_reasons) == {"max_iterations"}
    nan_once = {"done": False}

    def g(x):
        if not nan_once["done"]:
            nan_once["done"] = True
            return torch.full_like(x, float("inf"))
        return 0.5 * x + 1.0

    x, stats = solve(g, torch.zeros(2, 3, dtype=DT), SolverConfig(name="anderson", tol=1e-9, max_iter=100,
                                                                   fallback="fixed_point"))
    assert stats.fallback == "fixed_point"
    assert stats.converged
    assert torch.allclose(x, torch.full_like(x, 2.0), atol=1e-8)
    # the cap travels with the statistics, so a display can say "N iterations (max 100)" after a fallback
    assert stats.max_iter == 100 and stats.to_event("forward").max_iter == 100
    assert stats.to_event("forward").fallback == "fixed_point"


def test_stop_request_ends_solve_with_stopped_reason():
    control = RunControl()
    count = {"n": 0}

    def f(x):
        count["n"] += 1
        if count["n"] == 5:
            control.keep_current_iterate()
        return 0.999 * x + 1

    _, stats = solve(f, torch.zeros(2, 2, dtype=DT), SolverConfig(name="anderson", tol=0.0, max_iter=1000), control)
    assert stats.stop_reasons == ["stopped", "stopped"]
    assert stats.f_evals == 5
    assert not control.stopped  # keep-current-iterate is one-shot, not a stop of the run


def test_stats_event_is_plain_numpy():
    f, exact = contractive_linear(batch=2)
    _, stats = solve(f, torch.zeros_like(exact), SolverConfig(name="anderson", tol=1e-6))
    event = stats.to_event("forward", step=3)
    assert isinstance(event.abs_residuals, np.ndarray) and event.abs_residuals.shape == (stats.f_evals, 2)
    assert event.direction == "forward" and event.step == 3 and event.f_evals == stats.f_evals
    assert event.rel_residuals[0, 0] == pytest.approx(1.0)  # from x0 = 0: |f(0) - 0| / |f(0)|
