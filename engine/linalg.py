r"""Generic linear algebra of the engine: power iteration, operator norms, Jacobian norms and spectral radii.

Everything here works on an abstract linear map or on the linearisation of a map
``fn: Tensor -> Tensor``; the modules that own an operator call it with theirs
(:mod:`engine.physics` the CT/MRI forward operator, :mod:`engine.data_fidelity`
the ramp-weighted normal operator, :mod:`engine.denoisers` one convolution,
:mod:`engine.regularisers` and :mod:`engine.deq` the DEQ's fixed-point map).

Plain power iteration (:func:`power_iteration`, :func:`largest_eigenvalue`, :func:`operator_norm`)
    For a symmetric positive semi-definite ``M`` (a normal operator ``A^T A``)
    and a unit start ``v_0``,

    .. math::  z_k = M v_{k-1}, \qquad v_k = z_k / \|z_k\|, \qquad \lambda_k = \|z_k\|,

    ``lambda_k -> lambda_max(M)`` from below (for a start not orthogonal to the
    top eigenvector), linearly at the rate ``(lambda_2 / lambda_1)^2``; then
    ``||A||_2 = sqrt(lambda_max(A^T A))``. Used where a fixed, seeded iteration
    count makes the result reproducible bit for bit (operator normalisation,
    step sizes, spectral normalisation of convolutions).

Jacobians of a map (:func:`jacobian_spectral_norm`, :func:`jacobian_spectral_radius`,
:func:`lipschitz_estimate`, :func:`differentiable_jacobian_norm`)
    All linearise ``fn`` at a point ``x`` of shape ``[B, ...]`` and treat every
    sample ``b`` on its own (``fn`` must not mix samples, which holds for
    convolutional networks with GroupNorm or no norm, not for BatchNorm in
    training mode):

    * ``||J_b||_2 = sqrt(lambda_max(J_b^T J_b))``, the local Lipschitz constant of
      ``fn`` at ``x_b``;
    * ``rho(J_b) = max |lambda(J_b)|``, which decides the local convergence of the
      fixed-point iteration ``x <- fn(x)`` (``rho < 1``), whereas the norm decides
      contraction (``||J|| < 1``);
    * the largest Jacobian norm found at ``x`` and a few nearby points, plus
      secant ratios ``||fn(x)-fn(y)|| / ||x-y||``.

    Method: power iteration, accelerated by a small restarted Krylov projection
    (:func:`krylov_dominant_eigenvalue`). From the current vector ``v`` a Krylov
    basis ``Q = orth(v, Mv, ..., M^{m-1} v)`` is built (``M = J^T J``, or ``J``)
    with double Gram-Schmidt, the projected matrix ``H = Q^T M Q`` is ``m x m``,
    and its dominant Ritz value is the estimate; the next cycle restarts from the
    dominant Ritz vector. This is Lanczos (symmetric ``M``) / Arnoldi (``M = J``)
    with explicit restarts: it contains plain power iteration (the power iterate
    lies in span(Q)), converges much faster when the top singular values are
    clustered, and, unlike plain power iteration on ``J``, finds a dominant
    *complex* pair of eigenvalues.

    For ``M = J^T J`` every Ritz value lies below ``lambda_max``, so the
    returned norm is a lower bound of ``||J_b||`` (up to rounding) that
    increases towards it. Products use ``torch.func`` (:class:`Linearization`):
    ``J v`` by forward mode (``jvp``), ``J^T w`` by reverse mode (``vjp``, one
    forward pass reused); if a part of ``fn`` has no forward-mode rule, ``J v``
    falls back to the transpose of the VJP (double backward). Nothing here
    accumulates ``.grad`` on parameters or changes a module's train/eval mode,
    except :func:`differentiable_jacobian_norm`, whose result carries a graph.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

__all__ = [
    "KRYLOV_DIM",
    "Linearization",
    "TensorMap",
    "differentiable_jacobian_norm",
    "jacobian_spectral_norm",
    "jacobian_spectral_radius",
    "krylov_dominant_eigenvalue",
    "largest_eigenvalue",
    "lipschitz_estimate",
    "normalisation_rtol",
    "operator_norm",
    "power_iteration",
]

TensorMap = Callable[[torch.Tensor], torch.Tensor]

#: Default Krylov subspace size per restart cycle.
KRYLOV_DIM = 8


# ---------------------------------------------------------------------------------------
# Plain power iteration on a symmetric positive semi-definite map
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def power_iteration(normal_operator: TensorMap, v: torch.Tensor, iters: int,
                    eps: float = 1e-30) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""``iters`` power iterations ``z = M v, v <- z / max(||z||, eps)`` from ``v`` (not normalised here).

    ``M = normal_operator`` must be symmetric positive semi-definite (``A^T A``),
    and ``v`` one vector of any shape (its norm is taken over all entries).
    Returns the last iterate ``v_k`` (``v`` itself when ``iters = 0``) and
    ``||z_k|| = ||M v_{k-1}||`` as a 0-dim tensor, the estimate of
    ``lambda_max(M)`` (None when ``iters = 0``). Warm starts (a stored
    ``v`` advanced a few iterations at a time) are why the start is not
    normalised here.
    """
    value = None
    for _ in range(iters):
        z = normal_operator(v)
        value = z.norm()
        v = z / value.clamp_min(eps)
    return v, value


