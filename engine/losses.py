r"""Training losses: supervised, measurement consistency (MC) and Equivariant Imaging (EI).

All terms are deepinv loss classes, called on our DEQ through deepinv's
``model(y, physics)`` convention:

* MC: :math:`\frac{1}{m}\|A f(y) - y\|^2`  (``deepinv.loss.MCLoss``)
* EI: :math:`\frac{1}{n}\|f(A T_g x_1) - T_g x_1\|^2` with :math:`x_1 = f(y)`
  (``deepinv.loss.EILoss``; the model runs twice and gradients flow through
  both calls, including the second call's input)
* supervised: :math:`\frac{1}{n}\|f(y) - x\|^2` (``deepinv.loss.SupLoss``)

Self-supervised total: ``MC + alpha * EI``.

**Warm start of EI's second call** (``loss.ei_warm_start``, default off): the
second solve starts at ``T_g x1`` instead of ``A^dagger(A T_g x1)``; the fixed
point and the implicit gradient are unchanged (see :meth:`TrainingLoss.ei_term`).
Measured in ``benchmarks/README.md``: 13-18 % fewer iterations in that solve over
whole quick-config runs, but the adjoint solves, which start at whatever forward
fixed point the tolerance let through, varied by more than that saved.

**MC at the noise floor (discrepancy principle).** With Gaussian noise of known
``sigma`` the residual of the *true* image is noise, ``E ||A x - y||^2 / m = sigma^2``;
driving MC below that fits the noise (measured on the 30-view head CT: MC fell to
0.8 sigma^2 within 30 steps while SSIM fell from 0.89 to 0.75). With
``loss.mc_noise_floor = true`` the MC term in the total is
``max(MC - sigma^2, 0)`` per sample (Morozov's discrepancy principle), so MC
pulls towards the data only until the residual is at noise level and EI
steers the rest. The logged ``mc`` is the plain MC value.

**Choosing alpha ("auto").** The paper's alpha (100 for CT, 1 for MRI)
presumes its own operator scaling. With deepinv's normalised ``Tomography``
(``||A|| = 1``) we measured alpha = 100 giving an EI gradient ~15x the MC
gradient, which collapses training to a flat image, while alpha = 1 trains
well. ``"auto"`` therefore balances the two gradients on the first batch:
``alpha = AUTO_EI_GRADIENT_RATIO * ||grad MC|| / ||grad EI||`` so EI steers
the null space without drowning data consistency, whatever the operator's
scaling. The value chosen is logged and stored in the run's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import deepinv as dinv
import torch

from engine.config import LossConfig

#: target ratio ||alpha grad EI|| / ||grad MC|| when ei_weight = "auto"
AUTO_EI_GRADIENT_RATIO = 0.2

#: the paper's alpha, used as a reference in messages and benchmarks
PAPER_ALPHA = {"ct": 100.0, "mri": 1.0}


def build_transform(cfg: LossConfig):
    """The EI group action (deepinv transform); rotations are bilinear, never nearest."""
    n = cfg.n_transforms
    if cfg.transform == "rotate":
        return dinv.transform.Rotate(n_trans=n, interpolation_mode="bilinear")
    if cfg.transform == "rotate90":
        return dinv.transform.Rotate(n_trans=n, multiples=90, positive=True)
    if cfg.transform == "shift":
        return dinv.transform.Shift(n_trans=n)
    return dinv.transform.Reflect(n_trans=n, dim=[-1])


def warm_startable(model) -> bool:
    """Whether ``model`` takes ``x_init`` without changing its output: a DEQ solved to its fixed
    point (``implicit`` / ``jfb``), also inside a wrapper with ``.module`` (DDP)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "gradient", None) in ("implicit", "jfb")


@dataclass
class LossTerms:
    """Per-term values of one step (tensors with graphs) and their weighted total."""

    terms: dict
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        out = {name: float(value.detach()) for name, value in self.terms.items()}
        out["total"] = float(self.total.detach())
        return out


