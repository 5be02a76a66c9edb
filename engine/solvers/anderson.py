"""Anderson acceleration (type II), batched, with relative regularisation and safeguarded restarts.

With the last ``n <= m`` iterates ``x_i`` and residuals ``g_i = f(x_i) - x_i``
of a sample, the next iterate is::

    alpha = argmin_{sum(alpha) = 1} || sum_i alpha_i g_i ||^2 + lambda ||alpha||^2
    x_+   = beta * sum_i alpha_i f(x_i) + (1 - beta) * sum_i alpha_i x_i

with ``alpha = (H + lambda I)^{-1} 1 / (1^T (H + lambda I)^{-1} 1)``,
``H_ij = <g_i, g_j>``. The ridge is **relative**: ``lambda = reg * tr(H) / n``,
so it means the same at residual 1e2 as at 1e-6 (deepinv's absolute ridge
either dominates or vanishes as residuals shrink). When a sample's residual
rises ``restart_factor`` above its best, its history is cleared and it
restarts from its best iterate; more than ``max_restarts`` restarts without
progress is reported as divergence.
"""

from __future__ import annotations

import torch

from engine.config import SolverConfig
from engine.solver_names import ANDERSON
from engine.solvers.base import FixedPointMap, Tracker, register_solver


@register_solver(ANDERSON)
def anderson(f: FixedPointMap, x0: torch.Tensor, options: SolverConfig, tracker: Tracker) -> None:
    """Anderson's iteration on ``f`` from ``x0`` (see the module docstring), bookkept by ``tracker``."""
    shape = x0.shape
    batch, m, beta = shape[0], max(1, options.memory), options.damping
    dim = x0[0].numel()
    xs = x0.new_zeros(batch, m, dim)        # iterates
    fs = x0.new_zeros(batch, m, dim)        # f(iterates)
    valid = torch.zeros(batch, m, dtype=torch.bool, device=x0.device)
    eye = torch.eye(m, dtype=x0.dtype, device=x0.device)

    x = x0.reshape(batch, dim)
    iteration = 0
    while True:
        fx = f(x.view(shape)).reshape(batch, dim)
        tracker.stats.f_evals += 1
        slot = iteration % m
        iteration += 1
        monitored = tracker.observe(x.view(shape), fx.view(shape))
        if tracker.check_control_and_cap(iteration):
            break
        act = tracker.active
        xs[:, slot] = torch.where(act[:, None], x, xs[:, slot])
        fs[:, slot] = torch.where(act[:, None], fx, fs[:, slot])
        valid[:, slot] |= act

        restart = tracker.needs_restart(monitored)
        if bool(restart.any()):
            valid &= ~restart[:, None]
            # the restarted samples continue from their best iterate with an empty history
            x = torch.where(restart[:, None], tracker.best_x.reshape(batch, dim), x)
            continue

        g = fs - xs
        gram = torch.bmm(g, g.transpose(1, 2))                   # [B, m, m]
        vmask = valid.to(x.dtype)
        pair = vmask[:, :, None] * vmask[:, None, :]
        gram = gram * pair + eye * (1 - vmask)[:, None, :]       # invalid slots -> identity rows
        scale = (torch.diagonal(gram, dim1=1, dim2=2) * vmask).sum(1) / vmask.sum(1).clamp_min(1)
        ridge = options.regularization * scale + torch.finfo(x.dtype).tiny ** 0.5
        system = gram + ridge[:, None, None] * eye * vmask[:, None, :]
        weights = torch.linalg.solve(system, vmask.unsqueeze(-1)).squeeze(-1) * vmask
        weights = weights / weights.sum(1, keepdim=True)
        bad = ~torch.isfinite(weights).all(1)
        if tracker.recorder is not None:  # conditioning of the valid block (empty slots at the block's scale)
            block = system - eye * (1 - vmask)[:, None, :] + scale[:, None, None] * eye * (1 - vmask)[:, None, :]
            condition = torch.linalg.cond(block.double())
            tracker.recorder.observe_conditioning(torch.where(bad, torch.full_like(condition, float("inf")),
                                                              condition))
        if bool(bad.any()):  # singular history: fall back to the newest pair
            fallback_w = torch.zeros_like(weights)
            fallback_w[:, slot] = 1.0
            weights = torch.where(bad[:, None], fallback_w, weights)
        mixed_f = torch.bmm(weights.unsqueeze(1), fs).squeeze(1)
        if beta == 1.0:
            x_new = mixed_f
        else:
            x_new = beta * mixed_f + (1 - beta) * torch.bmm(weights.unsqueeze(1), xs).squeeze(1)
        x = torch.where(act[:, None], x_new, x)
