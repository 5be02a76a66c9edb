"""Limited-memory ("good") Broyden's method for the root of ``g(x) = f(x) - x``, batched.

The inverse Jacobian of ``g`` is approximated as ``B = -I + U V^T`` with at
most ``m`` rank-one terms. Each step moves ``x_+ = x - B g(x)`` and applies
the good-Broyden update of the inverse::

    B_+ = B + (dx - B dg) dx^T B / (dx^T B dg),   dx = x_+ - x,  dg = g(x_+) - g(x)

When the memory is full the oldest pair is overwritten. Restarts and
divergence as in Anderson (residual far above its best: clear the memory and
go back to the best iterate).
"""

from __future__ import annotations

import torch

from engine.config import SolverConfig
from engine.solver_names import BROYDEN
from engine.solvers.base import FixedPointMap, Tracker, register_solver


def _apply_inverse(us, vs, vec):
    """B vec with B = -I + U V^T (us, vs: [B, m, d]; vec: [B, d])."""
    return -vec + torch.bmm(us.transpose(1, 2), torch.bmm(vs, vec.unsqueeze(-1))).squeeze(-1)


def _apply_inverse_transposed(us, vs, vec):
    """B^T vec = -vec + V U^T vec."""
    return -vec + torch.bmm(vs.transpose(1, 2), torch.bmm(us, vec.unsqueeze(-1))).squeeze(-1)


@register_solver(BROYDEN)
def broyden(f: FixedPointMap, x0: torch.Tensor, options: SolverConfig, tracker: Tracker) -> None:
    """Broyden's iteration on ``f`` from ``x0`` (see the module docstring), bookkept by ``tracker``."""
    shape = x0.shape
    batch, m = shape[0], max(1, options.memory)
    dim = x0[0].numel()
    us = x0.new_zeros(batch, m, dim)
    vs = x0.new_zeros(batch, m, dim)
    tiny = torch.finfo(x0.dtype).eps

    x = x0.reshape(batch, dim)
    gx_prev = x_prev = None
    pairs = 0
    iteration = 0
    while True:
        fx = f(x.view(shape)).reshape(batch, dim)
        tracker.stats.f_evals += 1
        iteration += 1
        gx = fx - x
        monitored = tracker.observe(x.view(shape), fx.view(shape))
        if tracker.check_control_and_cap(iteration):
            break
        act = tracker.active

        restart = tracker.needs_restart(monitored)
        if gx_prev is not None:
            dx, dg = x - x_prev, gx - gx_prev
            b_dg = _apply_inverse(us, vs, dg)
            v_new = _apply_inverse_transposed(us, vs, dx)              # (dx^T B)^T
            denom = (v_new * dg).sum(1, keepdim=True)
            denom = torch.where(denom.abs() < tiny, torch.full_like(denom, tiny), denom)
            u_new = (dx - b_dg) / denom
            ok = act & ~restart & torch.isfinite(u_new).all(1) & torch.isfinite(v_new).all(1)
            slot = pairs % m
            us[:, slot] = torch.where(ok[:, None], u_new, torch.zeros_like(u_new))
            vs[:, slot] = torch.where(ok[:, None], v_new, torch.zeros_like(v_new))
            pairs += 1
        if bool(restart.any()):
            us[restart] = 0
            vs[restart] = 0
            x = torch.where(restart[:, None], tracker.best_x.reshape(batch, dim), x)
            gx_prev = x_prev = None
            continue

        step = -_apply_inverse(us, vs, gx)
        x_prev, gx_prev = x, gx
        x = torch.where(act[:, None], x + options.damping * step, x)
