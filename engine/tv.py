r"""Total-variation reconstruction: the classical baseline every learned model must beat.

.. math::  \hat x = \arg\min_x \tfrac12 \|Ax - y\|^2 + \lambda \|\nabla x\|_{1,2}

solved with deepinv's own proximal gradient descent (``deepinv.optim.PGD`` with
``L2`` data fidelity and ``TVPrior``; step ``1 / ||A||^2 = 1`` for the
normalised operators of :mod:`engine.physics`), from ``A^T y``. For MRI the
isotropic TV acts on both channels (real, imaginary) of the complex image.

``lambda`` is chosen on *training* slices only (:func:`tune_tv_lambda`: the
best mean PSNR over a logarithmic grid), never on the test slices, the
same way a learned model never sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.metrics import psnr
from engine.physics import to_display

#: PGD iterations and inner TV-prox iterations (deepinv's TV prox is itself iterative)
TV_ITERATIONS = 300
TV_PROX_ITERATIONS = 50

#: lambda grid searched by :func:`tune_tv_lambda` (normalised operators, images in [0, 1])
TV_LAMBDAS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

#: images reconstructed at once
TV_CHUNK = 8


def tv_reconstruct(physics, y: torch.Tensor, lam: float, iterations: int = TV_ITERATIONS) -> torch.Tensor:
    """``argmin_x ||Ax - y||^2 / 2 + lam TV(x)`` by deepinv's PGD with early stopping (relative change 1e-6)."""
    import deepinv as dinv

    solver = dinv.optim.PGD(data_fidelity=dinv.optim.data_fidelity.L2(),
                            prior=dinv.optim.prior.TVPrior(n_it_max=TV_PROX_ITERATIONS),
                            lambda_reg=float(lam), stepsize=1.0, max_iter=int(iterations), early_stop=True,
                            thres_conv=1e-6)
    with torch.no_grad():
        return torch.cat([solver(chunk, physics) for chunk in y.split(TV_CHUNK)])


@dataclass
class TVTuning:
    """The chosen ``lam`` and the mean training PSNR of every ``lam`` tried."""

    lam: float
    train_psnr: dict


def tune_tv_lambda(physics, y_train: torch.Tensor, x_train: torch.Tensor,
                   lambdas: Sequence[float] = TV_LAMBDAS, iterations: int = TV_ITERATIONS) -> TVTuning:
    """The ``lam`` of ``lambdas`` with the best mean PSNR on the given *training* slices."""
    scores = {}
    for lam in lambdas:
        x_hat = tv_reconstruct(physics, y_train, lam, iterations)
        value = float(psnr(to_display(x_hat), to_display(x_train)).mean())
        scores[float(lam)] = value if math.isfinite(value) else -math.inf
    best = max(scores, key=scores.get)
    return TVTuning(lam=best, train_psnr=scores)
