"""The equivariance panel's data: which angle is wanted / in flight, the last probe,
the error-vs-angle curve. Qt-free. :func:`probe_images` is the only place in the
workbench that reads an engine equivariance result.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

PROBE_IMAGES = ("rotated_reconstruction", "reconstruction_of_rotated", "difference")


def probe_images(result) -> tuple[dict[str, Optional[np.ndarray]], float]:
    """The 2D display arrays of an ``engine.evaluation.EquivarianceProbe`` by name, and its error."""
    images = {}
    for key in PROBE_IMAGES:
        img = getattr(result, key)
        if img is not None:
            img = np.asarray(img, dtype=np.float32)
            while img.ndim > 2:
                img = img[0]
        images[key] = img
    return images, float(result.error)


class EquivarianceModel:
    """One request in flight at a time; the newest wanted angle wins."""

    def __init__(self) -> None:
        self.wanted: Optional[float] = None
        self.in_flight: Optional[float] = None
        self.result: Any = None  # the last probe shown
        self.result_angle: Optional[float] = None
        self.curve: Optional[tuple] = None
        self.curve_in_flight = False

    def want(self, angle: float) -> Optional[float]:
        """Record the wanted angle; returns the angle to compute now, or None if busy."""
        self.wanted = float(angle)
        if self.in_flight is None:
            self.in_flight = self.wanted
            return self.in_flight
        return None

    def done(self, angle: float, result: Any) -> Optional[float]:
        """Store a result; returns the next angle to compute if the wish changed meanwhile."""
        self.in_flight = None
        if result is not None:
            self.result, self.result_angle = result, float(angle)
        if self.wanted is not None and self.wanted != angle and result is not None:
            self.in_flight = self.wanted
            return self.in_flight
        return None

    def clear_results(self) -> None:
        self.result = self.result_angle = None
        self.curve = None