def largest_eigenvalue(normal_operator: TensorMap, start: torch.Tensor, iters: int, rtol: float = 0.0) -> float:
    """``lambda_max`` of a symmetric positive semi-definite map by at most ``iters`` power iterations from ``start``.

    ``start`` is normalised first; 0.0 for ``iters = 0``. See :func:`power_iteration`.
    ``rtol = 0`` runs all ``iters`` (the reproducible fixed count); ``rtol > 0`` stops
    once the estimate has changed by at most ``rtol`` (relative) on
    :data:`SETTLED_STEPS` successive iterations. The iterates are the same either
    way, so an early stop only leaves out the last changes in the final digits.
    """
    v = start / start.norm()
    value, previous, settled = None, None, 0
    for _ in range(iters):
        v, value = power_iteration(normal_operator, v, 1)
        if rtol > 0:
            current = float(value)
            settled = settled + 1 if previous is not None and abs(current - previous) <= rtol * current else 0
            if settled >= SETTLED_STEPS:
                break
            previous = current
    return 0.0 if value is None else float(value)


def operator_norm(forward: TensorMap, adjoint: TensorMap, start: torch.Tensor, iters: int, rtol: float = 0.0) -> float:
    r"""``||A||_2 = sqrt(lambda_max(A^T A))`` by at most ``iters`` power iterations on ``A^T A`` from ``start``.

    ``forward`` is ``A`` and ``adjoint`` its exact transpose ``A^T``; a lower
    bound that converges from below. ``rtol``: see :func:`largest_eigenvalue`.
    """
    return math.sqrt(largest_eigenvalue(lambda x: adjoint(forward(x)), start, iters, rtol))


#: Successive iterations whose change is within ``rtol`` before a power iteration stops early.
SETTLED_STEPS = 3

#: Operators on images of up to this many pixels are normalised with the fixed iteration count
#: (every model trained so far, bit for bit); larger ones stop once settled, see :func:`normalisation_rtol`.
FIXED_COUNT_MAX_PIXELS = 256 * 256

#: The relative change at which the power iteration of a large operator counts as settled:
#: float32 round-off moves the estimate by ~1e-7 once converged (reached in ~15 of the 50 steps).
SETTLED_RTOL = 1e-6


def normalisation_rtol(pixels: int) -> float:
    """``rtol`` for normalising an operator on ``pixels``-pixel images: 0 (fixed count) up to 256x256, else settled.

    At 512x512 a power-iteration step costs two products with a 35M-entry matrix;
    stopping when settled cuts the 50 steps to ~15 and changes the norm by < 1e-6.
    """
    return 0.0 if int(pixels) <= FIXED_COUNT_MAX_PIXELS else SETTLED_RTOL


# ---------------------------------------------------------------------------------------
# Per-sample vector helpers (first dimension = batch)
# ---------------------------------------------------------------------------------------

def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _norm(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).norm(dim=1)


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def _normalize(v: torch.Tensor) -> torch.Tensor:
    n = _norm(v)
    return v / _per_sample(torch.where(n > 0, n, torch.ones_like(n)), v)


