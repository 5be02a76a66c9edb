r"""Pre-train a denoiser as a blind Gaussian denoiser, the DEQ's starting point.

.. math::  \min_\theta \; \mathbb{E}_{x, \sigma, n}\, \| D_\theta(x + \sigma n) - x \|^2
           \; + \; \mu \, \mathbb{E}\, \max\big(\|J_{D_\theta}(x + \sigma n)\|_2 - k, 0\big)

with ``sigma ~ U(0, sigma_max)`` per patch (several noise levels: the DEQ's
iterates carry artefacts of every size) and, when ``jacobian_weight = mu > 0``,
the Jacobian spectral-norm penalty of :mod:`engine.regularisers` (Hurault et
al.'s recipe), which keeps an unconstrained network nearly non-expansive, so
that the DEQ built on it converges.

Clean images come from what this machine has offline (:data:`PRETRAIN_SOURCES`):

``phantoms``  procedural ellipse / Shepp-Logan phantoms (always available);
``head_ct``   the *training* slices of the InVesalius head CT, exactly the
              ``ct_head`` config's ``data.train_slices`` (its test slices are never read);
``colin27``   the *training* slices of the Colin27 T1 MRI, the ``mri_brain``
              config's ``data.train_slices``;
``natural``   public-domain / CC0 photographs shipped inside scikit-image
              (:mod:`engine.data.natural`), the offline stand-in for BSD500.

Real slices are prepared at the DEQ's resolution (``image_size``, 128 for the
shipped configs) so that the denoiser learns anatomy at the scale it will see;
random ``patch``-sized crops, flips and quarter turns are drawn from them.
For two-channel (MRI) denoisers each patch gets a smooth random phase, a
random quadratic over the patch plus a constant (``exp(i phi)``, ``|phi|`` up to a few
radians), and with probability :data:`ZERO_PHASE_FRACTION` none, since
magnitude images simulated through the MRI operator are real.

Nothing is downloaded and no scan enters the weights file except through
training; ``resources/weights/README.md`` gives the exact command of every
shipped file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine.config import ModelConfig
from engine.data import colin27_t1_path, invesalius_head_ct_path, load_scan, phantom_batch, prepare_slices
from engine.data.datasets import split_indices
from engine.data.intensity import resize
from engine.denoisers import build_denoiser, refresh_spectral_norms, save_denoiser_weights
from engine.errors import ConfigError
from engine.regularisers import JacobianSpectralPenalty

#: Power iterations run on every spectrally normalised conv after pre-training, before saving.
FINAL_SPECTRAL_NORM_ITERS = 300

PRETRAIN_SOURCES = ("phantoms", "head_ct", "colin27", "natural")

#: fraction of two-channel patches left with zero phase (simulated MRI of magnitude images is real)
ZERO_PHASE_FRACTION = 0.3

#: noise levels of the published denoising table
REPORT_SIGMAS = (0.02, 0.05, 0.1)


# ---------------------------------------------------------------------------------------
# Clean images
# ---------------------------------------------------------------------------------------

def _config_split(config_name: str, path: Path, size: int, which: str) -> np.ndarray:
    """The ``which`` ("train" / "test") slices of a shipped config's scan, prepared at ``size``."""
    from engine.config import builtin_config

    cfg = builtin_config(config_name)
    images = prepare_slices(load_scan(path), size, window=list(cfg.data.window) or None)
    train_idx, val_idx = split_indices(images.shape[0], cfg.data)
    return images[train_idx if which == "train" else val_idx]


def _real_scan(source: str) -> tuple[str, Path]:
    finder, config, package = {"head_ct": (invesalius_head_ct_path, "ct_head", "invesalius-examples"),
                               "colin27": (colin27_t1_path, "mri_brain", "mricron-data")}[source]
    path = finder()
    if path is None:
        raise ConfigError(f"pre-training source '{source}' needs the Debian package {package} "
                          f"(apt-get install {package}), which is not installed")
    return config, path


def source_slices(source: str, size: int, which: str = "train") -> np.ndarray:
    """``[N, size, size]`` slices of a real source: its training split, or with ``which="test"`` its held-out one."""
    config, path = _real_scan(source)
    return _config_split(config, path, size, which)


def _natural(size: int) -> list[np.ndarray]:
    from engine.data.natural import natural_images

    out = []
    for image in natural_images():
        # about two image sides of ours across the short edge: textures at the scale of anatomy
        scale = 2 * size / min(image.shape)
        shape = (max(size, round(image.shape[0] * scale)), max(size, round(image.shape[1] * scale)))
        out.append(resize(image, shape))
    return out


