"""Raw measurements meet their physics: scans read into :class:`~engine.data.measurements.Measurements`.

:mod:`engine.data.measurements` holds measured data as arrays and metadata; this
module is where they meet an operator (it sits above both :mod:`engine.data` and
:mod:`engine.physics`):

* :func:`measurements_from_scan` / :func:`load_measurements` /
  :func:`load_measurement_data` -- a k-space or sinogram scan as the measured
  ``y`` exactly as the engine's physics (:func:`engine.physics.build_physics`)
  produces it, checked against a physics config, with the geometry the file was
  measured with so that the physics can be rebuilt for *that* data. Nothing is
  simulated from images.
* :func:`measurement_physics` -- the config's operator on a Measurements' own
  sampling mask (MRI) or angle list (CT).
* :func:`measurement_metrics` -- consistency ``A x`` against ``y`` when there is
  no reference image.

The layouts of ``y`` are in :mod:`engine.data.measurements`; the rules applied
when reading a scan (checked in ``tests/test_measurements.py``):

MRI
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

CT
    The physics is built with the file's own angle list; their number must
    equal ``physics.views`` and the detector count must equal deepinv's for
    ``physics.img_size`` (:func:`engine.physics.detector_count`), or the load is
    refused with both numbers. ``y`` is the file's sinogram divided by that
    operator's norm (:func:`~engine.data.measurements.y_from_sinogram`).

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
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.data.datasets import split_indices
from engine.data.loading import load_scan
from engine.data.measurements import (
    MEASUREMENT_KINDS,
    Measurements,
    calibration_halfwidth,
    centre_crop,
    coil_combine,
    concatenate_measurements,
    fft2c,
    ifft2c,
    is_measurement_file,
    mask_2d,
    reference_to_grid,
    y_from_kspace,
    y_from_sinogram,
)
from engine.data.scans import Scan, display_name
from engine.errors import ConfigError, ScanError
from engine.physics import baseline, build_physics, describe, detector_count, sampling_mask, to_display

__all__ = [
    "SCALE_PERCENTILE",
    "check_measurement_kind",
    "measured_image_size",
    "measurements_from_scan",
    "load_measurements",
    "load_measurement_data",
    "measurement_physics",
    "measurement_metrics",
]

#: percentile of the baseline magnitude that ``normalise`` maps to 1
SCALE_PERCENTILE = 99.5


# -- the operator of a Measurements, and consistency with it -------------------------------------


def measurement_physics(physics_cfg, meas: Measurements, device="cpu", dtype=torch.float32,
                        rng: Optional[torch.Generator] = None):
    """The config's physics with the data's own sampling mask (MRI) or angle list (CT)."""
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


def _normalise_factor(physics, y: torch.Tensor, name: str) -> float:
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


# -- the image size measurements allow --------------------------------------------------------


def measured_image_size(scan: Scan, physics_cfg, requested: Optional[int] = None,
                        option: str = "--size") -> int:
    """The image side a k-space / sinogram scan is reconstructed at: its own, or ``requested`` if it allows.

    Measurements fix the image grid. A sinogram's detector count is deepinv's for
    exactly one image size (:func:`~engine.physics.detector_count`), so that size
    is the only one. k-space can be centre-cropped to any smaller square grid
    (the same field of view, coarser), never enlarged (that would invent
    unmeasured frequencies): its own size is ``min(H, W)``. A ``requested`` size
    the data do not allow raises ScanError naming ``option`` and why.
    """
    name = display_name(scan.source or "scan")
    if scan.kind == "sinogram":
        detectors = int(np.shape(scan.sinogram)[-1])
        own = next((n for n in range(max(1, detectors // 2), detectors + 1)
                    if detector_count(n, physics_cfg.circle) == detectors), None)
        if own is None:
            raise ScanError(f"{name}: {detectors} detector cells fit no image size of deepinv's parallel-beam "
                            f"geometry ({'inscribed circle' if physics_cfg.circle else 'full square'})")
        if requested is not None and int(requested) != own:
            raise ScanError(f"{name}: {option} {requested} is not possible: the sinogram's {detectors} detector "
                            f"cells fix the image at {own} x {own} (another size would need measurements that "
                            "were not made)")
        return own
    if scan.kind == "kspace":
        rows, cols = (int(s) for s in np.shape(scan.kspace)[-2:])
        own = min(rows, cols)
        if requested is not None and int(requested) > own:
            raise ScanError(f"{name}: {option} {requested} is not possible: the k-space is {rows} x {cols}, and a "
                            f"larger image would need frequencies that were not measured; {own} or less")
        return own if requested is None else int(requested)
    raise ScanError(f"{name}: holds images, not raw measurements")


# -- from a Scan -------------------------------------------------------------------------------


def _owner_phrase(physics_cfg, owner: str) -> str:
    return f"{owner} is for {describe(physics_cfg)}"


def _kspace_measurements(scan: Scan, cfg, owner: str, notes: list) -> tuple:
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
    mask = mask_2d(scan.mask, (h, w))
    if mask is None:
        mask = (kspace != 0).any(dim=0).any(dim=0).to(torch.float32)
    fully_sampled = bool(mask.all())
    kspace = centre_crop(kspace, size).contiguous()
    mask = centre_crop(mask, size).contiguous()
    if fully_sampled:
        mask = sampling_mask(cfg)[0, 0].to(torch.float32)
        notes.append(f"{name}: fully sampled k-space, retrospectively undersampled with the config's "
                     f"{cfg.acceleration:g}x {cfg.mask} mask")
        calibration = max(8, int(round(cfg.center_fraction * size)))
    else:
        calibration = 2 * calibration_halfwidth(mask)
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
        reference = reference_to_grid(scan.reference, "mri", size, kspace_shape=(h, w))
        ref_kind = scan.metadata.get("Reference", "reference")
        if reference is None:
            notes.append(f"{name}: reference images ({ref_kind}, {scan.reference.shape[-2]} x "
                         f"{scan.reference.shape[-1]}) cover another field of view than the {h} x {w} k-space; "
                         "ignored (validation uses measurement-domain metrics)")
            ref_kind = ""
    return y, mask, None, reference, ref_kind, fully_sampled


def _sinogram_measurements(scan: Scan, cfg, owner: str, notes: list) -> tuple:
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
        reference = reference_to_grid(scan.reference, "ct", cfg.img_size)
        if reference is not None and reference.shape[0] != y.shape[0]:
            reference = None
        if reference is None:
            notes.append(f"{name}: reference images ({ref_kind}) do not fit the sinogram's slices or the "
                         "square image grid; ignored")
            ref_kind = ""
    return y, None, angles, reference, ref_kind, False


def check_measurement_kind(scan: Scan, physics_cfg, owner: str = "the config") -> str:
    """The modality a k-space / sinogram scan's kind fixes; ScanError for images or the other modality's data."""
    name = display_name(scan.source or "scan")
    if scan.kind not in MEASUREMENT_KINDS:
        raise ScanError(f"{name}: holds images, not raw measurements")
    modality = "mri" if scan.kind == "kspace" else "ct"
    if physics_cfg.modality != modality:
        what = "MRI k-space" if modality == "mri" else "a CT sinogram"
        raise ScanError(f"{name}: holds {what}, but {owner} is for {describe(physics_cfg)}")
    return modality


def measurements_from_scan(scan: Scan, physics_cfg, *, normalise: bool = True,
                           owner: str = "the config") -> Measurements:
    """The measurements a k-space / sinogram scan holds, checked against ``physics_cfg``.

    ``owner`` names whose physics is meant in error messages (``"the config"``,
    ``"checkpoint model.pt"``). Raises :class:`ScanError` for image scans and for
    data whose geometry does not fit (modality, size, views, detectors).
    """
    name = display_name(scan.source or "scan")
    modality = check_measurement_kind(scan, physics_cfg, owner)
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
    data = concatenate_measurements([load_measurements(p, physics_cfg) for p in paths])
    train_idx, val_idx = split_indices(len(data), data_cfg)
    return data.select(train_idx), data.select(val_idx)

