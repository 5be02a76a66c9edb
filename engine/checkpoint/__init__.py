"""Training checkpoints: one documented, versioned format in ``.pt`` or ``.safetensors``.

The format is described in ``docs/checkpoint-format.md``. The package is split by concern:

* :mod:`engine.checkpoint.format` — the :class:`Checkpoint` dataclass, its
  encoding, the two containers, :func:`save_checkpoint`, :func:`load_checkpoint`
  and :func:`publish_latest`;
* :mod:`engine.checkpoint.safety` — what a file may contain before anything in
  it is used: container sniffing, pickled code, tensor and tree checks, and the
  reading limits ``MAX_NESTING``, ``MAX_SAFETENSORS_HEADER``, ``MAX_METADATA_JSON``
  and ``MAX_STEP``;
* :mod:`engine.checkpoint.compatibility` — whether a checkpoint fits the current
  config (:func:`compare_configs`, :func:`check_compatible`), a model
  (:func:`check_state_matches`) and a resumed run's optimiser and scheduler
  (:func:`check_resume_state`);
* :mod:`engine.checkpoint.rng` — :func:`capture_rng_state` / :func:`restore_rng_state`.

Files are written through :mod:`engine.atomic` (:func:`atomic_write` and
:func:`remove_stale_temp_files` are re-exported here). Import the public names
from this package. The reading limits are module constants of
:mod:`engine.checkpoint.safety` (``engine.checkpoint.safety.MAX_METADATA_JSON = ...``).
"""

from __future__ import annotations

from engine.atomic import atomic_write, remove_stale_temp_files
from engine.checkpoint.compatibility import check_compatible, check_resume_state, check_state_matches, compare_configs
from engine.checkpoint.format import (FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS, Checkpoint, load_checkpoint,
                                      publish_latest, save_checkpoint)
from engine.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_NAME",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "compare_configs",
    "check_compatible",
    "check_state_matches",
    "capture_rng_state",
    "restore_rng_state",
    "atomic_write",
    "publish_latest",
    "remove_stale_temp_files",
    "check_resume_state",
]
