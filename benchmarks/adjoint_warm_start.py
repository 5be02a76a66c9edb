#!/usr/bin/env python
r"""Would starting the adjoint solve at the previous step's adjoint solution save VJPs? (Measured: no.)

The adjoint fixed point ``g = J^T g + v`` (``v = dl/dz``) does not depend on where its solve starts,
so any start is valid; the engine starts at ``v``, the first Neumann term. A training image seen
again (``loss.reuse_fixed_points``) has a previous adjoint solution ``g_prev`` for each of its two
model calls in an MC + EI step, and ``g_prev`` would be a good start if ``v`` and ``J`` had barely
changed. This script measures it on :mod:`deq_step`'s problem (128 px, 30 views, batch 4, tol 1e-4,
Anderson m = 5, seeded random ResUNet weights, which converge): for ``--trials`` pairs of steps,
the weights moved by one Adam-sized step (every weight by ``2e-5``) in between, it counts the
adjoint iterations of the second step started cold (at ``v``) and at the first step's solutions,

* with the **same** EI rotation in both steps (what a benchmark repeating one batch would see), and
* with a **new** rotation, as training draws one every step (``v`` of both calls changes with it),

and the relative difference of the parameter gradient between the two starts (both are solves of
the same system to the same tolerance; it should be at the float32 tolerance level, ~1e-6).

The step's two adjoint solves run in a fixed order (EI's call first, then the MC call, whose right
side carries EI's gradient through ``A T_g x1``); the script tells them apart by that order, by
wrapping :func:`engine.solvers.solve` as the DEQ calls it, which is why this is a benchmark and not an
engine option.

    .venv/bin/python benchmarks/adjoint_warm_start.py [--trials 3] [--size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import deq_step  # noqa: E402  (puts the checkout on sys.path)
import engine.deq  # noqa: E402

#: the solves of one MC + EI step, in the order the DEQ runs them
FORWARD_SOLVES = 2
ADJOINT_CALLS = ("EI call", "MC call")


class AdjointStarts:
    """Wraps the DEQ's solver: records each adjoint solution of a step, optionally starts from the last ones."""

    def __init__(self) -> None:
        self.solutions: dict[int, torch.Tensor] = {}
        self.start_from: dict[int, torch.Tensor] = {}
        self.iterations: list[int] = []
        self._index = 0

    def begin_step(self, start_from: dict[int, torch.Tensor]) -> None:
        self._index, self.iterations, self.start_from = 0, [], start_from

    @contextmanager
    def installed(self):
        solve = engine.deq.solve

        def wrapped(f, x0, options, control=None, recorder=None):
            index = self._index - FORWARD_SOLVES
            self._index += 1
            if index < 0:  # a forward solve
                return solve(f, x0, options, control, recorder=recorder)
            g, stats = solve(f, self.start_from.get(index, x0), options, control, recorder=recorder)
            self.solutions[index] = g.detach().clone()
            self.iterations.append(stats.max_iterations_used)
            return g, stats

        engine.deq.solve = wrapped
        try:
            yield self
        finally:
            engine.deq.solve = solve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="pairs of steps per variant (default 3)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--views", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.weights = "random"

    den, source = deq_step.build_weights(args)
    deq_step.set_layout(den, True)
    physics, noise, _, y = deq_step.build_problem(args)
    model = deq_step.engine_model(den, args.tol, 100)
    params = [q for q in den.parameters() if q.requires_grad]
    loss = deq_step.make_loss(False)
    generator = torch.Generator().manual_seed(args.seed + 7)
    starts = AdjointStarts()

    def step(seed, start_from):
        starts.begin_step(start_from)
        _, _, grad, _ = deq_step.train_step(model, params, loss, noise, y, physics, seed)
        return grad, list(starts.iterations), dict(starts.solutions)

    rows = {"same rotation": [], "new rotation": []}
    with starts.installed():
        for trial in range(args.trials):
            seed = args.seed + 100 * trial
            _, first_its, previous = step(seed, {})
            deq_step.move_weights(params, generator)
            for name, next_seed in (("same rotation", seed), ("new rotation", seed + 1)):
                cold_grad, cold_its, _ = step(next_seed, {})
                warm_grad, warm_its, _ = step(next_seed, previous)
                diff = float((warm_grad - cold_grad).norm() / cold_grad.norm())
                rows[name].append((cold_its, warm_its, diff))
            print(f"trial {trial + 1}/{args.trials}: first step's adjoint iterations {first_its}", flush=True)

    print(f"\n### Adjoint solve started at the previous step's solution ({args.size} px, {args.views} views, "
          f"batch {args.batch}, tol {args.tol:g}, {args.trials} trials; weights: {source})\n")
    print(f"| EI rotation in the second step | adjoint iterations, cold ({', '.join(ADJOINT_CALLS)}) "
          "| started at the previous solution | gradient rel. difference |")
    print("|---|---|---|---:|")
    for name, trials in rows.items():
        cold = " / ".join(",".join(map(str, c)) for c, _, _ in trials)
        warm = " / ".join(",".join(map(str, w)) for _, w, _ in trials)
        total_cold = sum(sum(c) for c, _, _ in trials)
        total_warm = sum(sum(w) for _, w, _ in trials)
        print(f"| {name} | {cold} (sum {total_cold}) | {warm} (sum {total_warm}) "
              f"| {statistics.median(d for _, _, d in trials):.1e} |")
    print(f"\n{deq_step.machine_description(args.threads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
