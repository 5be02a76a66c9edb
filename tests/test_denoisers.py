"""Denoisers (conv spectral norm, ResUNet, DnCNN, weights files) and the Lipschitz estimators."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.denoisers import (ConvSpectralNorm, DnCNN, ResUNet, build_denoiser, conv_spectral_norm,
                              load_denoiser_weights, refresh_spectral_norms, save_denoiser_weights)
from engine.errors import CheckpointError
from engine.linalg import jacobian_spectral_norm, jacobian_spectral_radius, lipschitz_estimate

torch.set_num_threads(1)
F64 = torch.float64


# -- helpers --------------------------------------------------------------------------------

def dense_conv_matrix(weight, n, stride=1, padding=1, groups=1):
    """The conv on an n x n zero-padded domain as a dense matrix, column j = A e_j."""
    c_in = weight.shape[1] * groups
    basis = torch.eye(c_in * n * n, dtype=weight.dtype).reshape(-1, c_in, n, n)
    return F.conv2d(basis, weight, None, stride, padding, 1, groups).reshape(basis.shape[0], -1).T


def infinite_domain_norm(weight, grid=256):
    """sup over frequencies of the symbol's largest singular value: an upper bound for any domain."""
    symbol = torch.fft.fft2(weight.to(F64), s=(grid, grid)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(symbol, ord=2).max().item()


def image_like(batch, channels, size, seed=0, dtype=F64):
    """Piecewise-constant ellipse images in [0, 1], like CT phantoms."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, dtype=dtype), torch.linspace(-1, 1, size, dtype=dtype),
                            indexing="ij")
    out = torch.zeros(batch, channels, size, size, dtype=dtype)
    for b in range(batch):
        for c in range(channels):
            img = torch.zeros(size, size, dtype=dtype)
            for _ in range(5):
                cx, cy, a, r, v = torch.rand(5, generator=g, dtype=dtype)
                inside = ((xx - (cx - 0.5)) / (0.2 + 0.5 * a)) ** 2 + ((yy - (cy - 0.5)) / (0.2 + 0.5 * r)) ** 2 <= 1
                img = img + inside.to(dtype) * (0.2 + 0.3 * v)
            out[b, c] = img.clamp(0, 1)
    return out


def linear_map(matrix):
    return lambda x: (x.flatten(1) @ matrix.T).reshape(x.shape)


def orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return q


def spectral_norm_modules(net):
    return [m for m in net.modules() if isinstance(m, ConvSpectralNorm)]


# -- conv spectral normalisation ---------------------------------------------------------------

@pytest.mark.parametrize("c_in,c_out,stride,groups,n", [(3, 4, 1, 1, 10), (2, 5, 2, 1, 9), (4, 6, 1, 2, 8)])
def test_conv_sigma_matches_dense_operator_norm(c_in, c_out, stride, groups, n):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups).double()
    weight = conv.weight.detach().clone()
    sn = ConvSpectralNorm(conv, input_size=n, init_iters=3000)
    exact = torch.linalg.matrix_norm(dense_conv_matrix(weight, n, stride, 1, groups), ord=2).item()
    assert float(sn.sigma) == pytest.approx(exact, rel=1e-3)
    assert float(sn.sigma) <= exact * (1 + 1e-9)  # power iteration approaches from below
    # conv_transpose2d is the exact adjoint on this domain
    x = torch.randn(2, c_in, n, n, dtype=F64)
    y = torch.randn_like(sn.apply_conv(x, weight))
    assert (sn.apply_conv(x, weight) * y).sum().item() == pytest.approx(
        (x * sn.apply_conv_adjoint(y, weight)).sum().item(), rel=1e-10)


def test_default_sigma_is_sandwiched_by_true_norms():
    """32 x 32 domain, 30 iterations: within a few % of the exact norm, never above the sup bound."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    weight = conv.weight.detach().clone()
    sigma = float(ConvSpectralNorm(conv).sigma)
    lower = torch.linalg.matrix_norm(dense_conv_matrix(weight, 12), ord=2).item()  # 12x12 <= 32x32 norm
    upper = infinite_domain_norm(weight)
    assert 0.97 * lower <= sigma <= upper * (1 + 1e-9)
    assert sigma == pytest.approx(upper, rel=0.03)


def test_operator_norm_not_reshaped_matrix_norm():
    """An all-ones 3x3 kernel: reshaped-matrix norm 3, operator norm ~9 (DC gain)."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    sigma = float(ConvSpectralNorm(conv, init_iters=200).sigma)
    assert torch.linalg.matrix_norm(conv.weight.reshape(1, -1), ord=2).item() == pytest.approx(3.0)
    assert 8.8 < sigma <= 9.0


def test_normalised_conv_has_unit_operator_norm():
    torch.manual_seed(2)
    conv = conv_spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double(), input_size=10, init_iters=3000).eval()
    exact = torch.linalg.matrix_norm(dense_conv_matrix(conv.weight.detach(), 10), ord=2).item()
    assert exact == pytest.approx(1.0, rel=1e-3)


def test_sigma_tracks_a_weight_change_that_moves_the_top_singular_direction():
    """An update growing a direction the stored vector does not see is caught within one training call.

    With a single power iteration per change the estimate stays ~10 % below the new norm here, the layer
    briefly exceeded its bound, and as the estimate caught up the trained DEQ drifted with no weight change.
    """
    torch.manual_seed(4)
    conv = conv_spectral_norm(nn.Conv2d(4, 4, 3, padding=1).double(), input_size=12, init_iters=500).train()
    sn = conv.parametrizations.weight[0]
    raw = conv.parametrizations.weight.original
    with torch.no_grad():  # a large random change (output channel 0 untouched) that moves the top direction
        direction = torch.randn_like(raw)
        direction[0] = 0.0
        raw.add_(3.0 * direction * raw.norm() / direction.norm())
    conv(torch.zeros(1, 4, 12, 12, dtype=F64))
    exact = torch.linalg.matrix_norm(dense_conv_matrix(raw.detach(), 12), ord=2).item()
    assert float(sn.sigma) >= 0.94 * exact, (float(sn.sigma), exact)  # one iteration: 0.90


def test_spectral_norm_state_follows_weights_not_calls():
    torch.manual_seed(3)
    conv = conv_spectral_norm(nn.Conv2d(2, 4, 3, padding=1))
    sn = conv.parametrizations.weight[0]
    assert {"parametrizations.weight.0.u", "parametrizations.weight.0.sigma"} <= set(conv.state_dict())
    x = torch.randn(2, 2, 16, 16)
    conv.train()
    u0, y0 = sn.u.clone(), conv(x)
    y1 = conv(x)  # same weights: same map, u frozen (a DEQ solve needs a fixed map)
    assert torch.equal(y0, y1) and torch.equal(sn.u, u0)
    y1.square().sum().backward()  # the gradient reaches the raw weight through sigma
    raw = conv.parametrizations.weight.original
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    conv(x)
    assert not torch.equal(sn.u, u0)  # new weights: SPECTRAL_NORM_TRAIN_ITERS power iterations
    u1, sigma1 = sn.u.clone(), sn.sigma.clone()
    conv.eval()
    conv(x)
    assert torch.equal(sn.u, u1) and torch.equal(sn.sigma, sigma1)  # eval: stored sigma
    with torch.no_grad():
        raw.mul_(2.0)
    conv(x)  # eval after a weight change: u stays, sigma re-measured as ||A_W u||
    assert torch.equal(sn.u, u1) and float(sn.sigma) == pytest.approx(2 * float(sigma1), rel=1e-6)


def test_spectral_norm_float64():
    torch.manual_seed(4)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1)).double().eval()
    sn = conv.parametrizations.weight[0]
    assert sn.u.dtype == F64 and sn.sigma.dtype == F64
    assert conv(torch.randn(1, 2, 8, 8, dtype=F64)).dtype == F64


# -- networks -----------------------------------------------------------------------------------

def make_net(kind, norm="none", channels=8, in_channels=1, lipschitz=0.95, seed=0):
    torch.manual_seed(seed)
    if kind == "resunet":
        return ResUNet(in_channels, channels, depth=2, norm=norm, lipschitz=lipschitz)
    return DnCNN(in_channels, channels, depth=5, norm=norm, lipschitz=lipschitz)


@pytest.mark.parametrize("kind", ["resunet", "dncnn"])
def test_jacobian_norm_within_lipschitz_bound(kind):
    net = make_net(kind).double().eval()
    refresh_spectral_norms(net, 200)
    assert net.lipschitz_bound == 0.95
    points = [torch.rand(2, 1, 24, 24, dtype=F64), image_like(2, 1, 24)]
    for x in points:
        norms = jacobian_spectral_norm(net, x, iters=40, per_sample=True, generator=torch.Generator().manual_seed(0))
        assert norms.shape == (2,)
        assert (norms <= 0.95 * 1.01).all(), norms


def make_isometric(net, seed=0):
    """Set every conv to a centre-tap semi-orthogonal kernel: operator norm exactly 1 (tight layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                raw = module.parametrizations.weight.original
                c_out, c_in = raw.shape[:2]
                q, _ = torch.linalg.qr(torch.randn(max(c_out, c_in), min(c_out, c_in), generator=g, dtype=F64))
                raw.zero_()
                raw[:, :, 1, 1] = q if c_out >= c_in else q.T
                module.bias.zero_()
    refresh_spectral_norms(net, 50)


def test_resunet_applies_its_constant_factors_in_the_convolutions():
    """The factors of the Lipschitz bound (2 after avgpool, 1/2 after upsampling, 1/sqrt(2) after the
    skip's concatenation, the ResBlock's average) are folded into the convolutions' weights: the network
    computes the same as the formula with the factors on the activations and unscaled convolutions."""
    net = make_net("resunet", norm="group").double().eval()
    x = image_like(2, 1, 16, seed=1)
    with torch.no_grad():
        folded = net.residual(x)
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert {(m.input_scale, m.output_scale) for m in convs} == {(1.0, 1.0), (2.0, 1.0), (0.5, 1.0),
                                                                     (1 / math.sqrt(2), 1.0), (1.0, 0.5)}
        for m in convs:
            m.input_scale = m.output_scale = 1.0

        def block(b, h):
            return 0.5 * (h + b.conv2(b.act(b.norm(b.conv1(h)))))

        h, skips = net.head(x), []
        for encode, down in zip(net.encoders, net.downs):
            h = block(encode, h)
            skips.append(h)
            h = down(2.0 * F.avg_pool2d(h, 2))
        h = block(net.bottleneck, h)
        for level in reversed(range(net.depth)):
            h = net.ups[level](0.5 * F.interpolate(h, scale_factor=2, mode="nearest"))
            h = block(net.decoders[level], net.merges[level](torch.cat([h, skips[level]], dim=1) / math.sqrt(2)))
        torch.testing.assert_close(folded, net.tail(h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["resunet", "dncnn"])
def test_jacobian_norm_bound_with_tight_layers(kind):
    net = make_net(kind).double().eval()
    make_isometric(net)
    sigmas = [float(m.sigma) for m in spectral_norm_modules(net)]
    assert sigmas == pytest.approx([1.0] * len(sigmas), rel=1e-9)
    x = image_like(2, 1, 16, seed=3)
    norm = jacobian_spectral_norm(net, x, iters=60, tol=1e-7)
    assert 0 < norm <= 0.95 * (1 + 1e-6)


def test_group_norm_jacobian_is_finite_on_flat_input():
    net = make_net("resunet", norm="group").double().eval()
    assert net.lipschitz_bound == math.inf
    for x in (torch.zeros(1, 1, 16, 16, dtype=F64), image_like(1, 1, 16)):
        norm = jacobian_spectral_norm(net, x, iters=30)
        assert math.isfinite(norm) and 0 < norm < 50


@pytest.mark.parametrize("kind", ["resunet", "dncnn"])
@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("norm", ["none", "group"])
def test_shapes_preserved_for_odd_sizes(kind, in_channels, norm):
    net = make_net(kind, norm=norm, in_channels=in_channels).eval()
    for size in [(37, 45), (5, 3), (1, 1)]:
        x = torch.rand(2, in_channels, *size)
        with torch.no_grad():
            y = net(x, 0.1)  # deepinv convention: sigma accepted, ignored
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_deeper_unet_and_float64():
    net = ResUNet(in_channels=2, channels=4, depth=3, norm="group").double().eval()
    x = torch.rand(1, 2, 13, 29, dtype=F64)
    assert net(x).shape == x.shape and net(x).dtype == F64


def test_wrong_channel_count_is_reported():
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        make_net("resunet")(torch.rand(1, 2, 8, 8))


def test_deepinv_pnp_prior_accepts_denoiser():
    deepinv = pytest.importorskip("deepinv")
    net = make_net("dncnn").eval()
    prior = deepinv.optim.PnP(denoiser=net)
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(prior.prox(x, sigma_denoiser=0.05), net(x))


# -- building and weights files -------------------------------------------------------------------

def test_build_denoiser_from_config():
    torch.manual_seed(0)
    unet = build_denoiser(ModelConfig(denoiser="resunet", channels=4, depth=1, norm="none"), in_channels=2)
    assert isinstance(unet, ResUNet) and unet.in_channels == 2 and unet.depth == 1 and unet.lipschitz == 0.95
    dncnn = build_denoiser(ModelConfig(denoiser="dncnn", channels=4, depth=2, lipschitz=0.5), in_channels=1)
    assert isinstance(dncnn, DnCNN) and dncnn.depth == 6 and dncnn.lipschitz == 0.5
    assert sum(isinstance(m, nn.GroupNorm) for m in dncnn.modules()) == 4
    plain = build_denoiser(ModelConfig(channels=4, depth=1, spectral_norm=False), in_channels=1)
    assert not spectral_norm_modules(plain)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_roundtrip(tmp_path, suffix):
    cfg = ModelConfig(channels=4, depth=1)
    net = build_denoiser(cfg, 1).eval()
    path = tmp_path / "sub" / f"den{suffix}"
    save_denoiser_weights(net, path)
    assert os.listdir(path.parent) == [path.name]  # atomic: no temporary file left
    torch.manual_seed(123)
    cfg_with_file = ModelConfig(channels=4, depth=1, weights=str(path))
    assert not torch.equal(build_denoiser(cfg_with_file, 1).head.bias, net.head.bias)  # architecture only
    other = build_denoiser(cfg_with_file, 1, load_weights=True).eval()
    x = torch.rand(2, 1, 11, 9)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


def test_load_reports_missing_and_corrupt_files(tmp_path):
    net = make_net("dncnn", channels=4)
    with pytest.raises(CheckpointError, match="not found"):
        load_denoiser_weights(net, tmp_path / "nope.pt")
    for name in ("junk.pt", "junk.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(os.urandom(4096))
        with pytest.raises(CheckpointError, match=f"{name}: not a readable weights file"):
            load_denoiser_weights(net, bad)
    truncated = tmp_path / "cut.pt"
    save_denoiser_weights(net, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable"):
        load_denoiser_weights(net, truncated)


def test_load_reports_first_mismatching_key_and_shapes(tmp_path):
    path = tmp_path / "w8.pt"
    save_denoiser_weights(make_net("dncnn", channels=8), path)
    with pytest.raises(CheckpointError) as info:
        load_denoiser_weights(make_net("dncnn", channels=4), path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'body.0.bias' has shape (8,) in the file but (4,) in the model" in msg
    # weights saved without spectral normalisation: the key is named, with a hint
    torch.save(make_net("dncnn", channels=4).state_dict(), path)
    plain = DnCNN(1, 4, depth=5, spectral_norm=False)
    with pytest.raises(CheckpointError, match=r"key 'body\.0\.weight' is missing from the file "
                                             r"\(the file was saved with spectral normalisation"):
        load_denoiser_weights(plain, path)
    torch.save(plain.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"key 'body\.0\.parametrizations\.weight\.original' is missing.*"
                                             r"without spectral normalisation"):
        load_denoiser_weights(make_net("dncnn", channels=4), path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_denoiser_weights(plain, path)


def test_load_unwraps_checkpoint_and_rejects_nan(tmp_path):
    net = make_net("dncnn", channels=4).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    other = load_denoiser_weights(make_net("dncnn", channels=4, seed=9).eval(), path)
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(other(x), net(x))
    state = net.state_dict()
    state["body.0.bias"] = torch.full_like(state["body.0.bias"], float("nan"))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="'body.0.bias' contains NaN"):
        load_denoiser_weights(net, path)


# -- Lipschitz estimators ------------------------------------------------------------------------

def test_spectral_norm_and_lipschitz_estimate_of_known_linear_map():
    n = 16
    singular = torch.linspace(0.1, 2.0, n, dtype=F64)
    singular[-1] = 2.5
    matrix = orthogonal(n, 1) @ torch.diag(singular) @ orthogonal(n, 2).T
    fn = linear_map(matrix)
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    g = torch.Generator().manual_seed(0)
    assert jacobian_spectral_norm(fn, x, generator=g) == pytest.approx(2.5, abs=1e-4)
    per_sample = jacobian_spectral_norm(fn, x, generator=g, per_sample=True)
    assert per_sample.shape == (3,) and torch.allclose(per_sample, torch.full((3,), 2.5, dtype=F64), atol=1e-4)
    assert lipschitz_estimate(fn, x, n_restarts=3, generator=g) == pytest.approx(2.5, abs=1e-4)
    # clustered top singular values (2.5, 2.49) still converge
    singular[-2] = 2.49
    fn = linear_map(orthogonal(n, 3) @ torch.diag(singular) @ orthogonal(n, 4).T)
    assert lipschitz_estimate(fn, x, iters=60, generator=g) == pytest.approx(2.5, abs=1e-4)


def test_spectral_norm_per_sample_of_block_diagonal_map():
    scales = torch.tensor([0.5, 3.0], dtype=F64)
    fn = lambda x: x * scales.view(-1, 1, 1, 1) * torch.tensor([1.0, 0.2], dtype=F64).view(1, 2, 1, 1)
    norms = jacobian_spectral_norm(fn, torch.randn(2, 2, 3, 3, dtype=F64), per_sample=True)
    assert torch.allclose(norms, scales, atol=1e-8)


def _similar(eigen_block, seed):
    n = eigen_block.shape[0]
    p = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 3 * torch.eye(n, dtype=F64)
    return p @ eigen_block @ torch.linalg.inv(p)


@pytest.mark.parametrize("dominant", ["real", "complex", "plus_minus"])
def test_spectral_radius_of_non_symmetric_map(dominant):
    n = 12
    block = torch.diag(torch.linspace(-0.6, 0.5, n, dtype=F64))
    if dominant == "real":
        block[0, 0] = -0.9
    elif dominant == "complex":  # 0.9 exp(+-i 0.9): plain power iteration would rotate forever
        block[:2, :2] = 0.9 * torch.tensor([[math.cos(0.9), -math.sin(0.9)], [math.sin(0.9), math.cos(0.9)]])
    else:
        block[0, 0], block[1, 1] = 0.9, -0.9
    matrix = _similar(block, seed=5)
    assert torch.linalg.eigvals(matrix).abs().max().item() == pytest.approx(0.9)
    assert torch.linalg.matrix_norm(matrix, ord=2).item() > 1.0  # non-normal: radius < norm
    fn = linear_map(matrix)
    x = torch.randn(2, 1, 3, 4, dtype=F64)
    g = torch.Generator().manual_seed(0)
    # tol bounds the Ritz residual; for a non-normal map the eigenvalue error can be
    # a condition number larger, hence the tight tol for a 1e-6 answer.
    assert jacobian_spectral_radius(fn, x, iters=200, tol=1e-10, generator=g) == pytest.approx(0.9, abs=1e-6)
    assert jacobian_spectral_radius(fn, x, generator=g) == pytest.approx(0.9, abs=1e-4)  # defaults


class _SineWithoutJvp(torch.autograd.Function):
    """3 sin(x) with a backward but no forward-mode rule."""

    @staticmethod
    def forward(x):
        return 3 * x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x.cos() * grad


def test_estimators_fall_back_when_fn_has_no_forward_mode():
    x = torch.full((2, 5), 0.5, dtype=F64)
    expected = 3 * math.cos(0.5)
    assert jacobian_spectral_norm(_SineWithoutJvp.apply, x) == pytest.approx(expected, rel=1e-8)
    assert jacobian_spectral_radius(_SineWithoutJvp.apply, x) == pytest.approx(expected, rel=1e-8)


def test_estimators_leave_no_parameter_gradients_and_keep_mode():
    net = make_net("resunet", norm="group").double()
    x = image_like(1, 1, 16)
    for mode in ("eval", "train"):
        getattr(net, mode)()
        with torch.no_grad():
            net(x)  # settle the spectral-norm state after .double() moved the weights
        state = {k: v.clone() for k, v in net.state_dict().items()}
        jacobian_spectral_norm(net, x, iters=6)
        jacobian_spectral_radius(net, x, iters=6)
        lipschitz_estimate(net, x, iters=4, n_restarts=2)
        assert all(p.grad is None for p in net.parameters())
        assert net.training == (mode == "train")
        after = net.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state)  # weights unchanged: no SN update


def test_estimators_work_in_float32():
    net = make_net("dncnn").eval()
    x = image_like(2, 1, 16, dtype=torch.float32)
    assert 0 < jacobian_spectral_norm(net, x, iters=20) <= 0.95 * 1.05
    assert 0 < jacobian_spectral_radius(net, x, iters=20) <= 0.95 * 1.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_forward_and_estimates():
    net = make_net("resunet", norm="group").cuda().eval()
    x = image_like(2, 1, 24, dtype=torch.float32).cuda()
    with torch.no_grad():
        assert net(x).shape == x.shape
    net.train()
    net(x).mean().backward()
    net.eval()
    assert math.isfinite(jacobian_spectral_norm(net, x, iters=10))
    assert all(m.u.is_cuda for m in spectral_norm_modules(net))
