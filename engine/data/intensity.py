"""Intensity mapping and resampling: from loaded scans to network-ready ``[0, 1]`` slices.

:func:`prepare_slices` is the single path from a :class:`~engine.data.scans.Scan`
to a float32 ``[N, size, size]`` stack in ``[0, 1]``:

1. **Intensity.** CT in Hounsfield units is windowed linearly to ``[0, 1]``
   (values outside the window are clipped). Without an explicit window the
   automatic :data:`AUTO_CT_WINDOW` ``(-1000, 1500)`` HU is used: air maps to 0,
   so the mapping stays proportional to the linear attenuation (what the Radon
   transform models), and everything up to dense cortical bone stays
   unclipped. Every other scan (MRI magnitude, unknown units) is divided by its
   per-volume robust maximum (99.5th percentile of the magnitude), see
   :func:`normalise_magnitude`; real data with negative values is first shifted
   by its robust minimum.
2. **Square.** Non-square slices are zero-padded (default) or centre-cropped to
   a square, see :func:`to_square`.
3. **Resize** with antialiasing to ``size x size`` (:func:`resize`).

Back to physical units: a reconstruction of a CT scan in HU is a ``[0, 1]``
image on the same scale, so :func:`to_hu` maps it back through the window that
:func:`prepare_slices` used (:func:`scan_hu_window` names it; None for scans not
in HU, whose ``[0, 1]`` scale is relative) and :func:`from_hu` maps HU values
onto that scale. :func:`native_size` is the side of a scan's slices after
step 2, the size a reconstruction "at the scan's own resolution" has.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from engine.errors import ConfigError, ScanError

__all__ = [
    "CT_WINDOWS",
    "UNIT_WINDOWS",
    "AUTO_CT_WINDOW",
    "window",
    "resolve_window",
    "window_bounds",
    "normalise_magnitude",
    "to_square",
    "resize",
    "prepare_slices",
    "native_size",
    "resampled_grid",
    "scan_hu_window",
    "to_hu",
    "from_hu",
]

#: CT display windows as (low, high) HU.
CT_WINDOWS = {
    "soft tissue": (-160.0, 240.0),
    "bone": (-450.0, 1050.0),
    "lung": (-1350.0, 150.0),
    "brain": (0.0, 80.0),
}

#: The same presets for images already in ``[0, 1]`` that are not in HU (phantoms, MR magnitude):
#: display ranges chosen by eye, one per name of :data:`CT_WINDOWS` (the GUI's level presets).
UNIT_WINDOWS = {
    "soft tissue": (0.10, 0.60),
    "bone": (0.30, 1.00),
    "lung": (0.00, 0.35),
    "brain": (0.15, 0.45),
}

#: The window prepare_slices uses for HU data when none is given.
AUTO_CT_WINDOW = (-1000.0, 1500.0)

WindowSpec = Union[None, str, Sequence[float]]


def resolve_window(spec: WindowSpec) -> tuple[float, float]:
    """(low, high) HU from a preset name, a 2-sequence, or None/empty (-> :data:`AUTO_CT_WINDOW`)."""
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        return AUTO_CT_WINDOW
    if isinstance(spec, str):
        key = spec.strip().lower().replace("_", " ")
        if key in ("auto", ""):
            return AUTO_CT_WINDOW
        if key not in CT_WINDOWS:
            raise ConfigError(f"unknown CT window '{spec}' (presets: {', '.join(CT_WINDOWS)}, or [low, high])")
        return CT_WINDOWS[key]
    return window_bounds(spec, "CT window (HU)")


def window_bounds(spec, what: str, error: type[Exception] = ConfigError) -> tuple[float, float]:
    """``(low, high)`` as floats from a 2-sequence; ``error`` naming ``what`` unless both are finite and ``low < high``.

    The one check of an explicit display / intensity window (the CT window here,
    an export's window in :mod:`engine.export`).
    """
    try:
        low, high = (float(v) for v in spec)
    except (TypeError, ValueError):
        raise error(f"{what} must be (low, high), got {spec!r}") from None
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        raise error(f"{what} must have finite low < high, got ({low:g}, {high:g})")
    return low, high


def window(images_hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` HU linearly to ``[0, 1]`` and clip; float32."""
    low, high = resolve_window((low, high))
    x = np.asarray(images_hu, dtype=np.float32)
    return np.clip((x - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


_apply_window = window  # prepare_slices' ``window`` argument shadows the function


def to_hu(values, window: WindowSpec) -> np.ndarray:
    """``[0, 1]`` values (a reconstruction, a displayed level) -> HU through ``window``, the one that made them.

    The inverse of :func:`window` without its clipping: ``0`` is the window's low
    end, ``1`` its high end, values outside ``[0, 1]`` map linearly beyond them.
    ``window`` as :func:`resolve_window` takes it (``(low, high)`` HU, a preset
    name, or None for :data:`AUTO_CT_WINDOW`). Float arrays keep their dtype
    (float32 stays float32); anything else comes back as float64.
    """
    low, high = resolve_window(window)
    x = np.asarray(values)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    return x * x.dtype.type(high - low) + x.dtype.type(low)


def from_hu(hu, window: WindowSpec) -> np.ndarray:
    """HU -> the ``[0, 1]`` scale of ``window`` (no clipping): the inverse of :func:`to_hu`."""
    low, high = resolve_window(window)
    x = np.asarray(hu)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    return (x - x.dtype.type(low)) / x.dtype.type(high - low)


def scan_hu_window(scan, window: WindowSpec = None) -> Optional[tuple[float, float]]:
    """The (low, high) HU that :func:`prepare_slices` maps ``scan`` onto ``[0, 1]`` with; None when not in HU.

    Scans in other units are scaled per volume (:func:`normalise_magnitude`):
    their ``[0, 1]`` values have no physical unit to go back to.
    """
    if getattr(scan, "units", "") != "HU":
        return None
    return resolve_window(window)


def native_size(scan, square: str = "pad") -> int:
    """The side of ``scan``'s image slices once squared as :func:`prepare_slices` squares them.

    The longer side when padding (the default), the shorter when cropping. Scans
    of raw measurements count their reference images; without any, the size
    is the measurement's to decide (:func:`engine.measured.measured_image_size`),
    and this raises ScanError.
    """
    images = _image_slices(scan)
    rows, cols = (int(s) for s in np.shape(images)[-2:])
    if square == "crop":
        return min(rows, cols)
    if square != "pad":
        raise ConfigError(f"square mode must be 'pad' or 'crop', got {square!r}")
    return max(rows, cols)


def resampled_grid(slice_shape, size: int, square: str = "pad") -> tuple[float, float, float]:
    """Where :func:`prepare_slices` puts its output pixels in a source slice: ``(row0, col0, step)``.

    Output pixel ``(i, j)`` of a ``size x size`` slice made from a ``slice_shape``
    ``(H, W)`` slice has its centre at source pixel coordinates ``(row0 + i * step,
    col0 + j * step)`` (pixel centres at integers): the slice is squared (padded or
    cropped about its centre, :func:`to_square`) to side ``S``, then resampled with
    pixel edges aligned (:func:`resize`), so ``step = S / size``. With the source's
    pixel spacing and position this gives the output's (see :mod:`engine.export`).
    """
    rows, cols = (int(s) for s in slice_shape)
    side = max(rows, cols) if square == "pad" else min(rows, cols)
    if square not in ("pad", "crop"):
        raise ConfigError(f"square mode must be 'pad' or 'crop', got {square!r}")
    step = side / int(size)
    # padding puts the source at (top, left) of the square; cropping takes the square from there
    top, left = (side - rows) // 2, (side - cols) // 2
    if square == "crop":
        top, left = -((rows - side) // 2), -((cols - side) // 2)
    first = 0.5 * step - 0.5  # centre of output pixel 0 in the squared slice's pixel coordinates
    return first - top, first - left, step


def _image_slices(scan) -> np.ndarray:
    """The image slices of a Scan: its images, or its reference images for raw measurements."""
    if scan.kind == "image" and scan.images is not None:
        return scan.images
    if scan.reference is not None:
        return scan.reference
    raise ScanError(
        f"{scan.source or 'scan'}: holds {scan.kind} measurements without reference images; "
        "image slices are needed here"
    )


def normalise_magnitude(images: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Per-volume robust normalisation to ``[0, 1]``.

    Complex input -> magnitude. Real input with negative values is shifted by
    its ``100 - percentile`` percentile first. The ``percentile`` value then maps
    to 1 (clipped above); falls back to the maximum when that percentile is 0
    (mostly-empty volumes), and returns zeros for an all-zero volume.
    """
    x = np.asarray(images)
    if np.iscomplexobj(x):
        x = np.abs(x)
    x = x.astype(np.float32)
    if x.size == 0:
        return x
    if x.min() < 0:
        x = x - np.float32(np.percentile(x, 100.0 - percentile))
        x = np.maximum(x, 0.0)
    scale = float(np.percentile(x, percentile))
    if scale <= 0:
        scale = float(x.max())
    if scale <= 0:
        return np.zeros_like(x)
    return np.clip(x / np.float32(scale), 0.0, 1.0).astype(np.float32)


def to_square(images: np.ndarray, mode: str = "pad", fill: float = 0.0) -> np.ndarray:
    """Make ``[..., H, W]`` square: zero-pad the short side (``"pad"``) or centre-crop the long one."""
    x = np.asarray(images)
    h, w = x.shape[-2:]
    if h == w:
        return x
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return x[..., top:top + s, left:left + s]
    if mode != "pad":
        raise ConfigError(f"square mode must be 'pad' or 'crop', got {mode!r}")
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(top, s - h - top), (left, s - w - left)]
    return np.pad(x, pad, mode="constant", constant_values=fill)


def resize(images: np.ndarray, size) -> np.ndarray:
    """Antialiased bilinear resize of ``[H, W]`` or ``[N, H, W]`` to ``size`` (int or (h, w)); float32."""
    import torch
    import torch.nn.functional as F

    x = np.asarray(images, dtype=np.float32)
    out_hw = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ValueError(f"resize size must be a positive int or (h, w), got {size!r}")
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"resize expects [H, W] or [N, H, W], got shape {x.shape}")
    if tuple(x.shape[-2:]) == out_hw:
        out = x.copy()
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
        with torch.no_grad():
            if out_hw[0] <= x.shape[1] and out_hw[1] <= x.shape[2] and x.shape[1] % out_hw[0] == 0 \
                    and x.shape[2] % out_hw[1] == 0:
                r = F.interpolate(t, size=out_hw, mode="area")  # exact block mean for integer factors
            else:
                r = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
        out = r[:, 0].numpy()
    return out[0] if squeeze else out


def prepare_slices(scan, size: int, window: WindowSpec = None, square: str = "pad") -> np.ndarray:
    """A Scan's image slices as float32 ``[N, size, size]`` in ``[0, 1]`` (see module docstring).

    ``window``: CT window as a preset name (:data:`CT_WINDOWS`), ``(low, high)``
    HU, or None for :data:`AUTO_CT_WINDOW`; ignored for data not in HU.
    k-space and sinogram scans are accepted only when they carry reference
    images (e.g. fastMRI ``reconstruction_rss``), which are then used.
    Raises ScanError when every slice is constant.
    """
    x = np.asarray(_image_slices(scan), dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.size == 0:
        raise ScanError(f"{scan.source or 'scan'}: expected image slices [N, H, W], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ScanError(f"{scan.source or 'scan'}: image data contains NaN or Inf values")
    flat = x.reshape(x.shape[0], -1)
    if np.all(flat.max(axis=1) == flat.min(axis=1)):
        raise ScanError(f"{scan.source or 'scan'}: every slice is constant (no image content)")
    if scan.units == "HU":
        low, high = resolve_window(window)
        x = _apply_window(x, low, high)
    else:
        x = normalise_magnitude(x)
    x = to_square(x, mode=square, fill=0.0)
    x = resize(x, size)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
