r"""Jacobian spectral-norm penalty: keep a map contractive by training, not by construction.

A denoiser whose every layer is normalised (:class:`engine.denoisers.ConvSpectralNorm`)
is a provable contraction but a weak denoiser; an unconstrained one is strong
but may make the DEQ's fixed-point map expansive. The field's answer
(Pesquet et al. 2021; Hurault et al. 2022, "Prox-DRUNet") is to constrain the
*whole map's* Jacobian at the points it is used on:

.. math::

    P(\theta) = \mu \, \frac{1}{B} \sum_b \max\big(\|J_{f_\theta}(x_b)\|_2 - k, \, 0\big),

with ``k = target`` slightly below 1. Used in pre-training (``f = D_theta`` at
noisy inputs) and in DEQ training (``f = F_theta``, the relaxed fixed-point map,
at the fixed point ``x*``, where its norm decides contraction).

``||J||_2`` comes from :func:`engine.linalg.differentiable_jacobian_norm`: the
top singular pair is found without a graph, then one vector-Jacobian product
with a graph gives the norm and its exact derivative (the math is in its
docstring). ``deepinv.loss.JacobianSpectralNorm`` computes the same value with
a graph through every power iteration; it is the reference our tests compare
against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.linalg import TensorMap, differentiable_jacobian_norm

__all__ = ["JacobianSpectralPenalty"]


@dataclass
class JacobianSpectralPenalty:
    r"""``weight * mean_b max(||J_fn(x_b)|| - target, 0)``, on at most ``samples`` samples.

    ``weight`` may be raised during training (the trainer's safeguard does);
    ``weight = 0`` turns the penalty off at no cost.
    """

    weight: float = 1e-3
    target: float = 0.95
    iters: int = 8
    samples: int = 2
    tol: float = 1e-3

    @property
    def active(self) -> bool:
        return self.weight > 0

    def norms(self, fn: TensorMap, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Differentiable ``||J_fn(x_b)||`` for the first ``samples`` samples of ``x``."""
        return differentiable_jacobian_norm(fn, x[: max(1, self.samples)], iters=self.iters, tol=self.tol,
                                            generator=generator)

    def __call__(self, fn: TensorMap, x: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penalty with a graph, the per-sample norms without one)."""
        norms = self.norms(fn, x, generator)
        penalty = self.weight * torch.clamp(norms - self.target, min=0).mean()
        return penalty, norms.detach()
