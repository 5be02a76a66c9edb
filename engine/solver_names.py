"""The fixed-point solvers' vocabulary, torch-free: the solver names a config may choose, the ways a solve stops.

This is the one list of each. :mod:`engine.config` validates ``solver.name`` and
``solver.fallback`` against :data:`SOLVER_NAMES` without importing torch;
:mod:`engine.solvers` registers exactly one solve function per name (its
``SOLVERS`` registry refuses other names and checks at import that none is
missing); every :class:`~engine.solvers.SolveStats` reports one of
:data:`STOP_REASONS` per sample, and the trainer, the CLI and the GUI read
those reasons by these constants.
"""

from __future__ import annotations

__all__ = [
    "FIXED_POINT",
    "ANDERSON",
    "BROYDEN",
    "SOLVER_NAMES",
    "CONVERGED",
    "MAX_ITERATIONS",
    "DIVERGED",
    "NON_FINITE",
    "STOPPED",
    "STOP_REASONS",
    "FAILURE_REASONS",
]

FIXED_POINT = "fixed_point"  #: plain / damped (Krasnosel'skii-Mann) iteration, the robust fallback
ANDERSON = "anderson"  #: Anderson acceleration (type II)
BROYDEN = "broyden"  #: limited-memory good Broyden

#: Every solver a config may name, in the order the GUI lists them.
SOLVER_NAMES = (FIXED_POINT, ANDERSON, BROYDEN)

CONVERGED = "converged"  #: the residual met the tolerance
MAX_ITERATIONS = "max_iterations"  #: the iteration cap was reached first (also every unrolled solve)
DIVERGED = "diverged"  #: the residual ran away from its running minimum, or restarts made no progress
NON_FINITE = "non_finite"  #: the residual or the iterate turned NaN / Inf
STOPPED = "stopped"  #: the user asked the solve to end (stop / keep current iterate)

#: Every reason a sample's solve can end with.
STOP_REASONS = (CONVERGED, MAX_ITERATIONS, DIVERGED, NON_FINITE, STOPPED)

#: The reasons that count as a failed solve: the fallback solver retries these samples,
#: and a training step with one is not applied.
FAILURE_REASONS = (DIVERGED, NON_FINITE)
