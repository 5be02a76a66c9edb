r"""Image-quality and equivariance metrics.

* PSNR / SSIM on magnitude images in ``[0, 1]`` (MRI: ``|x|`` of the 2-channel image).
* Equivariance error of a reconstructor ``f`` for rotations ``T_g`` (the
  paper's third result):

  .. math::  E(f) = \mathbb{E}_{g, x} \frac{\| f(A T_g x) - T_g f(A x) \|^2}{\| T_g f(A x) \|^2}

  and of the fixed-point operator at its fixed point ``x* = f(Ax)``:
  :math:`\| F(T_g x^*; A T_g x) - T_g x^* \|^2 / \| T_g x^* \|^2`.
  Measurements here are noiseless (``physics.A``), so the number measures the
  model, not the noise draw.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from engine.physics import to_display


def psnr(estimate: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of magnitude images (``[B]``)."""
    est, ref = to_display(estimate), to_display(reference)
    mse = ((est - ref) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(max_value ** 2 / mse.clamp_min(1e-20))


def ssim(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of magnitude images (Gaussian window, deepinv/torchmetrics)."""
    import deepinv as dinv

    metric = dinv.metric.SSIM(max_pixel=1.0)
    est, ref = to_display(estimate).float(), to_display(reference).float()
    return metric(est.clamp(0, 1), ref.clamp(0, 1)).reshape(-1)


def rotate(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """``T_g x``: rotation about the image centre, bilinear, zero outside (channel-wise; complex-safe)."""
    if angle_deg % 360 == 0:
        return x
    if angle_deg % 90 == 0:
        return torch.rot90(x, int(angle_deg // 90) % 4, dims=(-2, -1))
    return TF.rotate(x, float(angle_deg), interpolation=InterpolationMode.BILINEAR)


def _relative_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    num = ((a - b) ** 2).flatten(1).sum(1)
    den = (b ** 2).flatten(1).sum(1).clamp_min(1e-20)
    return num / den


@torch.no_grad()
def equivariance_error(reconstruct: Callable[[torch.Tensor], torch.Tensor], physics, images: torch.Tensor,
                       angles: Iterable[float]) -> float:
    """Mean of ``||f(A T_g x) - T_g f(A x)||^2 / ||T_g f(A x)||^2`` over angles and images."""
    base = reconstruct(physics.A(images))
    errors = []
    for angle in angles:
        target = rotate(base, angle)
        errors.append(_relative_sq(reconstruct(physics.A(rotate(images, angle))), target))
    return float(torch.stack(errors).mean())


@torch.no_grad()
def operator_equivariance_error(model, physics, images: torch.Tensor, angles: Iterable[float]) -> float:
    """Equivariance of the fixed-point map at its fixed point: ``||F(T_g x*; A T_g x) - T_g x*||^2 / ||T_g x*||^2``."""
    x_star = model.solve_forward(physics.A(images), physics)
    errors = []
    for angle in angles:
        rotated_star = rotate(x_star, angle)
        y_rot = physics.A(rotate(images, angle))
        errors.append(_relative_sq(model.operator(rotated_star, y_rot, physics), rotated_star))
    return float(torch.stack(errors).mean())


def default_angles(count: int = 4, seed: int = 0) -> Sequence[float]:
    """Non-trivial, reproducible rotation angles (degrees) for evaluation."""
    rng = np.random.default_rng(seed)
    return [float(a) for a in rng.uniform(10, 350, size=count)]
