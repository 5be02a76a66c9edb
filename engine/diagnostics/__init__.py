"""Solver diagnostics: record a solve, measure it, say why it failed and what to change, replay it.

* :mod:`~engine.diagnostics.recording`: :class:`SolveRecorder` (attached to a solve) and the
  NumPy :class:`SolveRecording` it produces (bounded iterates, residual maps, traces).
* :mod:`~engine.diagnostics.diagnosis`: :func:`diagnose`, plain-language :class:`Diagnosis`
  with evidence and a one-click :class:`Remedy` (config changes).
* :mod:`~engine.diagnostics.inspect`: record a forward solve, measure the spectral radius and
  the denoiser's Lipschitz estimate, replay with other settings, apply settings to a model.
"""

from __future__ import annotations

from engine.diagnostics.diagnosis import Diagnosis, Remedy, Settings, diagnose
from engine.diagnostics.recording import NonFinite, SolveRecorder, SolveRecording

#: the built-in divergence demonstration: no Jacobian penalty and no safeguard, a data step far past
#: the contraction limit of 2, plain iteration with no fallback to hide the failure. The divergence test
#: is made stricter (residual 10x above its best, not 1e4x): the blown-up iterate saturates the relative
#: residual near 2, and a demonstration should end in "diverged", not wait out max_iter.
MAKE_IT_DIVERGE = {"deq.stepsize": 5.0, "jacobian.penalty": 0.0, "jacobian.safeguard": "off",
                   "solver.name": "fixed_point", "solver.damping": 1.0, "solver.fallback": "",
                   "solver.divergence_factor": 10.0}

__all__ = ["Diagnosis", "Remedy", "Settings", "diagnose", "NonFinite", "SolveRecorder", "SolveRecording",
           "MAKE_IT_DIVERGE"]