class TrainingLoss:
    """The configured objective; ``alpha`` may be set later (auto balancing)."""

    def __init__(self, cfg: LossConfig, noise_floor: float = 0.0):
        """``noise_floor``: the per-entry noise variance MC stops at (``sigma^2``; 0 = plain MC)."""
        self.cfg = cfg
        self.noise_floor = float(noise_floor)
        self.mode = cfg.mode
        self.mc = dinv.loss.MCLoss()
        self.ei = dinv.loss.EILoss(transform=build_transform(cfg), apply_noise=cfg.ei_apply_noise)
        self.sup = dinv.loss.SupLoss()
        self.alpha: Optional[float] = None if cfg.ei_weight == "auto" else float(cfg.ei_weight)

    def reseed(self, seed: int) -> None:
        """Seed the EI transform's own generator (deepinv transforms do not use the global RNG)."""
        self.ei.T.rng.manual_seed(seed)

    @property
    def needs_ground_truth(self) -> bool:
        return self.mode == "supervised"

    @property
    def needs_alpha(self) -> bool:
        return self.mode == "ei" and self.alpha is None

    def terms(self, model, y: torch.Tensor, physics, x: Optional[torch.Tensor] = None,
              x_init: Optional[torch.Tensor] = None) -> dict:
        """Unweighted terms with graphs: ``mc`` and ``ei`` (self-supervised) or ``supervised``.

        ``x_init`` starts the first model call's solve (``loss.reuse_fixed_points``: the
        images' fixed points from an earlier step); ignored where the start would change
        the output (:func:`warm_startable`).
        """
        if x_init is not None and warm_startable(model):
            x_net = model(y, physics, x_init=x_init)
        else:
            x_net = model(y, physics)
        if self.mode == "supervised":
            if x is None:
                raise ValueError("supervised loss needs ground truth")
            return {"supervised": self.sup(x_net=x_net, x=x).mean()}
        mc = self.mc(y=y, x_net=x_net, physics=physics)
        terms = {"mc": mc.mean()}
        if self.noise_floor > 0:  # what the total uses: the residual above noise level
            terms["mc_above_noise"] = torch.clamp(mc - self.noise_floor, min=0).mean()
        if self.mode == "ei":
            terms["ei"] = self.ei_term(x_net, physics, model).mean()
        return terms

    def ei_term(self, x_net: torch.Tensor, physics, model) -> torch.Tensor:
        """deepinv's EI term; with ``loss.ei_warm_start`` its second solve starts at ``T_g x1``.

        The warm path repeats :meth:`deepinv.loss.EILoss.forward` step for step (the same
        transform draw, the same simulated noise, the same metric) and only adds
        ``x_init = (T_g x1).detach()`` to the second model call: the fixed point of
        ``F(.; A T_g x1)`` is near ``T_g x1`` once the model reconstructs well, so the solve
        starts close to its answer instead of at ``A^dagger(A T_g x1)``. The fixed point and
        the implicit (or JFB) gradient do not depend on the start; an unrolled network's
        output does, so there the cold start is kept.
        """
        if not (self.cfg.ei_warm_start and warm_startable(model)):
            return self.ei(x_net=x_net, physics=physics, model=model)
        ei = self.ei
        if ei.no_grad:
            with torch.no_grad():
                x2 = ei.T(x_net).detach()
        else:
            x2 = ei.T(x_net)
        y2 = physics(x2) if ei.noise else physics.A(x2)
        x3 = model(y2, physics, x_init=x2.detach())
        return ei.weight * ei.metric(x3, x2)

    def __call__(self, model, y: torch.Tensor, physics, x: Optional[torch.Tensor] = None,
                 x_init: Optional[torch.Tensor] = None) -> LossTerms:
        terms = self.terms(model, y, physics, x, x_init)
        total = sum(self.weight(name) * value for name, value in self.objective_terms(terms).items())
        return LossTerms(terms=terms, total=total)

    def objective_terms(self, terms: dict) -> dict:
        """The terms the total is made of (with a noise floor, ``mc_above_noise`` replaces ``mc``)."""
        return {k: v for k, v in terms.items() if not (k == "mc" and "mc_above_noise" in terms)}

    def weight(self, name: str) -> float:
        if name == "ei":
            if self.alpha is None:
                raise RuntimeError("EI weight is 'auto' and has not been balanced yet")
            return self.alpha
        return 1.0

    def balance_alpha(self, model, y: torch.Tensor, physics, parameters) -> float:
        """Set alpha from the gradient norms of MC and EI on one batch (``ei_weight = "auto"``)."""
        parameters = [p for p in parameters if p.requires_grad]
        terms = self.terms(model, y, physics)
        # balanced against the plain MC gradient, also with a noise floor (near the floor its gradient vanishes)
        grad_mc = torch.autograd.grad(terms["mc"], parameters, retain_graph=True, allow_unused=True)
        grad_ei = torch.autograd.grad(terms["ei"], parameters, allow_unused=True)
        norm = lambda grads: torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
        mc_norm, ei_norm = float(norm(grad_mc)), float(norm(grad_ei))
        if not (ei_norm > 0 and mc_norm > 0) or ei_norm != ei_norm or mc_norm != mc_norm:
            self.alpha = 1.0
        else:
            self.alpha = AUTO_EI_GRADIENT_RATIO * mc_norm / ei_norm
        return self.alpha
