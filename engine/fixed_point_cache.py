"""Each training image's last fixed point, to start its next solve from (``loss.reuse_fixed_points``).

The measurements of a training image do not change between the steps that draw
it, and the weights move little between them (learning rates of 1e-5 to 1e-4),
so the fixed point it reached last time is near its new one: a solve started
there needs fewer iterations than one started at ``A^dagger y``. The fixed point
and the implicit (or JFB) gradient do not depend on the start; an unrolled
network's output does, so :class:`~engine.losses.TrainingLoss` ignores the start
there. Kept in memory for the run (one image per training sample, on the
training device), not in checkpoints: a resumed run starts cold.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class FixedPointCache:
    """The last fixed point of each training sample, by dataset index."""

    def __init__(self) -> None:
        self._points: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._points)

    def start(self, indices: torch.Tensor, initial: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        """The batch's starting iterates: the cached fixed points, ``initial()`` for the rest; None if none cached."""
        rows = [(row, int(i)) for row, i in enumerate(indices.tolist()) if int(i) in self._points]
        if not rows:
            return None
        x0 = initial().clone()
        for row, i in rows:
            x0[row] = self._points[i]
        return x0

    def store(self, indices: torch.Tensor, fixed_points: torch.Tensor) -> None:
        """Keep ``fixed_points[row]`` as the start of sample ``indices[row]``'s next solve."""
        for row, i in enumerate(indices.tolist()):
            self._points[int(i)] = fixed_points[row].detach().clone()
