"""Forward operators from the config: sparse-view CT and accelerated MRI (deepinv).

* CT: parallel-beam :class:`deepinv.physics.Tomography` with ``views`` angles
  over 180 degrees, normalised so that ``||A|| = 1`` (then a PGD step
  ``eta = 1`` is non-expansive). ``A^dagger`` is filtered back-projection.
* MRI: single-coil Cartesian :class:`deepinv.physics.MRI`; complex images are
  two channels (real, imaginary). ``A^dagger`` is the zero-filled adjoint.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import deepinv as dinv

from engine.config import PhysicsConfig
from engine.errors import ConfigError


def image_channels(cfg: PhysicsConfig) -> int:
    """Channels of the image the denoiser sees: 1 (CT magnitude) or 2 (MRI real/imag)."""
    return 1 if cfg.modality == "ct" else 2


def _noise_model(cfg: PhysicsConfig, rng: Optional[torch.Generator]):
    if cfg.noise == "none" or (cfg.noise == "gaussian" and cfg.noise_sigma == 0):
        return dinv.physics.ZeroNoise() if hasattr(dinv.physics, "ZeroNoise") else dinv.physics.GaussianNoise(0.0)
    if cfg.noise == "gaussian":
        return dinv.physics.GaussianNoise(sigma=cfg.noise_sigma, rng=rng)
    if cfg.modality != "ct":
        raise ConfigError("physics.noise = 'poisson' is only defined for CT")
    return dinv.physics.PoissonNoise(gain=cfg.poisson_gain, normalize=True, clip_positive=True, rng=rng)


def sampling_mask(cfg: PhysicsConfig, device="cpu") -> torch.Tensor:
    """The MRI sampling mask ``[1, 2, H, W]`` (deterministic for ``mask_seed``)."""
    size = cfg.img_size
    rng = torch.Generator(device=device).manual_seed(cfg.mask_seed)
    generators = {
        "random": dinv.physics.generator.RandomMaskGenerator,
        "equispaced": dinv.physics.generator.EquispacedMaskGenerator,
        "gaussian": dinv.physics.generator.GaussianMaskGenerator,
    }
    accel = cfg.acceleration
    gen = generators[cfg.mask]((2, size, size), acceleration=int(round(accel)) if cfg.mask != "gaussian" else accel,
                               center_fraction=cfg.center_fraction, rng=rng, device=device)
    return gen.step(batch_size=1)["mask"].to(device)


_CT_NORMS: dict = {}


def build_physics(cfg: PhysicsConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  rng: Optional[torch.Generator] = None, mask: Optional[torch.Tensor] = None,
                  angles: Optional[Sequence[float]] = None):
    """A deepinv physics for the config, on ``device`` in ``dtype``.

    ``mask`` overrides the generated MRI mask and ``angles`` (degrees) the
    ``views`` equispaced CT angles: for data that carries its own geometry.
    """
    if cfg.modality == "ct":
        # The adjoint must be the exact transpose of A (autograd of A): deepinv's
        # analytic back-projection is only approximately adjoint, and a custom
        # autograd Function then makes autograd's dA/dx disagree with A itself,
        # which finite differences expose (and implicit gradients inherit).
        # We normalise ourselves: deepinv's own normalisation probes in float32
        # only and gives a slightly different norm on every construction, which
        # breaks bit-exact resume; ours is a fixed power iteration, cached.
        geometry = cfg.views
        if angles is not None:
            geometry = torch.as_tensor([float(a) for a in angles], dtype=dtype, device=device)
        physics = dinv.physics.Tomography(
            angles=geometry, img_width=cfg.img_size, circle=cfg.circle, normalize=False,
            adjoint_via_backprop=True, device=device, dtype=dtype)
        angle_key = None if angles is None else tuple(round(float(a), 9) for a in angles)
        key = (cfg.views, angle_key, cfg.img_size, cfg.circle, str(dtype), str(device))
        if key not in _CT_NORMS:
            _CT_NORMS[key] = operator_norm(physics, (1, 1, cfg.img_size, cfg.img_size), device=device, dtype=dtype,
                                           iters=50)
        physics.register_buffer("operator_norm", torch.tensor(_CT_NORMS[key], dtype=dtype, device=device))
        physics.normalize = True
        physics._auto_grad_adjoint_fn = None
    else:
        if mask is None:
            mask = sampling_mask(cfg, device)
        physics = dinv.physics.MRI(mask=mask.to(device=device, dtype=dtype), img_size=(2, cfg.img_size, cfg.img_size),
                                   device=device)
    physics.noise_model = _noise_model(cfg, rng)
    return physics


def detector_count(img_size: int, circle: bool = False) -> int:
    """Detector cells of deepinv's parallel-beam Radon transform for ``img_size`` (its padding rule)."""
    from deepinv.physics.functional.radon import SQRT2

    if circle:
        return int(img_size)
    return int(img_size) + int((SQRT2 * int(img_size) - int(img_size)).ceil())


def baseline(physics, y: torch.Tensor) -> torch.Tensor:
    """``A^dagger y``: filtered back-projection (CT) or the zero-filled adjoint (MRI)."""
    if isinstance(physics, dinv.physics.Tomography):
        return physics.A_dagger(y, fbp=True)
    return physics.A_adjoint(y)


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Magnitude image ``[B, 1, H, W]``: CT as is, MRI as ``sqrt(re^2 + im^2)``."""
    if x.shape[1] == 2:
        return torch.sqrt(x[:, :1] ** 2 + x[:, 1:] ** 2)
    return x


def to_model_space(images: torch.Tensor, modality: str) -> torch.Tensor:
    """Real images ``[B, 1, H, W]`` -> what the physics takes (MRI: zero imaginary channel)."""
    if modality == "mri" and images.shape[1] == 1:
        return torch.cat([images, torch.zeros_like(images)], dim=1)
    return images


def describe(cfg: PhysicsConfig) -> str:
    """One line naming the operator, for messages and checkpoints."""
    if cfg.modality == "ct":
        return f"{cfg.views}-view parallel-beam CT at {cfg.img_size}x{cfg.img_size}"
    return (f"{cfg.acceleration:g}x {cfg.mask} Cartesian MRI at {cfg.img_size}x{cfg.img_size} "
            f"(centre {cfg.center_fraction:g})")


def operator_norm(physics, shape, device="cpu", dtype=torch.float32, iters: int = 30) -> float:
    """``||A||_2`` by power iteration on ``A^T A`` (1 for the normalised CT operator)."""
    x = torch.randn(shape, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    x = x / x.norm()
    value = 0.0
    with torch.no_grad():
        for _ in range(iters):
            z = physics.A_adjoint(physics.A(x))
            value = float(z.norm())
            x = z / max(value, 1e-30)
    return math.sqrt(value)
