"""Raw measurements (k-space, sinograms) as arrays and metadata: the :class:`Measurements` container and its layouts.

This module owns what measured data *is* -- the measured ``y`` in deepinv's
layout and the geometry it was measured with (MRI sampling mask, CT angles),
plus the exact conversions between file layouts and ``y`` and the k-space
tools (centred FFT, centre crop, coil combination). It builds no operator:
:mod:`engine.measured` reads scans into :class:`Measurements` against a physics
config, builds the operator for a Measurements' own geometry and measures
consistency with it. The data layer therefore never imports
:mod:`engine.physics`.

Layouts (checked by round trips in ``tests/test_measurements.py``)
==================================================================

MRI (``deepinv.physics.MRI``)
    ``y`` is ``[N, 2, H, W]`` float: channel 0 the real, channel 1 the imaginary
    part of the **centred, orthonormal** 2-D DFT of the image,
    ``y = M * fftshift(fft2(ifftshift(x), norm="ortho"))``, i.e. exactly fastMRI's
    ``fft2c`` convention (DC at index ``H // 2, W // 2``). So a fastMRI-layout
    ``kspace`` slice ``k`` gives ``y = stack(Re(M k), Im(M k))`` with no rescaling
    or shifting, and :func:`kspace_from_y` is the inverse.

CT (``deepinv.physics.Tomography``, parallel beam)
    A file sinogram is ``[slices, views, detectors]``: the **unnormalised**
    line integrals of deepinv's Radon transform (``Tomography(normalize=False)``,
    pixel units) at the file's angles (degrees). The engine's operator is
    normalised (``||A|| = 1``), so ``y = sinogram^T / ||R||`` in deepinv's
    ``[N, 1, detectors, views]`` layout (:func:`y_from_sinogram`);
    :func:`sinogram_from_y` is the inverse.

Multi-coil k-space ``[slices, coils, H, W]`` is combined into one virtual coil
by :func:`coil_combine` (ESPIRiT-lite; see its docstring and :mod:`engine.measured`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from engine.data.intensity import resize
from engine.errors import ScanError

__all__ = [
    "MEASUREMENT_KINDS",
    "Measurements",
    "is_measurement_file",
    "concatenate_measurements",
    "kspace_from_y",
    "y_from_kspace",
    "sinogram_from_y",
    "y_from_sinogram",
    "fft2c",
    "ifft2c",
    "centre_crop",
    "calibration_halfwidth",
    "coil_combine",
    "mask_2d",
    "reference_to_grid",
]

MEASUREMENT_KINDS = ("kspace", "sinogram")


@dataclass
class Measurements:
    """Measured data in the engine's physics layout, with the geometry it was measured with."""

    y: torch.Tensor  #: float32 [N, 2, S, S] (MRI) or [N, 1, detectors, views] (CT)
    modality: str  #: "mri" | "ct"
    mask: Optional[torch.Tensor] = None  #: MRI sampling mask [S, S] float32 (1 = measured)
    angles: Optional[np.ndarray] = None  #: CT projection angles in degrees
    reference: Optional[torch.Tensor] = None  #: [N, C, S, S] in the scale of ``y``, or None
    reference_kind: str = ""  #: "", "fully sampled" or the file's dataset name
    scale: float = 1.0  #: the stored data was divided by this (see ``normalise`` in :mod:`engine.measured`)
    sources: list = field(default_factory=list)  #: file names, one per slice
    notes: list = field(default_factory=list)  #: things worth telling the user (one line each)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def source(self) -> str:
        names = list(dict.fromkeys(self.sources))
        return ", ".join(names) if names else "measurements"

    def select(self, indices: Sequence[int]) -> "Measurements":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return replace(self, y=self.y[idx], reference=None if self.reference is None else self.reference[idx],
                       sources=[self.sources[i] for i in idx.tolist()] if self.sources else [],
                       notes=list(self.notes))

    def describe(self) -> str:
        if self.modality == "mri":
            rate = float(self.mask.mean()) if self.mask is not None else 1.0
            geo = f"k-space sampling {rate:.3f} (acceleration {1 / max(rate, 1e-12):.2g}x)"
        else:
            geo = f"{len(self.angles)} projection angles"
        return f"{len(self)} measured slice(s) from {self.source}: {geo}"


# -- layout conversions -----------------------------------------------------------------------


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D DFT over the last two axes (deepinv's and fastMRI's convention)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def y_from_kspace(kspace, mask=None) -> torch.Tensor:
    """Complex k-space ``[N, H, W]`` (times ``mask`` ``[H, W]``) -> deepinv MRI ``y`` ``[N, 2, H, W]`` float32."""
    k = torch.as_tensor(np.asarray(kspace)) if not isinstance(kspace, torch.Tensor) else kspace
    k = k.to(torch.complex64)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(torch.float32)
        k = k * m
    return torch.view_as_real(k).movedim(-1, 1).contiguous()


def kspace_from_y(y: torch.Tensor) -> np.ndarray:
    """deepinv MRI ``y`` ``[N, 2, H, W]`` -> complex64 fastMRI-style k-space ``[N, H, W]``."""
    y = y.detach().to("cpu", torch.float32)
    return torch.view_as_complex(y.movedim(1, -1).contiguous()).numpy().astype(np.complex64)


def y_from_sinogram(sinogram, operator_norm: float) -> torch.Tensor:
    """File sinogram ``[N, views, detectors]`` (unnormalised) -> deepinv ``y`` ``[N, 1, detectors, views]``."""
    s = torch.as_tensor(np.ascontiguousarray(sinogram, dtype=np.float32))
    return (s.transpose(-1, -2)[:, None] / float(operator_norm)).contiguous()