@dataclass
class PatchSampler:
    """Random clean ``[B, C, patch, patch]`` patches from the chosen sources, in ``[0, 1]`` (magnitude)."""

    sources: Sequence[str]
    image_size: int = 128
    patch: int = 64
    channels: int = 1
    seed: int = 0
    pools: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in PRETRAIN_SOURCES]
        if unknown or not self.sources:
            raise ConfigError(f"pre-training sources must be among {', '.join(PRETRAIN_SOURCES)}; "
                              f"got {', '.join(self.sources) or 'none'}")
        if not 8 <= self.patch <= self.image_size:
            raise ConfigError(f"patch size must be in [8, {self.image_size}], got {self.patch}")
        self.rng = np.random.default_rng(self.seed)
        for source in self.sources:
            if source in ("head_ct", "colin27"):
                self.pools[source] = list(source_slices(source, self.image_size))
            elif source == "natural":
                self.pools[source] = _natural(self.image_size)

    def describe(self) -> str:
        parts = [f"{s} ({len(self.pools[s])} images)" if s in self.pools else s for s in self.sources]
        return ", ".join(parts)

    def _crop(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape
        top = int(self.rng.integers(0, h - self.patch + 1))
        left = int(self.rng.integers(0, w - self.patch + 1))
        crop = image[top:top + self.patch, left:left + self.patch]
        if self.rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.rot90(crop, int(self.rng.integers(0, 4)))

    def _phantoms(self, n: int) -> list[np.ndarray]:
        kind = "shepp_logan" if self.rng.random() < 0.3 else "ellipses"
        images = phantom_batch(kind, n, self.image_size, seed=int(self.rng.integers(0, 2 ** 31)))
        # random global contrast so the denoiser does not learn one intensity scale
        return [im * self.rng.uniform(0.6, 1.0) for im in images]

    def magnitudes(self, batch: int) -> np.ndarray:
        picks = self.rng.integers(0, len(self.sources), size=batch)
        out = []
        for i, source in enumerate(self.sources):
            count = int((picks == i).sum())
            if not count:
                continue
            if source == "phantoms":
                images = self._phantoms(count)
            else:
                pool = self.pools[source]
                images = [pool[int(k)] for k in self.rng.integers(0, len(pool), size=count)]
                if source == "natural":  # photographs: random contrast as for phantoms
                    images = [im * self.rng.uniform(0.6, 1.0) for im in images]
            out += [self._crop(im) for im in images]
        return np.ascontiguousarray(np.stack(out)[self.rng.permutation(batch)], dtype=np.float32)

    def batch(self, batch: int) -> torch.Tensor:
        x = torch.from_numpy(self.magnitudes(batch))[:, None]
        if self.channels == 2:
            x = with_smooth_phase(x, self.rng)
        return x


def with_smooth_phase(magnitude: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``[B, 1, H, W]`` magnitudes -> ``[B, 2, H, W]`` (real, imaginary) with a smooth random phase each."""
    b, _, h, w = magnitude.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    c = torch.from_numpy(rng.normal(0, 1.0, size=(b, 6)).astype(np.float32))
    c[:, 0] *= math.pi  # constant offset anywhere on the circle
    phase = (c[:, 0, None, None] + c[:, 1, None, None] * xx + c[:, 2, None, None] * yy
             + 0.5 * (c[:, 3, None, None] * xx * yy + c[:, 4, None, None] * xx ** 2 + c[:, 5, None, None] * yy ** 2))
    zero = torch.from_numpy(rng.random(b) < ZERO_PHASE_FRACTION)
    phase = torch.where(zero[:, None, None], torch.zeros_like(phase), phase)
    return torch.cat([magnitude * torch.cos(phase)[:, None], magnitude * torch.sin(phase)[:, None]], dim=1)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

@dataclass
class PretrainSettings:
    """What :func:`pretrain_denoiser` does; every field has a CLI flag of the same name."""

    sources: tuple = ("phantoms",)
    steps: int = 1500
    image_size: int = 128
    patch: int = 64
    batch: int = 16
    sigma_max: float = 0.2
    lr: float = 1e-3
    seed: int = 0
    jacobian_weight: float = 0.0
    jacobian_target: float = 0.95
    jacobian_every: int = 1


def pretrain_denoiser(model_cfg: ModelConfig, in_channels: int, settings: PretrainSettings,
                      progress: Optional[Callable[[int, dict], None]] = None) -> torch.nn.Module:
    """Train ``build_denoiser(model_cfg, in_channels)`` to remove Gaussian noise; returns it in eval mode."""
    torch.manual_seed(settings.seed)
    sampler = PatchSampler(settings.sources, settings.image_size, settings.patch, in_channels, settings.seed)
    denoiser = build_denoiser(model_cfg, in_channels)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    penalty = JacobianSpectralPenalty(weight=settings.jacobian_weight, target=settings.jacobian_target)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    denoiser.train()
    for step in range(1, settings.steps + 1):
        x = sampler.batch(settings.batch)
        sigma = torch.rand(settings.batch, 1, 1, 1) * settings.sigma_max
        noisy = x + sigma * torch.randn_like(x)
        mse = ((denoiser(noisy, sigma) - x) ** 2).mean()
        total, record = mse, {"mse": float(mse.detach())}
        if penalty.active and step % settings.jacobian_every == 0:
            n = penalty.samples
            value, norms = penalty(lambda z: denoiser(z, sigma[:n]), noisy[:n], generator)
            total = total + value
            record["jacobian_norm"] = float(norms.max())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step, record)
    # Converge the stored conv-norm estimates (they approach from below) so a spectrally normalised
    # network is the L-Lipschitz one its architecture promises; the PSNRs reported after this see it.
    refresh_spectral_norms(denoiser, FINAL_SPECTRAL_NORM_ITERS)
    return denoiser.eval()


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float(((a - b) ** 2).mean()))


@torch.no_grad()
def denoising_psnr_on(denoiser: torch.nn.Module, clean: torch.Tensor, sigma: float,
                      seed: int = 12345) -> tuple[float, float]:
    """(noisy PSNR, denoised PSNR) in dB of ``denoiser`` on ``clean`` ``[B, C, H, W]`` at noise ``sigma``."""
    generator = torch.Generator().manual_seed(seed)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    return _psnr(noisy, clean), _psnr(denoiser(noisy, sigma), clean)


def denoising_test_images(in_channels: int, size: int = 128, n_phantoms: int = 16) -> tuple[str, torch.Tensor]:
    """(description, ``[B, C, size, size]`` images) the published denoising PSNRs are measured on.

    The held-out test slices of the task the denoiser is for (head CT for one
    channel, Colin27 for two, real-valued as the simulated MRI data is);
    phantoms with fresh seeds when that scan is not installed.
    """
    source, finder = ("head_ct", invesalius_head_ct_path) if in_channels == 1 else ("colin27", colin27_t1_path)
    if finder() is not None:
        images = source_slices(source, size, which="test")
        label = f"{source} test slices ({len(images)})"
    else:
        images = phantom_batch("ellipses", n_phantoms, size, seed=987_654)
        label = f"{n_phantoms} fresh phantoms ({source} not installed)"
    x = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    if in_channels == 2:
        x = torch.cat([x, torch.zeros_like(x)], dim=1)
    return label, x


def denoising_table(denoiser: torch.nn.Module, in_channels: int, size: int = 128,
                    sigmas: Sequence[float] = REPORT_SIGMAS, test_images: Optional[tuple] = None) -> dict:
    """``{"images": label, "sigma": {sigma: (noisy dB, denoised dB)}}`` on :func:`denoising_test_images`
    (or on ``test_images``, a ``(label, images)`` pair already loaded)."""
    label, clean = test_images if test_images is not None else denoising_test_images(in_channels, size)
    return {"images": label, "sigma": {s: denoising_psnr_on(denoiser, clean, s) for s in sigmas}}


def main_pretrain(model_cfg: ModelConfig, in_channels: int, output: Path, settings: PretrainSettings,
                  echo: Callable[[str], None] = print) -> Path:
    started = time.perf_counter()
    every = max(1, settings.steps // 10)

    def progress(step: int, record: dict) -> None:
        if step % every == 0 or step == settings.steps:
            extra = f"  ||J|| {record['jacobian_norm']:.3f}" if "jacobian_norm" in record else ""
            elapsed = time.perf_counter() - started
            echo(f"step {step}/{settings.steps}  mse {record['mse']:.5f}{extra}  ({elapsed:.0f} s)")

    denoiser = pretrain_denoiser(model_cfg, in_channels, settings, progress=progress)
    table = denoising_table(denoiser, in_channels, settings.image_size)
    for sigma, (noisy, clean) in table["sigma"].items():
        echo(f"sigma {sigma}: noisy {noisy:.2f} dB -> denoised {clean:.2f} dB ({table['images']})")
    save_denoiser_weights(denoiser, output)
    echo(f"wrote {output}")
    return output
