r"""Deep equilibrium reconstruction ``model(y, physics)`` with selectable gradient modes.

The reconstruction is the fixed point ``x* = F_theta(x*; y, A)`` of

* ``pgd``: :math:`F(x) = D_\theta\big(x - \eta \nabla f(x)\big)`, with ``f`` the data
  fidelity of :mod:`engine.data_fidelity` (``l2``: :math:`\nabla f = A^\top(Ax - y)`;
  ``ramp``, sparse-view CT: :math:`A^\top W(Ax - y)`, ``W`` the FBP ramp filter) and
  :math:`\eta = \text{stepsize} / \operatorname{Lip}(\nabla f)`
* ``hqs``: :math:`F(x) = D_\theta\big(\operatorname{prox}_{\eta f}(x)\big)`,
  :math:`\operatorname{prox}_{\eta f}(x) = (A^\top A + I/\eta)^{-1}(A^\top y + x/\eta)`
  (closed form for MRI, conjugate gradients for CT, both inside deepinv)

started from ``A^dagger y`` and found by one of :mod:`engine.solvers`. With a
relaxation weight ``a = relaxation`` in ``(0, 1]`` the solvers iterate the
relaxed map :math:`F_a(x) = a F(x) + (1 - a) x` (Krasnosel'skii-Mann, as the
self-supervised DEQs SelfDEQ / TomoSelfDEQ do with ``a ~ 0.5``): it has the same
fixed points, and its Jacobian :math:`a J + (1 - a) I` moves the eigenvalues of
``J`` towards 1, which turns an oscillating (negative or complex) direction with
``|lambda| > 1`` into a convergent one. The implicit gradient is unchanged: the
adjoint of the relaxed map gives ``g / a``, and ``z``'s dependence on ``theta``
is ``a dF/dtheta``.

Gradient modes (``gradient=``):

``implicit``
    Modular implicit differentiation. Solve without a graph, re-apply ``F``
    once with a graph at ``x*`` (``z = F(x*)``), and register a hook on ``z``
    that replaces the incoming gradient ``v = dl/dz`` by the solution of the
    adjoint fixed point :math:`g = (\partial F/\partial x)^\top g + v`, solved
    with the same solvers (vector-Jacobian products of the one graph). Autograd
    then carries ``g`` into ``theta`` and into ``y``, which is the implicit
    function theorem's gradient. Because the hook sits on the output, any loss
    works, including EI, which calls the model twice per loss and
    differentiates through the second call's input ``A T_g x1``. Memory does
    not depend on the number of forward iterations.
``jfb``
    Jacobian-free backprop: the same ``z = F(x*)`` without the hook
    (approximates :math:`(I - J)^{-\top} \approx I`).
``unrolled``
    An unrolled network: ``unrolled_iterations`` plain iterations from
    ``A^dagger y``, in training (autograd through all of them, memory linear
    in the iterations) and at test time alike, so the network evaluated is
    the network trained. The baseline; with many iterations of a contraction
    it is also the reference the implicit gradient is checked against.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import nn

from engine.config import AUTOCAST_MODES, SolverConfig
from engine.data_fidelity import build_fidelity
from engine.denoisers import sync_spectral_norms
from engine.events import RunControl
from engine.linalg import jacobian_spectral_radius
from engine.physics import baseline
from engine.solver_names import MAX_ITERATIONS
from engine.solvers import SolveStats, solve

GRADIENT_MODES = ("implicit", "jfb", "unrolled")

#: Arnoldi budget (JVPs) and relative tolerance of the spectral-radius monitor: a cheap estimate
RADIUS_ITERS = 30
RADIUS_TOL = 1e-3
OPERATORS = ("pgd", "hqs")

SolveCallback = Callable[[str, SolveStats], None]
FixedPointCallback = Callable[[torch.Tensor, torch.Tensor], None]


class FixedPointOperator(nn.Module):
    """``F_theta(x; y, physics)``: a data-consistency step followed by the denoiser, relaxed.

    For ``pgd`` the step is ``x - (stepsize / Lip) grad f(x)`` with ``f`` the
    named data fidelity (:mod:`engine.data_fidelity`); ``0 < stepsize < 2``
    keeps it non-expansive, so ``F`` is as contractive as the denoiser. For
    ``hqs`` it is deepinv's ``prox_l2`` with ``gamma = stepsize``. The output
    is ``relaxation * D(step(x)) + (1 - relaxation) * x``.
    """

    def __init__(self, denoiser: nn.Module, kind: str = "pgd", stepsize: float = 1.0, fidelity: str = "l2",
                 relaxation: float = 1.0, sigma: float = 0.03, learn_sigma: bool = True):
        super().__init__()
        if kind not in OPERATORS:
            raise ValueError(f"unknown fixed-point operator '{kind}' (known: {', '.join(OPERATORS)})")
        if kind == "hqs" and fidelity != "l2":
            raise ValueError("the hqs operator's proximal step is plain l2; use fidelity='l2'")
        if not 0.0 < relaxation <= 1.0:
            raise ValueError(f"relaxation must be in (0, 1], got {relaxation}")
        self.denoiser = denoiser
        self.kind = kind
        self.stepsize = stepsize
        self.relaxation = float(relaxation)
        self.fidelity = build_fidelity(fidelity)
        self.autocast = "off"
        self._compiled: list = []  # [torch.compile(denoiser)] when set_execution(compile=True)
        if getattr(denoiser, "noise_level_input", False):
            # the regularisation strength of a conditioned denoiser, kept positive by its log
            if not sigma > 0:
                raise ValueError(f"sigma must be > 0, got {sigma}")
            self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)), requires_grad=learn_sigma)
        else:
            self.log_sigma = None

    @property
    def sigma(self) -> Optional[torch.Tensor]:
        """The noise level handed to a conditioned denoiser (None for a blind one)."""
        return None if self.log_sigma is None else self.log_sigma.exp()

    def data_step(self, x: torch.Tensor, y: torch.Tensor, physics) -> torch.Tensor:
        if self.kind == "pgd":
            eta = self.stepsize / self.fidelity.lipschitz(physics, x)
            return x - eta * self.fidelity.grad(x, y, physics)
        return physics.prox_l2(x, y, self.stepsize)

    def unrelaxed(self, x: torch.Tensor, y: torch.Tensor, physics) -> torch.Tensor:
        """``D(step(x))``, the map before relaxation (its Jacobian is what the penalty bounds)."""
        return self.denoise(self.data_step(x, y, physics))

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """``D(x)`` as :meth:`set_execution` chose to run it (compiled, bfloat16); the output has ``x``'s dtype."""
        denoiser = self.denoiser
        if self._compiled:
            sync_spectral_norms(self.denoiser)  # the stateful part, eagerly: the compiled graph only divides
            denoiser = self._compiled[0]
        if self.autocast == "bf16":
            # only the denoiser's arithmetic in bfloat16: the data step before it and the solver's
            # mixing and residuals after it stay in x's dtype
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return denoiser(x, self.sigma).to(x.dtype)
        return denoiser(x, self.sigma)

    def set_execution(self, autocast: str = "off", compile: bool = False) -> "FixedPointOperator":
        """How the denoiser runs: ``autocast`` "off" / "bf16", ``compile`` with :func:`torch.compile`.

        The compiled module is kept outside the module tree (a list), so state dicts
        and checkpoints are the same with and without it.
        """
        if autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {autocast!r}")
        self.autocast = autocast
        self._compiled = [torch.compile(self.denoiser, dynamic=False)] if compile else []
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, physics) -> torch.Tensor:
        out = self.unrelaxed(x, y, physics)
        if self.relaxation == 1.0:
            return out
        return self.relaxation * out + (1.0 - self.relaxation) * x


