"""Keeping F contractive: the Jacobian penalty, the relaxed map, the spectral-radius monitor and its safeguard."""

import json

import deepinv as dinv
import pytest
import torch
from torch import nn

from engine.config import SolverConfig
from engine.deq import DEQReconstructor, FixedPointOperator
from engine.denoisers import ResUNet
from engine.events import LogMessage, StabilityChecked, StepFinished
from engine.linalg import differentiable_jacobian_norm, jacobian_spectral_radius
from engine.regularisers import JacobianSpectralPenalty
from engine.trainer import MIN_SAFEGUARD_PENALTY, Trainer
from helpers import SmoothDenoiser, make_deq, tiny_ct
from test_trainer import collect, params, tiny_config

F64 = torch.float64


def small_group_net(seed=0):
    torch.manual_seed(seed)
    return ResUNet(1, channels=8, depth=1, norm="group", spectral_norm=False, lipschitz=1.0).double()


def dense_jacobian(fn, x):
    """``[n, n]`` Jacobian of ``fn`` at one sample ``x`` ``[1, ...]``."""
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: fn(v.view(shape)).flatten(), x.flatten())


# -- the penalty ------------------------------------------------------------------------------------

def test_differentiable_jacobian_norm_equals_dense_norm_and_deepinv():
    net = small_group_net()
    x = torch.rand(2, 1, 10, 10, dtype=F64)
    norms = differentiable_jacobian_norm(net, x, iters=80, tol=1e-12)
    for b in range(2):
        exact = torch.linalg.matrix_norm(dense_jacobian(net, x[b:b + 1]), 2)
        assert float(norms[b].detach()) == pytest.approx(float(exact), rel=1e-8)
    xr = x.clone().requires_grad_(True)
    reference = dinv.loss.JacobianSpectralNorm(max_iter=300, tol=1e-12, reduction=None)(net(xr), xr)
    assert torch.allclose(norms.detach(), reference.detach(), rtol=1e-6)


def test_jacobian_penalty_gradient_matches_finite_differences():
    net = small_group_net(seed=1)
    x = torch.rand(2, 1, 10, 10, dtype=F64)
    penalty = JacobianSpectralPenalty(weight=0.7, target=0.1, iters=200, samples=2, tol=1e-13)
    exact = lambda: penalty(net, x, torch.Generator().manual_seed(0))
    value, norms = exact()
    assert float(value.detach()) > 0 and bool((norms > 0.1).all())  # the hinge is active for both samples
    net.zero_grad()
    value.backward()
    checked = 0
    for name, param in [("head.weight", net.head.weight), ("encoders.0.norm.weight", net.encoders[0].norm.weight),
                        ("bottleneck.conv1.weight", net.bottleneck.conv1.weight)]:
        flat = param.detach().view(-1)
        for index in (0, flat.numel() // 2):
            eps = 1e-6
            with torch.no_grad():
                flat[index] += eps
                plus = float(exact()[0])
                flat[index] -= 2 * eps
                minus = float(exact()[0])
                flat[index] += eps
            fd = (plus - minus) / (2 * eps)
            analytic = float(param.grad.view(-1)[index])
            assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9), name
            checked += 1
    assert checked == 6
    assert net.tail.bias.grad is None  # an output offset does not change the Jacobian


def test_penalty_is_zero_below_target_and_off_at_weight_zero():
    net = small_group_net()
    x = torch.rand(1, 1, 10, 10, dtype=F64)
    value, norms = JacobianSpectralPenalty(weight=1.0, target=10.0, iters=20)(net, x)
    assert float(value.detach()) == 0.0 and float(norms[0]) < 10.0
    assert not JacobianSpectralPenalty(weight=0.0).active


# -- relaxation -------------------------------------------------------------------------------------

