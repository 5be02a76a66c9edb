"""Raw measurements from scan files (k-space, sinograms) in deepinv's layout, for training and reconstruction.

A :class:`~engine.data.scans.Scan` of kind ``"kspace"`` or ``"sinogram"`` becomes a
:class:`Measurements`: the measured ``y`` exactly as the engine's physics
(:func:`engine.physics.build_physics`) produces it, plus the geometry the file
was measured with (MRI sampling mask, CT angles) so that the physics can be
rebuilt for *that* data. Nothing is simulated from images.

Conventions (checked by round trips in ``tests/test_measurements.py``)
=======================================================================

MRI (``deepinv.physics.MRI``)
    ``y`` is ``[N, 2, H, W]`` float: channel 0 the real, channel 1 the imaginary
    part of the **centred, orthonormal** 2-D DFT of the image,
    ``y = M * fftshift(fft2(ifftshift(x), norm="ortho"))``, i.e. exactly fastMRI's
    ``fft2c`` convention (DC at index ``H // 2, W // 2``). So a fastMRI-layout
    ``kspace`` slice ``k`` gives ``y = stack(Re(M k), Im(M k))`` with no rescaling
    or shifting, and :func:`kspace_from_y` is the inverse.

    *Mask.* The file's ``mask`` (``[W]`` columns or ``[H, W]``); without one, the
    non-zero pattern of the k-space. Fully sampled k-space (no zeros, or an
    all-ones mask) is **retrospectively undersampled** with the config's mask
    (``physics.acceleration``, ``mask``, ``center_fraction``, ``mask_seed``),
    and its full inverse FFT is kept as an exact reference image (for
    validation only; self-supervised training never reads it).

    *Size.* k-space larger than ``physics.img_size`` is **centre-cropped in
    k-space** to ``img_size x img_size``: the same field of view sampled on a
    coarser grid (an ideal low-pass downsampling of the image), which keeps
    the data a genuine measurement of the downsampled image. Non-square
    k-space therefore gives anisotropic pixels. Smaller k-space is refused
    (zero-filling would pretend to have measured frequencies that were not).

    *Multi-coil* ``[slices, coils, H, W]`` k-space is combined into one
    virtual coil ("ESPIRiT-lite"): low-resolution coil images from the fully
    sampled centre (ACS region, Hann-windowed) are divided by their
    root-sum-of-squares to give coil maps ``S_c`` (``sum_c |S_c|^2 = 1``), the
    zero-filled coil images are combined as ``x = sum_c conj(S_c) x_c``, and
    ``y = M F x``. For fully sampled data this is exact (``y`` is an exact
    single-coil measurement of the combined image, which is also the
    reference). For undersampled data it is an approximation: the combination
    does not commute with the mask, so aliasing is slightly redistributed
    across the sampled lines (the smoother the coil maps, the smaller).

CT (``deepinv.physics.Tomography``, parallel beam)
    A file sinogram is ``[slices, views, detectors]``: the **unnormalised**
    line integrals of deepinv's Radon transform (``Tomography(normalize=False)``,
    pixel units) at the file's angles (degrees). The engine's operator is
    normalised (``||A|| = 1``), so ``y = sinogram^T / ||R||`` in deepinv's
    ``[N, 1, detectors, views]`` layout; :func:`sinogram_from_y` is the
    inverse. The physics is built with the file's own angle list; their number
    must equal ``physics.views`` and the detector count must equal deepinv's
    for ``physics.img_size`` (:func:`engine.physics.detector_count`), or the
    load is refused with both numbers.

Intensity scale
    Real measurements come in arbitrary units, while the denoiser expects
    images of order one. With ``normalise=True`` (the default) each file's
    ``y`` is divided by the 99.5th percentile of its baseline reconstruction's
    magnitude (zero-filled adjoint / FBP), so images land in about ``[0, 1]``.
    Linear, so measurement consistency is unaffected; the factor is kept in
    :attr:`Measurements.scale`.

Reference images
    Exact ones (fully sampled k-space) as above. Otherwise a file's own
    references (``reconstruction_esc``/``reconstruction_rss`` with the same
    slice shape as the k-space, a sinogram file's ``images``/``reference``) are
    brought to the image grid the same way and their scale fitted to the
    measurements by least squares (``s = <A r, y> / ||A r||^2``); references of
    another field of view (fastMRI's 320 x 320 crops) are ignored with a note.
    Without references, validation reports measurement-domain metrics
    (:func:`measurement_metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from engine.data.loading import load_scan
from engine.data.scans import Scan, display_name
from engine.errors import ConfigError, ScanError

__all__ = [
    "MEASUREMENT_KINDS",
    "Measurements",
    "is_measurement_file",
    "measurements_from_scan",
    "load_measurements",
    "load_measurement_data",
    "measurement_physics",
    "measurement_metrics",
    "kspace_from_y",
    "y_from_kspace",
    "sinogram_from_y",
    "y_from_sinogram",
    "fft2c",
    "ifft2c",
    "coil_combine",
]

MEASUREMENT_KINDS = ("kspace", "sinogram")

#: percentile of the baseline magnitude that ``normalise`` maps to 1
SCALE_PERCENTILE = 99.5


@dataclass
class Measurements:
    """Measured data in the engine's physics layout, with the geometry it was measured with."""

    y: torch.Tensor  #: float32 [N, 2, S, S] (MRI) or [N, 1, detectors, views] (CT)
    modality: str  #: "mri" | "ct"
    mask: Optional[torch.Tensor] = None  #: MRI sampling mask [S, S] float32 (1 = measured)
    angles: Optional[np.ndarray] = None  #: CT projection angles in degrees
    reference: Optional[torch.Tensor] = None  #: [N, C, S, S] in the scale of ``y``, or None
    reference_kind: str = ""  #: "", "fully sampled" or the file's dataset name
    scale: float = 1.0  #: the stored data was divided by this (see ``normalise``)
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


