"""CT operator: the sparse-matrix Radon transform equals deepinv's, is exactly adjoint and differentiable.

Small sizes throughout (the 128x128 case once, ~0.3 s to build); no timings here
(``benchmarks/deq_step.py`` has those).
"""

import copy

import pytest
import torch
import deepinv as dinv

from engine.config import PhysicsConfig
from engine.data import phantom_batch
from engine.physics import (SparseTomography, _CT_MATRICES, baseline, build_physics, detector_count,
                            operator_norm)

F64 = torch.float64


def deepinv_reference(physics, angles=None):
    """deepinv's own Tomography for the same geometry, normalised by the same constant."""
    ref = dinv.physics.Tomography(angles=physics.angles if angles is None else angles, img_width=physics.img_width,
                                  circle=physics.circle, normalize=False, adjoint_via_backprop=True,
                                  dtype=physics.dtype)
    ref.register_buffer("operator_norm", physics.operator_norm.detach().clone())
    ref.normalize = True
    return ref


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def ct(size, views, dtype=F64, circle=False, angles=None, noise="none", sigma=0.0):
    cfg = PhysicsConfig(img_size=size, views=views, circle=circle, noise=noise, noise_sigma=sigma)
    return build_physics(cfg, dtype=dtype, angles=angles)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (F64, 1e-13)])
@pytest.mark.parametrize("size,views,circle", [(24, 7, False), (21, 5, True)])
def test_A_and_adjoint_match_deepinv(size, views, circle, dtype, tol):
    physics = ct(size, views, dtype, circle)
    assert isinstance(physics, SparseTomography) and isinstance(physics, dinv.physics.Tomography)
    ref = deepinv_reference(physics)
    x = torch.rand(3, 2, size, size, dtype=dtype)  # batch and channel dims
    y = physics.A(x)
    assert y.shape == (3, 2, detector_count(size, circle), views) and y.dtype == dtype
    assert rel(y, ref.A(x)) < tol
    r = torch.randn_like(y)
    # deepinv's float32 autograd adjoint accumulates in float32 (~1e-6 relative): ours is the closer one
    assert rel(physics.A_adjoint(r), ref.A_adjoint(r)) < (1e-5 if dtype == torch.float32 else tol)


def test_A_matches_deepinv_at_training_size():
    physics = ct(128, 30, torch.float32)
    ref = deepinv_reference(physics)
    x = torch.from_numpy(phantom_batch("ellipses", 2, 128, seed=0))[:, None]
    assert rel(physics.A(x), ref.A(x)) < 1e-6