def test_relaxed_map_has_the_same_fixed_point_and_relaxed_spectrum():
    physics = tiny_ct(size=8, views=4)
    torch.manual_seed(3)
    denoiser = SmoothDenoiser().double()
    y = physics.A(torch.rand(1, 1, 8, 8, dtype=F64))
    plain = make_deq(denoiser)
    relaxed = DEQReconstructor(FixedPointOperator(denoiser, relaxation=0.4),
                               SolverConfig(tol=1e-12, max_iter=400, stop_mode="abs"))
    with torch.no_grad():
        x_plain, x_relaxed = plain.solve_forward(y, physics), relaxed.solve_forward(y, physics)
    assert torch.allclose(x_plain, x_relaxed, atol=1e-10)
    J = dense_jacobian(plain.fixed_point_map(y, physics), x_plain)
    J_relaxed = dense_jacobian(relaxed.fixed_point_map(y, physics), x_plain)
    assert torch.allclose(J_relaxed, 0.4 * J + 0.6 * torch.eye(64, dtype=F64), atol=1e-12)
    J_unrelaxed = dense_jacobian(relaxed.fixed_point_map(y, physics, relaxed=False), x_plain)
    assert torch.allclose(J_unrelaxed, J, atol=1e-12)


def test_relaxation_leaves_the_implicit_gradient_unchanged():
    physics = tiny_ct(size=8, views=4)
    torch.manual_seed(4)
    denoiser = SmoothDenoiser().double()
    x = torch.rand(2, 1, 8, 8, dtype=F64)
    y = physics.A(x)
    grads = {}
    for relaxation in (1.0, 0.5):
        model = DEQReconstructor(FixedPointOperator(denoiser, relaxation=relaxation),
                                 SolverConfig(tol=1e-13, max_iter=500, stop_mode="abs"))
        denoiser.zero_grad()
        ((model(y, physics) - x) ** 2).sum().backward()
        grads[relaxation] = torch.cat([p.grad.flatten() for p in denoiser.parameters()])
    assert torch.allclose(grads[0.5], grads[1.0], rtol=1e-8, atol=1e-12)


def test_relaxation_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="relaxation"):
        FixedPointOperator(SmoothDenoiser(), relaxation=1.5)


# -- the spectral radius at the fixed point -----------------------------------------------------------

def test_spectral_radius_at_the_fixed_point_within_5_percent_of_the_dense_jacobian():
    physics = tiny_ct(size=8, views=4)
    net = small_group_net(seed=5)
    model = DEQReconstructor(FixedPointOperator(net, stepsize=1.9, fidelity="ramp"),
                             SolverConfig(tol=1e-10, max_iter=300, stop_mode="abs"))
    y = physics.A(torch.rand(2, 1, 8, 8, dtype=F64))
    with torch.no_grad():
        x_star = model.solve_forward(y, physics)
    assert model.last_forward_stats.converged
    fn = model.fixed_point_map(y, physics)
    estimate = jacobian_spectral_radius(fn, x_star, iters=30, tol=1e-3, per_sample=True,
                                        generator=torch.Generator().manual_seed(0))
    for b in range(2):
        exact = torch.linalg.eigvals(dense_jacobian(model.fixed_point_map(y[b:b + 1], physics), x_star[b:b + 1]))
        exact = float(exact.abs().max())
        assert float(estimate[b]) == pytest.approx(exact, rel=0.05)


# -- the trainer: penalty, monitor, safeguard ---------------------------------------------------------

