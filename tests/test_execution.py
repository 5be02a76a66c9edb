"""How the denoiser runs (``run.memory_format``, ``run.autocast``, ``run.compile``): faster, same map.

Channels-last and compilation must not change the reconstruction or the gradient beyond
float rounding; bfloat16 autocast changes the denoiser's arithmetic only, never the
dtype the solver and the loss see.
"""

import pytest
import torch

from engine.config import ExperimentConfig, ModelConfig
from engine.denoisers import Conv3x3, build_denoiser, set_channels_last, uses_channels_last
from engine.model import build_model

from helpers import make_deq
from test_deq import DT, problem  # noqa: F401  (the float64 16 px CT problem, a module fixture)


def _resunet(dtype=torch.float32, spectral_norm=True):
    torch.manual_seed(0)
    model_cfg = ModelConfig(denoiser="resunet", channels=8, depth=2, norm="group", spectral_norm=spectral_norm)
    return build_denoiser(model_cfg, 1).to(dtype).train()


def test_channels_last_is_the_same_map_and_gradient():
    # float32 in either layout is as close to the float64 result: only the summation order differs
    den = _resunet()
    x = torch.randn(2, 1, 24, 24)

    def run(module, dtype):
        module.zero_grad(set_to_none=True)
        xx = x.to(dtype, copy=True).requires_grad_()
        out = module(xx)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum().backward()
        return [t.double() for t in (out.detach(), xx.grad, torch.cat([p.grad.reshape(-1) for p in module.parameters()]))]

    den64 = _resunet().double().eval()
    den64.load_state_dict(den.state_dict())
    den.eval()  # evaluation: the spectral norms stay where they are in all three runs
    reference = run(den64, torch.float64)
    plain = run(den, torch.float32)
    set_channels_last(den)
    assert uses_channels_last(den)
    fast = run(den, torch.float32)
    for ref, a, b in zip(reference, plain, fast):
        err_plain, err_fast = float((a - ref).norm() / ref.norm()), float((b - ref).norm() / ref.norm())
        assert err_fast < 1e-4 and err_fast < 3 * err_plain + 1e-7
    # the parameters keep PyTorch's layout: checkpoints and optimiser state are unchanged
    assert all(p.is_contiguous() for p in den.parameters())
    set_channels_last(den, False)
    assert not uses_channels_last(den)


@pytest.mark.parametrize("in_channels", [1, 2])  # a CT image is both layouts at once; MRI's two are not
def test_channels_last_activations_from_the_first_convolution_on(in_channels):
    """Every convolution of a channels-last network returns channels-last activations (channel stride 1),
    also the first one on a 1-channel image, so that no layer converts between layouts (the skip of
    the first level once came out contiguous and the decoder converted it at every call)."""
    torch.manual_seed(0)
    den = build_denoiser(ModelConfig(denoiser="resunet", channels=8, depth=2, norm="none"), in_channels)
    x = torch.randn(2, in_channels, 16, 16)
    with torch.no_grad():
        plain = den(x)
        set_channels_last(den)
        strides = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: strides.append((out.shape[1], out.stride(1))))
                 for m in den.modules() if isinstance(m, Conv3x3)]
        fast = den(x)
    for hook in hooks:
        hook.remove()
    assert len(strides) == 18 and all(stride == 1 for _, stride in strides), strides
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_memory_format_config():
    cpu = build_model(ExperimentConfig().replace(**{"physics.img_size": 32}), "cpu", load_weights=False)
    assert uses_channels_last(cpu.operator.denoiser)  # auto = channels-last on the CPU
    plain = build_model(ExperimentConfig().replace(**{"physics.img_size": 32, "run.memory_format": "contiguous"}),
                        "cpu", load_weights=False)
    assert not uses_channels_last(plain.operator.denoiser)
    assert cpu.state_dict().keys() == plain.state_dict().keys()


def test_channels_last_keeps_the_implicit_gradient_equal_to_unrolled(problem):
    # float64 on the CPU, channels-last on: the implicit gradient still matches unrolling a contraction
    physics, _, y = problem
    torch.manual_seed(0)
    den = _resunet(DT, spectral_norm=True)
    set_channels_last(den)

    def gradient(mode):
        model = make_deq(den, gradient=mode, tol=1e-12, stop_mode="rel", iters=300, max_iter=600)
        den.zero_grad(set_to_none=True)
        model(y, physics).pow(2).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in den.parameters() if p.grad is not None])

    g_implicit, g_unrolled = gradient("implicit"), gradient("unrolled")
    assert float((g_implicit - g_unrolled).norm() / g_unrolled.norm()) < 1e-6


def test_bf16_autocast_only_changes_the_denoiser_arithmetic():
    cfg = ExperimentConfig().replace(**{"physics.img_size": 32, "model.channels": 8})
    model = build_model(cfg, "cpu", load_weights=False)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        full = model.operator.denoise(x)
        model.operator.set_execution(autocast="bf16")
        half = model.operator.denoise(x)
    assert half.dtype == torch.float32  # the solver and the loss see float32
    rel = float((half - full).norm() / full.norm())
    assert 1e-6 < rel < 3e-2  # bfloat16's ~3 significant digits: changed, slightly
    with pytest.raises(ValueError, match="autocast"):
        model.operator.set_execution(autocast="fp8")


def test_compiled_denoiser_follows_weight_updates_without_recompiling():
    # the spectral norms' bookkeeping runs eagerly before each compiled call, so an optimiser
    # step changes sigma without a new graph, and the compiled map equals the eager one
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = ExperimentConfig().replace(**{"physics.img_size": 16, "model.channels": 4, "model.depth": 1,
                                        "model.spectral_norm": True, "run.compile": True})
    model = build_model(cfg, "cpu", load_weights=False).train()
    operator, compiled = model.operator, model.operator._compiled
    optimiser = torch.optim.SGD(operator.denoiser.parameters(), lr=0.05)
    x = torch.randn(2, 1, 16, 16)
    graphs = []
    for _ in range(3):
        operator.denoise(x).pow(2).mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        with torch.no_grad():
            fast = operator.denoise(x)
            operator._compiled = []
            eager = operator.denoise(x)
            operator._compiled = compiled
        assert float((fast - eager).abs().max()) < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0]  # no recompilation after the first step
    assert "_compiled" not in "".join(model.state_dict().keys())