def _random_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


# ---------------------------------------------------------------------------------------
# Linearisation of fn at x
# ---------------------------------------------------------------------------------------

_forward_ad_ready = False


def _load_forward_ad_quietly() -> None:
    """Import torch's forward-AD decompositions once, hiding its internal ``torch.jit.script`` FutureWarning.

    (Under ``-W error`` that warning would otherwise abort the first JVP.)
    """
    global _forward_ad_ready
    if not _forward_ad_ready:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            try:
                from torch._decomp import decompositions_for_jvp  # noqa: F401
            except ImportError:  # private module moved: forward AD imports what it needs itself
                pass
        _forward_ad_ready = True


class Linearization:
    """``J v`` and ``J^T w`` of ``fn`` at a fixed ``x`` (no parameter gradients)."""

    def __init__(self, fn: TensorMap, x: torch.Tensor):
        self.fn = fn
        self.x = x.detach()
        self.y, self._vjp_fn = torch.func.vjp(fn, self.x)
        self._jvp_by_transpose = None
        _load_forward_ad_quietly()

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(w)[0]

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if self._jvp_by_transpose is None:
            try:
                return torch.func.jvp(self.fn, (self.x,), (v,))[1]
            except (RuntimeError, NotImplementedError):
                # No forward-mode rule somewhere: J v is the VJP of the (linear)
                # map w -> J^T w, evaluated with cotangent v.
                _, self._jvp_by_transpose = torch.func.vjp(self.vjp, torch.zeros_like(self.y))
        return self._jvp_by_transpose(v)[0]


# ---------------------------------------------------------------------------------------
# Restarted Krylov iteration for the dominant eigenvalue, per sample
# ---------------------------------------------------------------------------------------

def _dominant_ritz(H: torch.Tensor, symmetric: bool):
    """Dominant Ritz value (by modulus) of each projected matrix ``H`` (``[B, k, k]``, float64, CPU).

    Returns ``(|value| [B], restart coefficients [B, k] (real), |last coefficient| [B])``;
    the eigenvector is unit-norm, so ``beta * |last coefficient|`` is the Ritz residual.
    """
    if symmetric:
        values, vectors = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    else:
        values, vectors = torch.linalg.eig(H)
    idx = values.abs().argmax(dim=1)
    coeff = vectors.gather(2, idx.view(-1, 1, 1).expand(-1, H.shape[1], 1)).squeeze(2)
    value = values.gather(1, idx[:, None]).squeeze(1).abs()
    last = coeff[:, -1].abs()
    if not symmetric:
        # For a complex pair, Re and Im of the Ritz vector span the real invariant plane.
        coeff = coeff.real + coeff.imag
    return value, coeff, last