def sinogram_from_y(y: torch.Tensor, operator_norm: float) -> np.ndarray:
    """deepinv CT ``y`` ``[N, 1, detectors, views]`` -> unnormalised file sinogram ``[N, views, detectors]``."""
    y = y.detach().to("cpu", torch.float32)
    return (y[:, 0].transpose(-1, -2) * float(operator_norm)).contiguous().numpy()


# -- k-space helpers ---------------------------------------------------------------------------


def centre_crop(arr: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size x size`` window of the last two axes (k-space: same field of view, coarser grid)."""
    h, w = arr.shape[-2:]
    top, left = h // 2 - size // 2, w // 2 - size // 2
    return arr[..., top:top + size, left:left + size]


def calibration_halfwidth(mask: torch.Tensor) -> int:
    """Half-width of the largest centred square that is fully sampled (the ACS region)."""
    h, w = mask.shape
    ch, cw = h // 2, w // 2
    k = 0
    while k < min(ch, cw) and bool(mask[ch - (k + 1):ch + (k + 1), cw - (k + 1):cw + (k + 1)].all()):
        k += 1
    return k


def coil_combine(kspace: torch.Tensor, calibration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One virtual coil from multi-coil k-space ``[N, C, H, W]`` (ESPIRiT-lite, see :mod:`engine.measured`).

    ``calibration`` is the width of the fully sampled centre used for the coil
    maps. Returns (combined image ``[N, H, W]`` complex, coil maps ``[N, C, H, W]``).
    """
    n, c, h, w = kspace.shape
    width = max(2, min(int(calibration), h, w))
    win_h = torch.zeros(h)
    win_w = torch.zeros(w)
    hann = torch.hann_window(width + 2, periodic=False)[1:-1]
    win_h[h // 2 - width // 2:h // 2 - width // 2 + width] = hann
    win_w[w // 2 - width // 2:w // 2 - width // 2 + width] = hann
    low = ifft2c(kspace * (win_h[:, None] * win_w[None, :]).to(kspace.dtype))
    rss = low.abs().pow(2).sum(1, keepdim=True).sqrt()
    floor = rss.flatten(1).amax(1).clamp_min(1e-30)[:, None, None, None] * 1e-3
    maps = low / torch.maximum(rss, floor)
    combined = (maps.conj() * ifft2c(kspace)).sum(1)
    return combined, maps


def mask_2d(mask: Optional[np.ndarray], shape) -> Optional[torch.Tensor]:
    """A file's sampling mask (``[W]`` columns or ``[H, W]``) as a float32 0/1 ``[H, W]`` mask (None stays None)."""
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if m.ndim == 1:
        m = m[None, :].expand(shape[0], -1)
    return (m != 0).to(torch.float32).contiguous()


def reference_to_grid(ref: np.ndarray, modality: str, size: int, kspace_shape=None) -> Optional[torch.Tensor]:
    """A file's reference images on the engine's image grid (model space), or None if they do not fit."""
    ref = np.asarray(ref, dtype=np.float32)
    if modality == "mri":
        if kspace_shape is None or tuple(ref.shape[-2:]) != tuple(kspace_shape):
            return None
        k = centre_crop(fft2c(torch.from_numpy(ref).to(torch.complex64)), size)
        return torch.view_as_real(ifft2c(k)).movedim(-1, 1).to(torch.float32).contiguous()
    h, w = ref.shape[-2:]
    if h != w:
        return None
    if h != size:
        ref = resize(ref, size)
    return torch.from_numpy(np.ascontiguousarray(ref))[:, None].contiguous()  # CT model space: one real channel


# -- files ---------------------------------------------------------------------------------------


def is_measurement_file(path) -> bool:
    """Whether ``path`` holds raw measurements (k-space / sinogram), from its header only.

    Never raises: an unreadable file answers False and is left to
    :func:`~engine.data.loading.load_scan` to report.
    """
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            import h5py

            with h5py.File(p, "r") as f:
                return "kspace" in f or "sinogram" in f
        if head.startswith(b"PK\x03\x04") and p.suffix.lower() == ".npz":
            import zipfile

            with zipfile.ZipFile(p) as zf:
                names = {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
            return "kspace" in names or "sinogram" in names
        if head.startswith(b"\x93NUMPY"):
            with open(p, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                _, _, dtype = np.lib.format._read_array_header(fh, version)
            return dtype.kind == "c"
    except Exception:
        return False
    return False


def concatenate_measurements(parts: list[Measurements]) -> Measurements:
    """One :class:`Measurements` of several files' slices; refused (ScanError) unless they share one geometry."""
    first = parts[0]
    for other in parts[1:]:
        if first.modality == "mri" and not torch.equal(first.mask, other.mask):
            raise ScanError(f"{other.source}: its k-space sampling mask differs from that of {first.source}; "
                            "train on files with one mask at a time")
        if first.modality == "ct" and not np.allclose(first.angles, other.angles, atol=1e-6):
            raise ScanError(f"{other.source}: its projection angles differ from those of {first.source}; "
                            "train on files with one geometry at a time")
    with_ref = [p.reference is not None for p in parts]
    reference = torch.cat([p.reference for p in parts]) if all(with_ref) else None
    notes = [n for p in parts for n in p.notes]
    if any(with_ref) and not all(with_ref):
        notes.append("only some files carry reference images; validation uses measurement-domain metrics")
    return Measurements(
        y=torch.cat([p.y for p in parts]), modality=first.modality, mask=first.mask, angles=first.angles,
        reference=reference, reference_kind=first.reference_kind if reference is not None else "",
        scale=first.scale, sources=[s for p in parts for s in p.sources], notes=notes)