def test_matrix_is_deepinvs_radon_entry_by_entry():
    """The whole matrix equals the Jacobian of deepinv's grid_sample Radon (float64)."""
    physics = SparseTomography(angles=4, img_width=8, normalize=False, dtype=F64)
    ref = dinv.physics.Tomography(angles=4, img_width=8, normalize=False, dtype=F64)
    x = torch.zeros(1, 1, 8, 8, dtype=F64)
    dense_ref = torch.autograd.functional.jacobian(ref.A, x).reshape(-1, 64)
    dense_ours = physics._operators(x)[0].matrix.to_dense()
    assert dense_ours.shape == dense_ref.shape
    assert (dense_ours - dense_ref).abs().max() < 1e-13
    assert (physics._operators(x)[1].matrix.to_dense() - dense_ours.t()).abs().max() == 0  # exact transpose


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (F64, 1e-14)])
def test_adjoint_is_exact_transpose(dtype, tol):
    physics = ct(32, 9, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, generator=g, dtype=dtype)
    y = torch.randn(2, 1, detector_count(32), 9, generator=g, dtype=dtype)
    lhs = (physics.A(x).double() * y.double()).sum()
    rhs = (x.double() * physics.A_adjoint(y).double()).sum()
    assert abs(lhs - rhs) / abs(lhs) < tol


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward-AD decompositions use torch.jit.script
def test_autograd_is_exact_gradcheck():
    physics = SparseTomography(angles=4, img_width=8, normalize=True, dtype=F64)
    x = torch.randn(2, 1, 8, 8, dtype=F64, requires_grad=True)
    y = torch.randn(2, 1, detector_count(8), 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(physics.A, (x,))
    assert torch.autograd.gradcheck(physics.A_adjoint, (y,))
    assert torch.autograd.gradgradcheck(lambda v: physics.A_adjoint(physics.A(v)) ** 2, (x,))
    assert torch.autograd.gradcheck(physics.A, (x,), check_forward_ad=True, check_backward_ad=False)


def test_torch_func_transforms_work():
    """engine.linalg linearises F with torch.func.vjp / jvp."""
    physics = SparseTomography(angles=4, img_width=8, normalize=True, dtype=F64)
    f = lambda v: torch.tanh(physics.A_adjoint(physics.A(v)))  # noqa: E731
    x = torch.randn(1, 1, 8, 8, dtype=F64)
    v = torch.randn_like(x)
    jac = torch.autograd.functional.jacobian(f, x).reshape(64, 64)
    _, vjp = torch.func.vjp(f, x)
    assert torch.allclose(vjp(v)[0].reshape(-1), jac.t() @ v.reshape(-1), atol=1e-13)
    assert torch.allclose(torch.func.jvp(f, (x,), (v,))[1].reshape(-1), jac @ v.reshape(-1), atol=1e-13)


def test_normalised_to_unit_norm_and_cached():
    physics = ct(24, 6)
    assert operator_norm(physics, (1, 1, 24, 24), dtype=F64, iters=100) == pytest.approx(1.0, abs=1e-6)
    again = ct(24, 6)
    assert float(again.operator_norm) == float(physics.operator_norm)
    x = torch.zeros(1, dtype=F64)
    assert again._operators(x)[0] is physics._operators(x)[0]  # one matrix per geometry / dtype / device
    other = ct(24, 6, torch.float32)
    assert other._operators(x.float())[0].matrix.dtype == torch.float32
    keys = [k for k in _CT_MATRICES if k[:3] == (tuple(float(a) for a in physics.angles), 24, False)]
    assert {k[4] for k in keys} >= {"torch.float32", "torch.float64"}
    # the buffer can be overwritten and is honoured (the benchmark's float64 reference does that)
    xs = torch.rand(1, 1, 24, 24, dtype=F64)
    y = again.A(xs)
    again.operator_norm = again.operator_norm * 2
    assert torch.allclose(again.A(xs), y / 2)
    assert list(physics.state_dict()) == ["angles", "operator_norm"]


def test_explicit_angles():
    angles = [0.0, 11.5, 47.0, 90.0, 133.3]
    physics = ct(20, 5, angles=angles)
    assert torch.allclose(physics.angles.double(), torch.tensor(angles, dtype=F64))
    ref = deepinv_reference(physics, angles=torch.tensor(angles, dtype=F64))
    x = torch.rand(2, 1, 20, 20, dtype=F64)
    assert rel(physics.A(x), ref.A(x)) < 1e-13
    equispaced = ct(20, 5)
    assert rel(physics.A(x), equispaced.A(x)) > 1e-2


def test_fbp_unchanged():
    physics = ct(64, 20, torch.float32)
    ref = deepinv_reference(physics)
    x = torch.from_numpy(phantom_batch("ellipses", 2, 64, seed=0))[:, None]
    y = physics.A(x)
    ours, theirs = baseline(physics, y), ref.A_dagger(ref.A(x), fbp=True)
    assert rel(ours, theirs) < 1e-4

    def psnr(z):
        return float(10 * torch.log10(1 / ((z - x) ** 2).mean()))

    assert psnr(ours) == pytest.approx(psnr(theirs), abs=1e-3)
    assert psnr(ours) > 15


def test_forward_call_adds_noise():
    physics = ct(16, 8, F64, noise="gaussian", sigma=0.1)
    x = torch.rand(4, 1, 16, 16, dtype=F64)
    noise = physics(x) - physics.A(x)
    assert float(noise.std()) == pytest.approx(0.1, rel=0.2)


def test_shape_errors_and_leading_dims():
    physics = ct(16, 8)
    with pytest.raises(ValueError):
        physics.A(torch.zeros(1, 1, 15, 16, dtype=F64))
    with pytest.raises(ValueError):
        physics.A_adjoint(torch.zeros(1, 1, 8, detector_count(16), dtype=F64))
    x = torch.rand(2, 3, 16, 16, dtype=F64)
    y = physics.A(x)
    for c in range(3):
        assert torch.allclose(y[:, c], physics.A(x[:, c:c + 1])[:, 0], atol=1e-14)
    assert physics.A(torch.zeros(0, 1, 16, 16, dtype=F64)).shape == (0, 1, detector_count(16), 8)


def test_deepcopy():
    physics = ct(16, 8)
    twin = copy.deepcopy(physics)
    x = torch.rand(1, 1, 16, 16, dtype=F64)
    assert torch.equal(twin.A(x), physics.A(x))


def test_mri_branch_untouched():
    physics = build_physics(PhysicsConfig(modality="mri", img_size=16, acceleration=4.0, noise="none"))
    assert type(physics) is dinv.physics.MRI
    x = torch.rand(1, 2, 16, 16)
    assert torch.allclose(baseline(physics, physics.A(x)), physics.A_adjoint(physics.A(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    cpu = ct(32, 9, torch.float32)
    gpu = build_physics(PhysicsConfig(img_size=32, views=9, noise="none"), device="cuda", dtype=torch.float32)
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(gpu.A(x.cuda()).cpu(), cpu.A(x), atol=1e-5)
    y = torch.randn(2, 1, detector_count(32), 9)
    assert torch.allclose(gpu.A_adjoint(y.cuda()).cpu(), cpu.A_adjoint(y), atol=1e-5)