def _centre_crop(arr: torch.Tensor, size: int) -> torch.Tensor:
    h, w = arr.shape[-2:]
    top, left = h // 2 - size // 2, w // 2 - size // 2
    return arr[..., top:top + size, left:left + size]


def _calibration_halfwidth(mask: torch.Tensor) -> int:
    """Half-width of the largest centred square that is fully sampled (the ACS region)."""
    h, w = mask.shape
    ch, cw = h // 2, w // 2
    k = 0
    while k < min(ch, cw) and bool(mask[ch - (k + 1):ch + (k + 1), cw - (k + 1):cw + (k + 1)].all()):
        k += 1
    return k


def coil_combine(kspace: torch.Tensor, calibration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One virtual coil from multi-coil k-space ``[N, C, H, W]`` (ESPIRiT-lite, see the module docstring).

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


def _mask_2d(mask: Optional[np.ndarray], shape) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if m.ndim == 1:
        m = m[None, :].expand(shape[0], -1)
    return (m != 0).to(torch.float32).contiguous()


def _normalise_factor(physics, y: torch.Tensor, name: str) -> float:
    from engine.physics import baseline, to_display

    with torch.no_grad():
        mags = torch.cat([to_display(baseline(physics, chunk)) for chunk in y.split(16)]).numpy()
    scale = float(np.percentile(mags, SCALE_PERCENTILE))
    if not scale > 0:
        scale = float(mags.max())
    if not (scale > 0 and math.isfinite(scale)):
        raise ScanError(f"{name}: the measurements are all zero (nothing to reconstruct)")
    return scale


def _fit_reference_scale(physics, reference: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares ``s`` with ``A (s r) ~ y`` (0 when ``A r`` vanishes)."""
    with torch.no_grad():
        ar = torch.cat([physics.A(chunk) for chunk in reference.split(16)])
    den = float((ar * ar).sum())
    if not den > 0:
        return 0.0
    return float((ar * y).sum()) / den


def _reference_to_grid(ref: np.ndarray, modality: str, size: int, kspace_shape=None) -> Optional[torch.Tensor]:
    """A file's reference images on the engine's image grid (model space), or None if they do not fit."""
    from engine.data.intensity import resize
    from engine.physics import to_model_space

    ref = np.asarray(ref, dtype=np.float32)
    if modality == "mri":
        if kspace_shape is None or tuple(ref.shape[-2:]) != tuple(kspace_shape):
            return None
        k = _centre_crop(fft2c(torch.from_numpy(ref).to(torch.complex64)), size)
        return torch.view_as_real(ifft2c(k)).movedim(-1, 1).to(torch.float32).contiguous()
    h, w = ref.shape[-2:]
    if h != w:
        return None
    if h != size:
        ref = resize(ref, size)
    return to_model_space(torch.from_numpy(np.ascontiguousarray(ref))[:, None], "ct").contiguous()


# -- from a Scan -------------------------------------------------------------------------------


def _owner_phrase(physics_cfg, owner: str) -> str:
    from engine.physics import describe

    return f"{owner} is for {describe(physics_cfg)}"


def _kspace_measurements(scan: Scan, cfg, owner: str, notes: list) -> tuple:
    from engine.physics import sampling_mask

    name = display_name(scan.source or "scan")
    size = int(cfg.img_size)
    kspace = torch.from_numpy(np.ascontiguousarray(scan.kspace, dtype=np.complex64))  # [S, C, H, W]
    s, c, h, w = kspace.shape
    if h < size or w < size:
        raise ScanError(
            f"{name}: k-space slices are {h} x {w}, smaller than the {size} x {size} image grid "
            f"({_owner_phrase(cfg, owner)}); zero-filling would invent unmeasured frequencies")
    if (h, w) != (size, size):
        notes.append(f"{name}: k-space {h} x {w} centre-cropped to {size} x {size} (same field of view, "
                     "lower resolution)")
    mask = _mask_2d(scan.mask, (h, w))
    if mask is None:
        mask = (kspace != 0).any(dim=0).any(dim=0).to(torch.float32)
    fully_sampled = bool(mask.all())
    kspace = _centre_crop(kspace, size).contiguous()
    mask = _centre_crop(mask, size).contiguous()
    if fully_sampled:
        mask = sampling_mask(cfg)[0, 0].to(torch.float32)
        notes.append(f"{name}: fully sampled k-space, retrospectively undersampled with the config's "
                     f"{cfg.acceleration:g}x {cfg.mask} mask")
        calibration = max(8, int(round(cfg.center_fraction * size)))
    else:
        calibration = 2 * _calibration_halfwidth(mask)
    if c > 1:
        if calibration < 4:
            raise ScanError(f"{name}: multi-coil k-space without a fully sampled centre (ACS region); "
                            "coil maps cannot be estimated")
        image, _ = coil_combine(kspace, calibration)
        notes.append(f"{name}: {c} coils combined into one virtual coil (coil maps from a "
                     f"{calibration}-line calibration region)")
    else:
        image = ifft2c(kspace[:, 0])
    y = y_from_kspace(fft2c(image) if c > 1 else kspace[:, 0], mask)
    reference, ref_kind = None, ""
    if fully_sampled:
        reference = torch.view_as_real(image).movedim(-1, 1).to(torch.float32).contiguous()
        ref_kind = "fully sampled"
    elif scan.reference is not None:
        reference = _reference_to_grid(scan.reference, "mri", size, kspace_shape=(h, w))
        ref_kind = scan.metadata.get("Reference", "reference")
        if reference is None:
            notes.append(f"{name}: reference images ({ref_kind}, {scan.reference.shape[-2]} x "
                         f"{scan.reference.shape[-1]}) cover another field of view than the {h} x {w} k-space; "
                         "ignored (validation uses measurement-domain metrics)")
            ref_kind = ""
    return y, mask, None, reference, ref_kind, fully_sampled


def _sinogram_measurements(scan: Scan, cfg, owner: str, notes: list) -> tuple:
    from engine.physics import build_physics, detector_count

    name = display_name(scan.source or "scan")
    sino = np.asarray(scan.sinogram, dtype=np.float32)
    _, views, detectors = sino.shape
    angles = np.asarray(scan.angles if scan.angles is not None
                        else np.linspace(0.0, 180.0, views, endpoint=False), dtype=np.float64).reshape(-1)
    if views != cfg.views:
        raise ScanError(f"{name}: the sinogram has {views} projection angles, but {_owner_phrase(cfg, owner)} "
                        f"(physics.views = {cfg.views})")
    expected = detector_count(cfg.img_size, cfg.circle)
    if detectors != expected:
        where = "inscribed circle" if cfg.circle else "full square"
        raise ScanError(f"{name}: the sinogram has {detectors} detector cells, but deepinv's parallel-beam "
                        f"geometry for {cfg.img_size} x {cfg.img_size} images ({where}) has {expected} "
                        f"({_owner_phrase(cfg, owner)})")
    if angles.shape[0] != views or not np.isfinite(angles).all():
        raise ScanError(f"{name}: the angle list does not fit the sinogram ({angles.shape[0]} angles, {views} views)")
    uniform = np.linspace(0.0, 180.0, views, endpoint=False)
    if not np.allclose(np.mod(angles, 360.0), uniform, atol=1e-3):
        notes.append(f"{name}: projection angles are not the {views} equispaced ones over 180 degrees; "
                     "the physics uses the file's angles")
    physics = build_physics(replace(cfg, noise="none"), angles=angles)
    y = y_from_sinogram(sino, float(physics.operator_norm))
    reference, ref_kind = None, ""
    if scan.reference is not None:
        ref_kind = scan.metadata.get("Reference", "reference")
        reference = _reference_to_grid(scan.reference, "ct", cfg.img_size)
        if reference is not None and reference.shape[0] != y.shape[0]:
            reference = None
        if reference is None:
            notes.append(f"{name}: reference images ({ref_kind}) do not fit the sinogram's slices or the "
                         "square image grid; ignored")
            ref_kind = ""
    return y, None, angles, reference, ref_kind, False


def measurements_from_scan(scan: Scan, physics_cfg, *, normalise: bool = True,
                           owner: str = "the config") -> Measurements:
    """The measurements a k-space / sinogram scan holds, checked against ``physics_cfg``.

    ``owner`` names whose physics is meant in error messages (``"the config"``,
    ``"checkpoint model.pt"``). Raises :class:`ScanError` for image scans and for
    data whose geometry does not fit (modality, size, views, detectors).
    """
    from engine.physics import describe

    name = display_name(scan.source or "scan")
    if scan.kind not in MEASUREMENT_KINDS:
        raise ScanError(f"{name}: holds images, not raw measurements")
    modality = "mri" if scan.kind == "kspace" else "ct"
    if physics_cfg.modality != modality:
        what = "MRI k-space" if modality == "mri" else "a CT sinogram"
        raise ScanError(f"{name}: holds {what}, but {owner} is for {describe(physics_cfg)}")
    notes: list[str] = []
    if modality == "mri":
        y, mask, angles, reference, ref_kind, _ = _kspace_measurements(scan, physics_cfg, owner, notes)
    else:
        y, mask, angles, reference, ref_kind, _ = _sinogram_measurements(scan, physics_cfg, owner, notes)
    if not torch.isfinite(y).all():
        raise ScanError(f"{name}: the measurements contain NaN or Inf values")
    meas = Measurements(y=y, modality=modality, mask=mask, angles=angles, reference=reference,
                        reference_kind=ref_kind, sources=[name] * int(y.shape[0]), notes=notes)
    if modality == "mri":
        rate = float(mask.mean())
        ratio = (1.0 / max(rate, 1e-12)) / physics_cfg.acceleration
        if not 0.67 <= ratio <= 1.5:
            notes.append(f"{name}: the k-space is {1 / max(rate, 1e-12):.2g}x undersampled but {owner} is set "
                         f"for {physics_cfg.acceleration:g}x; the file's own mask is used")
    physics = measurement_physics(replace(physics_cfg, noise="none"), meas)
    if meas.reference is not None and ref_kind != "fully sampled":
        s = _fit_reference_scale(physics, meas.reference, meas.y)
        if s > 0:
            meas.reference = meas.reference * s
        else:
            notes.append(f"{name}: reference images do not correlate with the measurements; ignored")
            meas.reference, meas.reference_kind = None, ""
    if normalise:
        scale = _normalise_factor(physics, meas.y, name)
        meas.y = meas.y / scale
        if meas.reference is not None:
            meas.reference = meas.reference / scale
        meas.scale = scale
    return meas


def load_measurements(path, physics_cfg, *, normalise: bool = True, owner: str = "the config") -> Measurements:
    """:func:`measurements_from_scan` of :func:`~engine.data.loading.load_scan` (path)."""
    return measurements_from_scan(load_scan(path), physics_cfg, normalise=normalise, owner=owner)


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


def _concatenate(parts: list[Measurements]) -> Measurements:
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


def load_measurement_data(data_cfg, physics_cfg) -> Optional[tuple[Measurements, Measurements]]:
    """(train, validation) :class:`Measurements` when ``data.paths`` hold raw measurements, else None.

    Slices of all files are concatenated and split exactly like image files
    (``data.train_slices`` / ``data.val_slices``, see :mod:`engine.data.datasets`).
    Image files mixed with measurement files are refused.
    """
    if data_cfg.source != "files":
        return None
    paths = [str(p) for p in (data_cfg.paths or [])]
    flags = [is_measurement_file(p) for p in paths]
    if not any(flags):
        return None
    if not all(flags):
        images = next(p for p, f in zip(paths, flags) if not f)
        measured = next(p for p, f in zip(paths, flags) if f)
        raise ConfigError(f"data.paths mixes image files ({Path(images).name}) and raw measurement files "
                          f"({Path(measured).name}); train on one kind at a time")
    from engine.data.datasets import split_indices

    data = _concatenate([load_measurements(p, physics_cfg) for p in paths])
    train_idx, val_idx = split_indices(len(data), data_cfg)
    return data.select(train_idx), data.select(val_idx)


# -- physics and metrics ------------------------------------------------------------------------


def measurement_physics(physics_cfg, meas: Measurements, device="cpu", dtype=torch.float32,
                        rng: Optional[torch.Generator] = None):
    """The config's physics with the data's own sampling mask (MRI) or angle list (CT)."""
    from engine.physics import build_physics

    if meas.modality == "mri":
        mask = meas.mask[None, None].expand(1, 2, -1, -1).contiguous()
        return build_physics(physics_cfg, device, dtype, rng=rng, mask=mask.to(device))
    return build_physics(physics_cfg, device, dtype, rng=rng, angles=meas.angles)


@torch.no_grad()
def measurement_metrics(physics, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (PSNR in dB of ``A x`` against ``y``, relative residual ``||A x - y|| / ||y||``).

    The PSNR's peak is ``max |y|`` and its MSE runs over the measured entries
    only (the sampled k-space locations for MRI). These measure consistency
    with the data, not image quality: the zero-filled MRI baseline is
    consistent by construction and scores the clamp value (200 dB).
    """
    ax = physics.A(x)
    diff = (ax - y).flatten(1)
    yf = y.flatten(1)
    mask = getattr(physics, "mask", None)
    if isinstance(mask, torch.Tensor) and mask.shape[-2:] == y.shape[-2:]:
        count = (mask.expand_as(y[:1]).flatten(1) != 0).sum().clamp_min(1).to(y.dtype)
    else:
        count = torch.tensor(float(yf.shape[1]), dtype=y.dtype, device=y.device)
    mse = (diff ** 2).sum(1) / count
    peak = yf.abs().amax(1)
    psnr = 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-20 * peak.clamp_min(1e-30) ** 2)).clamp(max=200.0)
    residual = diff.norm(dim=1) / yf.norm(dim=1).clamp_min(1e-30)
    return psnr, residual
