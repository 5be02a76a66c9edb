"""The data-consistency step: ramp-filtered l2 for CT is a true gradient step on a convex quadratic."""

import pytest
import torch

from engine.config import builtin_config
from engine.data_fidelity import L2Fidelity, RampFilteredL2, ramp_response, resolve_fidelity
from engine.deq import FixedPointOperator
from engine.errors import ConfigError
from tests.helpers import SmoothDenoiser, tiny_ct


def _normal_matrix(physics, fidelity, size):
    """Dense ``A^T W A`` (float64) by applying the gradient to the canonical basis."""
    basis = torch.eye(size * size, dtype=torch.float64).reshape(-1, 1, size, size)
    zero_y = physics.A(torch.zeros(1, 1, size, size, dtype=torch.float64))
    columns = fidelity.grad(basis, zero_y.expand(basis.shape[0], -1, -1, -1), physics)
    return columns.reshape(size * size, size * size).T


def test_ramp_weight_is_symmetric_positive_definite():
    physics = tiny_ct(16, 10)
    fidelity = RampFilteredL2()
    gen = torch.Generator().manual_seed(1)
    shape = physics.A(torch.zeros(1, 1, 16, 16, dtype=torch.float64)).shape
    r, s = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.allclose((fidelity.weight(r) * s).sum(), (r * fidelity.weight(s)).sum(), rtol=1e-12)
    response, size = ramp_response(shape[-2])
    assert size >= 2 * shape[-2]
    assert float(response.min()) > 0  # the floor keeps every frequency's weight positive
    assert float((fidelity.weight(r) * r).sum()) > 0


def test_ramp_gradient_matches_autograd_of_the_weighted_objective():
    physics = tiny_ct(16, 10)
    fidelity = RampFilteredL2()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = physics.A(torch.randn(2, 1, 16, 16, generator=gen, dtype=torch.float64))
    residual = physics.A(x) - y
    objective = 0.5 * (residual * fidelity.weight(residual)).sum()
    (autograd,) = torch.autograd.grad(objective, x)
    assert torch.allclose(fidelity.grad(x.detach(), y, physics), autograd, rtol=1e-10, atol=1e-12)


def test_ramp_lipschitz_is_the_largest_eigenvalue_of_the_normal_operator():
    physics = tiny_ct(16, 10)
    fidelity = RampFilteredL2()
    normal = _normal_matrix(physics, fidelity, 16)
    assert torch.allclose(normal, normal.T, atol=1e-10)
    eigenvalues = torch.linalg.eigvalsh(normal)
    assert float(eigenvalues.min()) > -1e-10  # convex
    assert fidelity.lipschitz(physics, torch.zeros(1, dtype=torch.float64)) == pytest.approx(
        float(eigenvalues.max()), rel=1e-3)


@pytest.mark.parametrize("fidelity", ["l2", "ramp"])
def test_data_step_is_non_expansive_below_stepsize_two_and_expansive_above(fidelity):
    physics = tiny_ct(16, 10)
    size = 16
    normal = _normal_matrix(physics, RampFilteredL2() if fidelity == "ramp" else L2Fidelity(), size)
    lipschitz = float(torch.linalg.eigvalsh(normal).max())
    for stepsize, expansive in ((1.9, False), (2.5, True)):
        operator = FixedPointOperator(SmoothDenoiser().double(), "pgd", stepsize, fidelity)
        eta = stepsize / operator.fidelity.lipschitz(physics, torch.zeros(1, dtype=torch.float64))
        step_matrix = torch.eye(size * size, dtype=torch.float64) - eta * normal
        norm = float(torch.linalg.matrix_norm(step_matrix, ord=2))
        assert (norm > 1.05) == expansive, (stepsize, norm, lipschitz)
        y = physics.A(torch.rand(1, 1, size, size, dtype=torch.float64))
        a, b = torch.rand(2, 1, 1, size, size, dtype=torch.float64)
        moved = operator.data_step(a, y, physics) - operator.data_step(b, y, physics)
        assert torch.allclose(moved.reshape(-1), step_matrix @ (a - b).reshape(-1), atol=1e-10)


def test_auto_fidelity_and_invalid_combinations_are_named():
    assert resolve_fidelity("auto", "ct", "pgd") == "ramp"
    assert resolve_fidelity("auto", "mri", "pgd") == "l2"
    assert resolve_fidelity("auto", "ct", "hqs") == "l2"
    with pytest.raises(ConfigError, match="MRI uses 'l2'"):
        builtin_config("mri_brain").replace(**{"deq.data_fidelity": "ramp"})
    with pytest.raises(ConfigError, match="needs deq.operator = 'pgd'"):
        builtin_config("ct_phantom_quick").replace(**{"deq.operator": "hqs", "deq.data_fidelity": "ramp"})


def test_ramp_fidelity_lifts_the_untrained_deq_above_l2_and_fbp_on_a_real_ct_slice():
    """The shipped pretrained denoiser on pydicom's CT_small.dcm (16 views, 64x64): why ramp is the CT default."""
    from engine.data import load_scan, prepare_slices, pydicom_test_file
    from engine.inference import model_from_config
    from engine.metrics import psnr
    from engine.physics import baseline

    path = pydicom_test_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    image = prepare_slices(load_scan(path), 64, window=[-1000.0, 1500.0])
    scores = {}
    for fidelity in ("l2", "ramp"):
        config = builtin_config("ct_phantom_quick").replace(**{
            "physics.img_size": 64, "physics.views": 16, "deq.stepsize": 1.9, "deq.data_fidelity": fidelity})
        loaded = model_from_config(config, device="cpu")
        x = loaded.images_to_tensor(image)
        y = loaded.simulate(x, seed=0)
        with torch.no_grad():
            scores[fidelity] = float(psnr(loaded.model(y, loaded.physics), x).mean())
        scores["fbp"] = float(psnr(baseline(loaded.physics, y), x).mean())
        assert all(r == "converged" for r in loaded.model.last_forward_stats.stop_reasons)
    assert scores["ramp"] > scores["l2"] + 1.0, scores
    assert scores["ramp"] > scores["fbp"] + 2.0, scores
