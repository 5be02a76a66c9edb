"""What the image viewer computes, without Qt: window/level in display units and in HU,
drag-to-window, wheel steps and the pixel readout.

Images are displayed on the model's [0, 1] scale; for a CT scan in Hounsfield
units ``hu_window`` is the (low, high) HU that prepare_slices mapped to [0, 1],
and the engine converts between the two (``backend.to_hu``). Conventions are 3D
Slicer's: dragging right widens the window, dragging up raises the level (the
image gets darker), the wheel moves through slices and Ctrl + wheel zooms.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from workbench import backend

#: the narrowest window a drag can make, as a fraction of the [0, 1] display range
MIN_WIDTH = 1e-3
#: dragging across half the view's width doubles (or halves) the window's width
DOUBLING_FRACTION = 0.5
#: dragging across the view's height moves the level by this many widths (at least of MIN_LEVEL_SCALE)
LEVEL_WIDTHS = 2.0
MIN_LEVEL_SCALE = 0.02
#: one notch of a mouse wheel (Qt's angle delta, eighths of a degree)
WHEEL_NOTCH = 120
#: views whose pixels are images on the [0, 1] scale (the others: sinogram, |difference|)
IMAGE_VIEWS = ("scan", "baseline", "reconstruction", "reference")


def center_width(levels: tuple[float, float]) -> tuple[float, float]:
    low, high = float(levels[0]), float(levels[1])
    return (low + high) / 2.0, high - low


def levels_from(center: float, width: float) -> tuple[float, float]:
    width = max(float(width), MIN_WIDTH)
    return float(center) - width / 2.0, float(center) + width / 2.0


def dragged_levels(start: tuple[float, float], dx_px: float, dy_px: float,
                   view_px: tuple[float, float]) -> tuple[float, float]:
    """The levels after dragging ``(dx_px, dy_px)`` screen pixels from where the drag started (``start``).

    Horizontal: the width, right = wider, by a factor (half the view's width doubles it), so a narrow brain
    window is as easy to adjust as a wide bone one; vertical: the level, up = higher (screen y grows
    downwards), :data:`LEVEL_WIDTHS` widths over the view's height. ``view_px``: the view's (width, height).
    """
    center, width = center_width(start)
    w_px, h_px = max(1.0, float(view_px[0])), max(1.0, float(view_px[1]))
    new_width = width * 2.0 ** (dx_px / (w_px * DOUBLING_FRACTION))
    new_center = center - dy_px / h_px * LEVEL_WIDTHS * max(width, MIN_LEVEL_SCALE)
    return levels_from(new_center, new_width)


def window_text(levels: tuple[float, float], hu_window: Optional[tuple] = None) -> str:
    """The window as a radiologist reads it: level / width in HU for CT in HU, else the display range."""
    low, high = float(levels[0]), float(levels[1])
    if hu_window is None:
        return f"window [{low:.3g}, {high:.3g}]"
    hu_low, hu_high = (float(v) for v in backend.to_hu(np.array([low, high], dtype=np.float64), hu_window))
    return (f"window L {(hu_low + hu_high) / 2:.0f} / W {hu_high - hu_low:.0f} HU "
            f"([{hu_low:.0f}, {hu_high:.0f}] HU)")


def value_text(view: str, value: float, hu_window: Optional[tuple] = None) -> str:
    """A pixel's value as shown under the cursor: HU for CT images in HU, a HU difference for
    |DEQ - truth|, the plain value otherwise (measurements, images without HU)."""
    if not np.isfinite(value):
        return "value n/a"
    if hu_window is not None and view in IMAGE_VIEWS:
        return f"{float(backend.to_hu(np.float64(value), hu_window)):.0f} HU"
    if hu_window is not None and view == "difference":
        zero, one = (float(v) for v in backend.to_hu(np.array([0.0, float(value)]), hu_window))
        return f"\u0394 {one - zero:.0f} HU"
    return f"value {float(value):.4g}"


def pixel_at(image: Optional[np.ndarray], x: float, y: float) -> Optional[tuple[int, int, float]]:
    """(row, col, value) of the pixel at image coordinates (x = column, y = row), or None outside."""
    if image is None or image.ndim != 2:
        return None
    row, col = int(np.floor(y)), int(np.floor(x))
    if not (0 <= row < image.shape[0] and 0 <= col < image.shape[1]):
        return None
    return row, col, float(image[row, col])


def readout(view: str, title: str, image: Optional[np.ndarray], x: float, y: float,
            hu_window: Optional[tuple] = None) -> str:
    """The readout line for the cursor at (x, y) in ``view``'s image; "" outside the image."""
    hit = pixel_at(image, x, y)
    if hit is None:
        return ""
    row, col, value = hit
    return f"{title}: row {row}, col {col} \u00b7 {value_text(view, value, hu_window)}"


class WheelSteps:
    """Turns wheel angle deltas into whole slice steps (high-resolution wheels send fractions of a notch)."""

    def __init__(self) -> None:
        self.pending = 0.0

    def add(self, angle_delta: float) -> int:
        self.pending += float(angle_delta)
        steps = int(self.pending / WHEEL_NOTCH)
        self.pending -= steps * WHEEL_NOTCH
        return steps