class DEQReconstructor(nn.Module):
    """A DEQ following deepinv's reconstructor convention ``model(y, physics) -> x``.

    Every solve's :class:`~engine.solvers.SolveStats` goes to ``on_solve``
    (``"forward"`` / ``"backward"``) when set, and the newest are kept in
    :attr:`last_forward_stats` / :attr:`last_backward_stats`. Every forward
    call's measurements and (detached) fixed point go to ``on_fixed_point(y, x*)``
    when set: the trainer's Jacobian penalty and spectral-radius monitor use them.
    """

    def __init__(self, operator: FixedPointOperator, forward_solver: SolverConfig,
                 backward_solver: Optional[SolverConfig] = None, gradient: str = "implicit",
                 unrolled_iterations: int = 20, control: Optional[RunControl] = None,
                 on_solve: Optional[SolveCallback] = None, on_fixed_point: Optional[FixedPointCallback] = None):
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode '{gradient}' (known: {', '.join(GRADIENT_MODES)})")
        self.operator = operator
        self.forward_solver = forward_solver
        self.backward_solver = backward_solver or forward_solver
        self.gradient = gradient
        self.unrolled_iterations = unrolled_iterations
        self.control = control
        self.on_solve = on_solve
        self.on_fixed_point = on_fixed_point
        self.last_forward_stats: Optional[SolveStats] = None
        self.last_backward_stats: Optional[SolveStats] = None
        #: ``direction -> SolveRecorder`` (engine.diagnostics) to record every solve into its
        #: ``SolveStats.recording`` (the trainer sets it; None records nothing)
        self.recorder_factory: Optional[Callable[[str], object]] = None

    @property
    def denoiser(self) -> nn.Module:
        return self.operator.denoiser

    def _report(self, direction: str, stats: SolveStats) -> None:
        if direction == "forward":
            self.last_forward_stats = stats
        else:
            self.last_backward_stats = stats
        if self.on_solve is not None:
            self.on_solve(direction, stats)

    def fixed_point_map(self, y: torch.Tensor, physics, relaxed: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> F(x; y)``: the (relaxed) map the solvers iterate, or with ``relaxed=False`` ``D(step(x))``."""
        if relaxed:
            return lambda x: self.operator(x, y, physics)
        return lambda x: self.operator.unrelaxed(x, y, physics)

    def spectral_radius(self, y: torch.Tensor, physics, x_star: torch.Tensor, iters: int = RADIUS_ITERS,
                        tol: float = RADIUS_TOL, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-sample spectral radius of the iterated (relaxed) map's Jacobian at ``x_star`` (float64, ``[B]``).

        Below 1 the fixed-point iteration converges locally; it is a cheap
        Arnoldi estimate (:func:`engine.linalg.jacobian_spectral_radius`,
        ``iters`` JVPs at most), accurate to a few per cent.
        """
        return jacobian_spectral_radius(self.fixed_point_map(y, physics), x_star, iters=iters, tol=tol,
                                        generator=generator, per_sample=True)

    def initial(self, y: torch.Tensor, physics) -> torch.Tensor:
        return baseline(physics, y)

    def solve_forward(self, y: torch.Tensor, physics, x_init: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x*`` without any graph, its statistics reported."""
        with torch.no_grad():
            y_const = y.detach()
            x0 = self.initial(y_const, physics) if x_init is None else x_init.detach()
            recorder = self.recorder_factory("forward") if self.recorder_factory is not None else None
            x_star, stats = solve(self.fixed_point_map(y_const, physics), x0, self.forward_solver, self.control,
                                  recorder=recorder)
            if recorder is not None:
                stats.recording = recorder.finish(stats, self.forward_solver,
                                                  replay={"y": y_const, "x0": x0, "x_final": x_star,
                                                          "physics": physics})
        self._report("forward", stats)
        if self.on_fixed_point is not None:
            self.on_fixed_point(y_const, x_star)
        return x_star

    def forward(self, y: torch.Tensor, physics, x_init: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gradient == "unrolled":
            return self._unrolled(y, physics, x_init)
        x_star = self.solve_forward(y, physics, x_init)
        if not torch.is_grad_enabled():
            return self.operator(x_star, y, physics)
        x_leaf = x_star.detach().requires_grad_(self.gradient == "implicit")
        z = self.operator(x_leaf, y, physics)
        if self.gradient == "implicit" and z.requires_grad:
            z.register_hook(self._adjoint_hook(z, x_leaf, y, physics))
        return z

    def _adjoint_hook(self, z: torch.Tensor, x_leaf: torch.Tensor, y: torch.Tensor, physics):
        # The VJPs inside the hook start at z, which fires z's own hook again;
        # those inner calls must pass the gradient through untouched.
        inside = [False]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if inside[0]:
                return grad

            def adjoint_map(g: torch.Tensor) -> torch.Tensor:
                (vjp,) = torch.autograd.grad(z, x_leaf, g, retain_graph=True)
                return vjp + grad

            inside[0] = True
            recorder = self.recorder_factory("backward") if self.recorder_factory is not None else None
            try:
                g, stats = solve(adjoint_map, grad, self.backward_solver, self.control, recorder=recorder)
            finally:
                inside[0] = False
            if recorder is not None:
                stats.recording = recorder.finish(stats, self.backward_solver, replay={
                    "y": y.detach(), "x_star": x_leaf.detach(), "rhs": grad.detach(), "physics": physics})
            self._report("backward", stats)
            return g

        return hook

    def _unrolled(self, y: torch.Tensor, physics, x_init: Optional[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        stats = SolveStats(solver="unrolled", tolerance=0.0, tolerance_mode=self.forward_solver.stop_mode)
        x = self.initial(y, physics) if x_init is None else x_init
        f = self.fixed_point_map(y, physics)
        for _ in range(self.unrolled_iterations):
            fx = f(x)
            with torch.no_grad():
                diff = torch.linalg.vector_norm((fx - x).flatten(1), dim=1).double()
                stats.abs_residuals.append(diff)
                stats.rel_residuals.append(diff / (torch.linalg.vector_norm(fx.flatten(1), dim=1).double() + 1e-12))
            x = fx
        stats.f_evals = self.unrolled_iterations
        stats.iterations = torch.full((y.shape[0],), self.unrolled_iterations, dtype=torch.long)
        stats.stop_reasons = [MAX_ITERATIONS] * y.shape[0]
        stats.seconds = time.perf_counter() - started
        self._report("forward", stats)
        if self.on_fixed_point is not None:
            self.on_fixed_point(y.detach(), x.detach())
        return x