def krylov_dominant_eigenvalue(matvec: TensorMap, v0: torch.Tensor, max_matvecs: int, tol: float,
                                krylov_dim: int, symmetric: bool, return_vector: bool = False):
    """Estimate ``max |lambda(M_b)|`` for each sample ``b`` of a block-diagonal operator ``M``.

    ``max_matvecs`` bounds the number of ``matvec`` calls. Stops early once,
    for every sample, the Ritz residual ``||M z - theta z||`` (``z`` the unit
    Ritz vector, residual ``= h_{j+1,j} |y_j|``) is at most ``tol * |theta|``:
    for symmetric ``M`` an eigenvalue then lies within ``tol * |theta|`` of
    ``theta``. Returns a float64 CPU tensor ``[B]``, and with
    ``return_vector=True`` also the unit dominant Ritz vector (shaped like ``v0``).
    """
    if krylov_dim < 2:
        raise ValueError(f"krylov_dim must be >= 2, got {krylov_dim}")
    if max_matvecs < 1:
        raise ValueError(f"iters must be >= 1, got {max_matvecs}")
    batch = v0.shape[0]
    # Below this relative size the new Krylov direction is rounding noise: the
    # subspace is invariant for that sample and its Ritz values are exact.
    breakdown = 100 * torch.finfo(v0.dtype).eps
    v = _normalize(v0)
    used = 0
    estimate = None
    while used < max_matvecs:
        m = min(krylov_dim, max_matvecs - used)
        if m < 2 and estimate is not None:
            break
        basis = [v]
        H = torch.zeros(batch, m + 1, m, dtype=torch.float64)
        for j in range(m):
            w = matvec(basis[j])
            used += 1
            scale = _norm(w)
            for _ in range(2):  # Gram-Schmidt twice keeps the basis orthogonal in float32 too
                for i, q in enumerate(basis):
                    h = _dot(q, w)
                    H[:, i, j] += h.detach().double().cpu()
                    w = w - _per_sample(h, w) * q
            beta = _norm(w)
            alive = beta > breakdown * scale
            H[:, j + 1, j] = torch.where(alive, beta, torch.zeros_like(beta)).detach().double().cpu()
            safe_beta = torch.where(alive, beta, torch.ones_like(beta))
            basis.append(torch.where(_per_sample(alive, w), w / _per_sample(safe_beta, w), torch.zeros_like(w)))
            estimate, coeff, last = _dominant_ritz(H[:, : j + 1, : j + 1], symmetric)
            residual = H[:, j + 1, j] * last
            if bool((residual <= tol * estimate).all()):
                break
        coeff = coeff.to(device=v.device, dtype=v.dtype)
        v = _normalize(sum(_per_sample(coeff[:, i], v) * basis[i] for i in range(coeff.shape[1])))
        if bool((residual <= tol * estimate).all()):
            break
    return (estimate, v) if return_vector else estimate


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _check_point(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a tensor of shape [B, ...] with B >= 1")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    return x.detach()


def _result(per_sample_values: torch.Tensor, per_sample: bool):
    return per_sample_values if per_sample else float(per_sample_values.max())


def jacobian_spectral_norm(fn: TensorMap, x: torch.Tensor, iters: int = 50, tol: float = 1e-4,
                           generator: Optional[torch.Generator] = None, per_sample: bool = False,
                           krylov_dim: int = KRYLOV_DIM):
    r"""``||J_fn(x_b)||_2``, the largest singular value of the Jacobian at each sample.

    Accelerated power iteration on ``J^T J`` (see the module docstring),
    ``sigma_b = sqrt(lambda_max(J_b^T J_b))``. ``iters`` caps the number of
    ``J^T J v`` products (each one JVP and one VJP); the iteration stops
    earlier once the Ritz residual is below ``tol`` relative to the estimate of
    ``sigma^2`` (for an isolated top singular value the error is then about
    ``tol / 2`` relative, far less when it is well separated). The estimate
    approaches the true norm from below.

    Returns the maximum over the batch as a float, or with ``per_sample=True``
    a float64 CPU tensor ``[B]``.
    """
    x = _check_point(x)
    with torch.no_grad():
        lin = Linearization(fn, x)
        eig = krylov_dominant_eigenvalue(lambda v: lin.vjp(lin.jvp(v)), _random_like(x, generator),
                                          iters, tol, krylov_dim, symmetric=True)
    return _result(eig.clamp_min(0).sqrt(), per_sample)


def jacobian_spectral_radius(fn: TensorMap, x: torch.Tensor, iters: int = 100, tol: float = 1e-6,
                             generator: Optional[torch.Generator] = None, per_sample: bool = False,
                             krylov_dim: int = KRYLOV_DIM):
    r"""``rho(J_fn(x_b)) = max |lambda(J_b)|``, the spectral radius of the Jacobian at each sample.

    Restarted Arnoldi on ``J`` (JVPs only; see the module docstring), so a
    dominant complex pair or a ``+-lambda`` pair is found, where plain power
    iteration would oscillate. ``fn`` must map ``x`` to a tensor of the same
    shape. ``rho(J) <= ||J||``; ``rho < 1`` at a fixed point means the
    iteration ``x <- fn(x)`` converges locally. For non-normal ``J`` the
    intermediate estimates may overshoot ``rho`` before converging.

    Returns the maximum over the batch as a float, or with ``per_sample=True``
    a float64 CPU tensor ``[B]``.
    """
    x = _check_point(x)
    with torch.no_grad():
        lin = Linearization(fn, x)
        if lin.y.shape != x.shape:
            raise ValueError(f"the spectral radius needs fn to keep the shape: {list(x.shape)} -> {list(lin.y.shape)}")
        radius = krylov_dominant_eigenvalue(lin.jvp, _random_like(x, generator), iters, tol,
                                             krylov_dim, symmetric=False)
    return _result(radius, per_sample)


def lipschitz_estimate(fn: TensorMap, x: torch.Tensor, iters: int = 50, n_restarts: int = 1,
                       radius: float = 0.05, tol: float = 1e-4,
                       generator: Optional[torch.Generator] = None) -> float:
    r"""An empirical **lower-bound estimate** of ``Lip(fn)`` near ``x`` (not a certificate).

    Returns the maximum over the batch and over ``n_restarts`` points of

    * ``||J_fn(p)||_2`` (:func:`jacobian_spectral_norm`, fresh random start each time), at
      ``p = x`` and at ``n_restarts - 1`` random points
      ``p = x + radius * rms(x_b) * N(0, I)``;
    * the secant ratio ``||fn(p) - fn(x)|| / ||p - x||`` for those random points
      (catches kinks that a Jacobian at one point misses).

    Every term is at most ``Lip(fn)`` restricted to the points visited, hence
    a lower bound of the global constant; larger ``n_restarts`` and ``iters``
    tighten it.
    """
    x = _check_point(x)
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1, got {n_restarts}")
    best = jacobian_spectral_norm(fn, x, iters=iters, tol=tol, generator=generator)
    if n_restarts == 1:
        return best
    with torch.no_grad():
        fx = fn(x)
        rms = _norm(x) / max(x[0].numel(), 1) ** 0.5
        scale = _per_sample(torch.where(rms > 0, rms, torch.ones_like(rms)), x)
        for _ in range(n_restarts - 1):
            point = x + radius * scale * _random_like(x, generator)
            best = max(best, jacobian_spectral_norm(fn, point, iters=iters, tol=tol, generator=generator))
            step = _norm(point - x)
            secant = _norm(fn(point) - fx) / torch.where(step > 0, step, torch.ones_like(step))
            best = max(best, float(secant.max()))
    return best


def differentiable_jacobian_norm(fn: TensorMap, x: torch.Tensor, iters: int = 8, tol: float = 1e-3,
                                 generator: Optional[torch.Generator] = None,
                                 krylov_dim: int = KRYLOV_DIM) -> torch.Tensor:
    r"""``||J_fn(x_b)||_2`` per sample ``[B]``, differentiable with respect to ``fn``'s parameters.

    The top singular pair ``(u, v)`` of ``J`` is found *without* a graph
    (restarted Lanczos on ``J^T J``, as in :func:`jacobian_spectral_norm`); then

    .. math::   \sigma(\theta) = \|J_{f_\theta}(x)^\top u\|_2, \qquad u = Jv / \|Jv\|,

    is evaluated with one vector-Jacobian product under ``create_graph=True``.
    For an exact singular pair ``sigma = sigma_max`` and
    ``d sigma / d theta = u^T (dJ/d theta) v``, the derivative of ``sigma_max``
    itself (singular values are differentiable where simple), so only this one
    product needs a graph. ``deepinv.loss.JacobianSpectralNorm`` computes the
    same value but keeps the graph of *every* power iteration
    (``eval_mode=False``), ``iters`` times the memory and the double-backward cost.

    ``iters`` caps the ``J^T J`` products of the search for the top singular
    pair (each one JVP and one VJP, no graph); the returned value then costs
    one forward pass and one VJP with a graph. It is a lower bound of the norm
    that is exact once the singular vectors have converged. ``x`` gets no gradient.
    """
    x = x.detach()
    with torch.no_grad():
        lin = Linearization(fn, x)
        _, v = krylov_dominant_eigenvalue(lambda w: lin.vjp(lin.jvp(w)), _random_like(x, generator), iters, tol,
                                          krylov_dim, symmetric=True, return_vector=True)
        u = _normalize(lin.jvp(v))
    with torch.enable_grad():
        point = x.clone().requires_grad_(True)
        (jtu,) = torch.autograd.grad(fn(point), point, u, create_graph=True)
    return _norm(jtu)
