r"""Pre-train a denoiser as a Gaussian denoiser, the DEQ's starting point.

The paper pre-trains on natural images. With no downloads here, we pre-train
on what the machine can always produce: the procedural CT-like phantoms
(random ellipses and Shepp-Logan variants) plus their smooth-textured
variants, at noise levels :math:`\sigma \sim U(0, \sigma_{max})`:

.. math::  \min_\theta \; \mathbb{E}\, \| D_\theta(x + \sigma n) - x \|^2

For MRI (two channels) the phantom is given a smooth random phase, so the
denoiser sees complex images. No scan a user trains on is used, so the
weights are free of any third-party data. The shipped weights in
``resources/weights/`` were made by ``resources/weights/make_weights.sh``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine.config import ModelConfig
from engine.data import phantom_batch
from engine.denoisers import build_denoiser, refresh_spectral_norms, save_denoiser_weights

#: Power iterations run on every spectrally normalised conv after pre-training, before saving.
FINAL_SPECTRAL_NORM_ITERS = 300


def _training_batch(batch: int, size: int, channels: int, generator: np.random.Generator) -> torch.Tensor:
    kind = "shepp_logan" if generator.random() < 0.3 else "ellipses"
    images = phantom_batch(kind, batch, size, seed=int(generator.integers(0, 2 ** 31)))
    x = torch.from_numpy(images)[:, None]
    # random global contrast so the denoiser does not learn one intensity scale
    x = x * torch.from_numpy(generator.uniform(0.6, 1.0, size=(batch, 1, 1, 1)).astype(np.float32))
    if channels == 2:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        coeffs = torch.from_numpy(generator.normal(0, 1.5, size=(batch, 3)).astype(np.float32))
        phase = coeffs[:, 0, None, None] * xx + coeffs[:, 1, None, None] * yy + coeffs[:, 2, None, None] * xx * yy
        x = torch.cat([x * torch.cos(phase)[:, None], x * torch.sin(phase)[:, None]], dim=1)
    return x


def pretrain_denoiser(model_cfg: ModelConfig, in_channels: int, steps: int = 1500, size: int = 64,
                      batch: int = 16, sigma_max: float = 0.2, lr: float = 1e-3, seed: int = 0,
                      progress: Optional[Callable[[int, float], None]] = None) -> torch.nn.Module:
    """Train ``build_denoiser(model_cfg, in_channels)`` to remove Gaussian noise; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    denoiser = build_denoiser(model_cfg, in_channels)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    denoiser.train()
    for step in range(1, steps + 1):
        x = _training_batch(batch, size, in_channels, generator)
        sigma = torch.rand(batch, 1, 1, 1) * sigma_max
        noisy = x + sigma * torch.randn_like(x)
        loss = ((denoiser(noisy) - x) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    # Converge the stored conv-norm estimates (they approach from below) so the saved network
    # is the L-Lipschitz one its architecture promises; the PSNRs reported after this see it.
    refresh_spectral_norms(denoiser, FINAL_SPECTRAL_NORM_ITERS)
    return denoiser.eval()


def denoising_psnr(denoiser: torch.nn.Module, in_channels: int, sigma: float, size: int = 64, n: int = 16,
                   seed: int = 12345) -> tuple[float, float]:
    """(noisy PSNR, denoised PSNR) in dB on fresh phantoms at noise ``sigma``."""
    generator = np.random.default_rng(seed)
    x = _training_batch(n, size, in_channels, generator)
    torch.manual_seed(seed)
    noisy = x + sigma * torch.randn_like(x)
    with torch.no_grad():
        out = denoiser(noisy)
    mse = lambda a: float(((a - x) ** 2).mean())
    return 10 * math.log10(1 / mse(noisy)), 10 * math.log10(1 / mse(out))


def main_pretrain(model_cfg: ModelConfig, in_channels: int, output: Path, steps: int, size: int, seed: int,
                  echo: Callable[[str], None] = print) -> Path:
    started = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % max(1, steps // 10) == 0 or step == steps:
            echo(f"step {step}/{steps}  loss {loss:.5f}  ({time.perf_counter() - started:.0f} s)")

    denoiser = pretrain_denoiser(model_cfg, in_channels, steps=steps, size=size, seed=seed, progress=progress)
    for sigma in (0.05, 0.1):
        noisy, clean = denoising_psnr(denoiser, in_channels, sigma, size=size)
        echo(f"sigma {sigma}: noisy {noisy:.2f} dB -> denoised {clean:.2f} dB")
    save_denoiser_weights(denoiser, output)
    echo(f"wrote {output}")
    return output