class GainDenoiser(nn.Module):
    """``D(x) = g x`` with a learnable gain: expansive for ``g > 1`` in A's null space."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x, sigma=None):
        return self.gain * x


def test_penalty_and_monitor_write_metrics(tmp_path):
    events, observers = collect()
    cfg = tiny_config(**{"jacobian.penalty": 0.5, "jacobian.target": 0.1, "jacobian.monitor_every": 1,
                         "jacobian.power_iters": 4, "optim.steps": 2, "run.validate_every": 2,
                         "model.norm": "none", "model.lipschitz": 0.9})  # provably a 0.9-contraction
    trainer = Trainer(cfg, run_dir=tmp_path, observers=observers)
    assert trainer.run() == "completed"
    steps = [e for e in events if isinstance(e, StepFinished)]
    assert all("jacobian" in e.losses for e in steps)
    checks = [e for e in events if isinstance(e, StabilityChecked)]
    assert [c.step for c in checks] == [1, 2]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "total" in r]
    assert [r["spectral_radius"] for r in step_records] == [c.spectral_radius for c in checks]
    assert all(0 < r["spectral_radius"] < 0.9 and 0.1 < r["jacobian_norm"] < 0.9 for r in step_records)
    assert all(r["jacobian"] == pytest.approx(r["jacobian_norm"] - 0.1, abs=0.1) for r in step_records)
    assert all(r["safeguard"] == "none" for r in step_records)
    assert all(r["jacobian_weight"] == 0.5 for r in step_records)
    validations = [r["validation"] for r in records if "validation" in r]
    assert len(validations) == 2 and all(0 < v["spectral_radius"] < 0.9 for v in validations)


@pytest.mark.parametrize("safeguard", ["strengthen", "rollback"])
def test_safeguard_trips_on_an_expansive_model_and_the_run_continues(tmp_path, safeguard):
    events, observers = collect()
    cfg = tiny_config(**{"jacobian.monitor_every": 1, "jacobian.safeguard": safeguard, "optim.steps": 4,
                         "run.validate_every": 10, "solver.max_iter": 15, "backward_solver.max_iter": 15})
    trainer = Trainer(cfg, run_dir=tmp_path, observers=observers)
    # D(x) = 0.9 x makes F a 0.9-contraction; after step 1 an update (forced here) makes it expansive
    denoiser = GainDenoiser(0.9)
    trainer.model.operator.denoiser = denoiser
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=1e-3)
    trainer.scheduler = None

    def bad_update(event):
        if isinstance(event, StepFinished) and event.step == 1:
            with torch.no_grad():
                denoiser.gain.fill_(1.3)

    observers.add(bad_update)
    assert trainer.run() == "completed"  # the run continues
    checks = [e for e in events if isinstance(e, StabilityChecked)]
    assert checks[0].action == "none" and checks[0].spectral_radius == pytest.approx(0.9, rel=1e-3)
    tripped = checks[1]
    assert tripped.step == 2 and tripped.spectral_radius == pytest.approx(1.3, rel=1e-3)
    assert tripped.penalty_weight == MIN_SAFEGUARD_PENALTY
    expected = "strengthened" if safeguard == "strengthen" else "rolled_back"
    assert tripped.action == expected
    warnings = [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    assert any("spectral radius of dF/dx at the fixed point is 1.3" in w and "penalty weight 0 -> 0.01" in w
               for w in warnings)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("safeguard") for r in records if "total" in r][1] == expected
    if safeguard == "rollback":
        assert any("restored to those of step 0" in w for w in warnings)
        assert all(c.action == "none" for c in checks[2:])  # back to the contractive weights
        assert float(denoiser.gain.detach()) == pytest.approx(0.9, abs=0.01)
    else:  # the penalty pulls the gain down, and the weight doubles while the radius stays above 1
        assert float(denoiser.gain.detach()) < 1.3
        weights = [c.penalty_weight for c in checks[1:] if c.action == "strengthened"]
        assert weights == [MIN_SAFEGUARD_PENALTY * 2 ** k for k in range(len(weights))]


def test_raised_penalty_weight_survives_a_resume(tmp_path):
    cfg = tiny_config(**{"jacobian.penalty": 0.25, "optim.steps": 1, "run.validate_every": 5})
    first = Trainer(cfg, run_dir=tmp_path / "a")
    first.penalty.weight = 0.75  # as the safeguard would have raised it
    first.run()
    resumed = Trainer(cfg.replace(**{"optim.steps": 2}), run_dir=tmp_path / "b",
                      resume_from=tmp_path / "a" / "last.pt")
    assert resumed.penalty.weight == 0.75
