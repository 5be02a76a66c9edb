"""The global random-number states a checkpoint stores, so that a resumed run draws what the original would have.

Owns :func:`capture_rng_state` and :func:`restore_rng_state`: torch (CPU and,
if initialised, CUDA), Python ``random`` and NumPy's global generator, encoded
with tensors and primitives only, as the checkpoint format
(:mod:`engine.checkpoint.format`) requires.
"""

from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch


def capture_rng_state() -> dict:
    """The torch (CPU and, if initialised, CUDA), Python ``random`` and NumPy global RNG states.

    Encoded with tensors and primitives only, as the checkpoint format requires.
    """
    version, internal, gauss_next = random.getstate()
    bitgen, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"bit_generator": str(bitgen), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore what :func:`capture_rng_state` captured (missing parts are left alone).

    CUDA states are restored for as many devices as both the state and this
    machine have; they are skipped when CUDA is unavailable.
    """
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    py = state.get("python")
    if py is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py.get("gauss_next")))
    npy = state.get("numpy")
    if npy is not None:
        keys = npy["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                             float(npy["cached_gaussian"])))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for index, value in enumerate(list(cuda)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value.to("cpu", torch.uint8), device=index)
