"""Export of a reconstructed slice to PNG, NumPy, HDF5 or DICOM.

:func:`export_image` picks the format from the file extension:

``.png``
    8-bit (default) or 16-bit grayscale with the display window applied
    (``window=(low, high)`` in the image's units, default its min..max):
    ``low`` maps to black, ``high`` to white, values outside are clipped. The
    window, description and checkpoint go into PNG text chunks.
``.npy``
    The raw values as float32 ``[H, W]``.
``.h5`` / ``.hdf5``
    Dataset ``reconstruction`` (float32 ``[H, W]``) with attributes
    ``description``, ``checkpoint``, ``window`` (``[low, high]``, the display
    window used), ``software``, ``source`` and ``units``.
``.dcm``
    A *derived* Secondary Capture image (SOP class 1.2.840.10008.5.1.4.1.1.7):
    new SOPInstanceUID and SeriesInstanceUID; StudyInstanceUID, PatientID,
    PatientName (and sex, age, study date/description) kept from the source
    DICOM's metadata when one is given, else a new study of an anonymous
    patient; ImageType ``DERIVED\\SECONDARY``; SeriesDescription naming the
    method and the checkpoint; the window as WindowCenter / WindowWidth.
    Pixels are stored as uint16 with RescaleSlope / RescaleIntercept chosen so
    that ``pixel_array * slope + intercept`` gives back the values within half
    a quantisation step (``slope / 2``); slope and intercept are rounded to
    what a DICOM decimal string holds *before* quantising, so the bound holds
    for the values as written. Explicit VR little endian, with the file meta
    header, so ``pydicom.dcmread`` reads it without ``force``.

All writes go through :func:`engine.atomic.atomic_write` (temporary file in the
same folder, ``fsync``, then ``os.replace``). Failures raise
:class:`~engine.errors.ScanError` with a one-line message naming the file.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

import engine
from engine.atomic import atomic_write
from engine.data.intensity import window_bounds
from engine.errors import ScanError

__all__ = ["export_image", "quantise_uint16", "EXPORT_SUFFIXES"]

#: Extensions :func:`export_image` writes.
EXPORT_SUFFIXES = (".png", ".npy", ".h5", ".hdf5", ".dcm")

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_U16_MAX = 65535


def export_image(image: Any, path: str | os.PathLike, *, window: Optional[tuple[float, float]] = None,
                 source_scan: Any = None, description: str = "", checkpoint_name: str = "",
                 bit_depth: int = 8) -> Path:
    """Write one reconstructed slice ``image`` ([H, W], real) to ``path``; returns the path.

    ``window`` is the display window ``(low, high)`` in the image's units
    (default: the image's min..max); it is applied to PNGs and recorded in
    HDF5 attributes and DICOM WindowCenter/Width. ``source_scan`` is the scan
    the slice was reconstructed from (an :class:`engine.data.scans.Scan` or
    anything with ``.metadata`` / ``.source``; may be None): DICOM export keeps
    its study and patient. ``description`` names the method,
    ``checkpoint_name`` the weights. ``bit_depth`` (8 or 16) is for PNG.

    Leading singleton axes are dropped (``[1, 1, H, W]`` is fine) and torch
    tensors are accepted. Raises :class:`ScanError` for an unknown extension,
    an image that is not 2-D, real and finite, an empty window, or a write error.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        shown = suffix or "(no extension)"
        raise ScanError(f"{path.name}: cannot export to '{shown}'; use .png, .npy, .h5/.hdf5 or .dcm")
    img = _as_image(image, path.name)
    low, high = _window(img, window, path.name)
    if bit_depth not in (8, 16):
        raise ScanError(f"{path.name}: PNG bit depth must be 8 or 16, got {bit_depth}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            if suffix == ".png":
                _write_png(img, fh, low, high, bit_depth, description, checkpoint_name)
            elif suffix == ".npy":
                np.save(fh, img.astype(np.float32), allow_pickle=False)
            elif suffix in (".h5", ".hdf5"):
                _write_hdf5(img, fh, low, high, source_scan, description, checkpoint_name)
            else:
                _write_dicom(img, fh, low, high, source_scan, description, checkpoint_name)
    except OSError as exc:
        raise ScanError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------

def _as_image(image: Any, name: str) -> np.ndarray:
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ScanError(f"{name}: can only export one 2-D slice [H, W], got shape {tuple(arr.shape)}")
    if np.iscomplexobj(arr):
        raise ScanError(f"{name}: the image is complex; export its magnitude (or real part) instead")
    if arr.dtype.kind not in "biuf":
        raise ScanError(f"{name}: the image has non-numeric dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ScanError(f"{name}: the image contains NaN or Inf values")
    return arr


def _window(img: np.ndarray, window, name: str) -> tuple[float, float]:
    if window is None:
        low, high = float(img.min()), float(img.max())
        if high <= low:
            high = low + 1.0
        return low, high
    return window_bounds(window, f"{name}: window", ScanError)


def _source_info(source_scan: Any) -> tuple[dict, str, str, str]:
    """(metadata, source path, units, modality) of a Scan-like object, tolerant of missing attributes."""
    if source_scan is None:
        return {}, "", "", ""
    meta = getattr(source_scan, "metadata", None) or {}
    meta = {str(k): str(v) for k, v in dict(meta).items() if v is not None}
    return (meta, str(getattr(source_scan, "source", "") or ""), str(getattr(source_scan, "units", "") or ""),
            str(getattr(source_scan, "modality", "") or ""))


# ---------------------------------------------------------------------------------------
# PNG / HDF5
# ---------------------------------------------------------------------------------------

def _write_png(img, fh, low, high, bit_depth, description, checkpoint_name) -> None:
    from PIL import Image, PngImagePlugin

    top = 255 if bit_depth == 8 else _U16_MAX
    scaled = np.clip((img - low) / (high - low), 0.0, 1.0) * top
    pixels = np.rint(scaled).astype(np.uint8 if bit_depth == 8 else np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"EquiDEQ Workbench {engine.__version__}")
    info.add_text("Window", f"{low!r} {high!r}")
    if description:
        info.add_itxt("Description", description)
    if checkpoint_name:
        info.add_itxt("Checkpoint", checkpoint_name)
    Image.fromarray(pixels).save(fh, format="PNG", pnginfo=info)


def _write_hdf5(img, fh, low, high, source_scan, description, checkpoint_name) -> None:
    import h5py

    _meta, source, units, _modality = _source_info(source_scan)
    with h5py.File(fh, "w") as f:
        dset = f.create_dataset("reconstruction", data=img.astype(np.float32))
        dset.attrs["description"] = description
        dset.attrs["checkpoint"] = checkpoint_name
        dset.attrs["window"] = np.array([low, high], dtype=np.float64)
        dset.attrs["software"] = f"EquiDEQ Workbench {engine.__version__}"
        dset.attrs["source"] = source
        dset.attrs["units"] = units


# ---------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------

def _ds(value: float, rounding: str = decimal.ROUND_HALF_EVEN) -> tuple[str, float]:
    """``value`` as a DICOM decimal string (at most 16 characters) and the float it reads back as.

    ``rounding`` (a :mod:`decimal` mode) picks the direction, e.g.
    ``ROUND_FLOOR`` for a value that must not exceed ``value``.
    """
    exact = decimal.Decimal(float(value))
    for digits in range(16, 0, -1):
        with decimal.localcontext() as ctx:
            ctx.prec = digits
            ctx.rounding = rounding
            rounded = +exact
        for text in (format(rounded, "f"), str(rounded), str(rounded.normalize())):
            if len(text) <= 16:
                return text, float(text)
    raise AssertionError(f"cannot write {value!r} as a decimal string")  # pragma: no cover


def quantise_uint16(img: np.ndarray) -> tuple[np.ndarray, str, str]:
    """(uint16 pixels, slope DS, intercept DS) with ``pixels * slope + intercept ~= img`` within ``slope / 2``."""
    vmin, vmax = float(img.min()), float(img.max())
    intercept_s, intercept = _ds(vmin, decimal.ROUND_FLOOR)
    span = vmax - intercept
    slope_s, slope = _ds(span / _U16_MAX if span > 0 else 1.0, decimal.ROUND_CEILING)
    if not slope > 0:
        slope_s, slope = "1", 1.0
    stored = np.clip(np.rint((img - intercept) / slope), 0, _U16_MAX).astype(np.uint16)
    return stored, slope_s, intercept_s


def _text(value: str, limit: int) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _write_dicom(img, fh, low, high, source_scan, description, checkpoint_name) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage,
                             generate_uid)

    meta, source, units, modality = _source_info(source_scan)
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = generate_uid()

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = file_meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time

    # Patient and study: kept from a source DICOM, else a new study of an anonymous patient.
    study_uid = meta.get("StudyInstanceUID", "")
    keep_study = bool(_UID_RE.match(study_uid)) and len(study_uid) <= 64
    ds.PatientName = _text(meta.get("PatientName", "") or "ANONYMOUS", 64)
    ds.PatientID = _text(meta.get("PatientID", "") or "ANONYMOUS", 64)
    ds.PatientBirthDate = ""
    ds.PatientSex = meta.get("PatientSex", "") if meta.get("PatientSex", "") in ("M", "F", "O") else ""
    if re.fullmatch(r"\d{3}[DWMY]", meta.get("PatientAge", "")):
        ds.PatientAge = meta["PatientAge"]
    ds.StudyInstanceUID = study_uid if keep_study else generate_uid()
    study_date = meta.get("StudyDate", "") if keep_study else ""
    ds.StudyDate = study_date if re.fullmatch(r"\d{8}", study_date) else date
    ds.StudyTime = "" if keep_study else time
    if keep_study and meta.get("StudyDescription"):
        ds.StudyDescription = _text(meta["StudyDescription"], 64)
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""

    # Series: always new.
    dicom_modality = meta.get("Modality", "")
    if not re.fullmatch(r"[A-Z]{2,16}", dicom_modality):
        dicom_modality = {"ct": "CT", "mri": "MR"}.get(modality.lower(), "OT")
    ds.Modality = dicom_modality
    ds.SeriesInstanceUID = generate_uid()
    try:
        ds.SeriesNumber = 1000 + int(meta.get("SeriesNumber", ""))
    except ValueError:
        ds.SeriesNumber = 1000
    ds.SeriesDate, ds.SeriesTime = date, time
    method = description.strip() or "reconstruction"
    series = f"EquiDEQ {method}" + (f" [{checkpoint_name}]" if checkpoint_name else "")
    ds.SeriesDescription = _text(series, 64)
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time

    # Equipment.
    ds.Manufacturer = "EquiDEQ"
    ds.SoftwareVersions = engine.__version__
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = "EquiDEQ Workbench"
    ds.SecondaryCaptureDeviceSoftwareVersions = engine.__version__

    # What the image is.
    derivation = f"EquiDEQ Workbench {engine.__version__}: {method}"
    if checkpoint_name:
        derivation += f"; checkpoint {checkpoint_name}"
    if source:
        derivation += f"; from {Path(source).name}"
    ds.DerivationDescription = _text(derivation, 1024)
    ds.ImageComments = _text(derivation + f"; display window [{low:g}, {high:g}]", 10240)
    ds.BurnedInAnnotation = "NO"

    # Pixels and their mapping to the image's values.
    stored, slope_s, intercept_s = quantise_uint16(img)
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.RescaleIntercept = intercept_s
    ds.RescaleSlope = slope_s
    ds.RescaleType = "HU" if units == "HU" else "US"
    ds.WindowCenter = _ds((low + high) / 2)[0]
    ds.WindowWidth = _ds(high - low)[0]
    spacing = _pixel_spacing(source_scan, img.shape)
    if spacing is not None:
        ds.PixelSpacing = [_ds(s)[0] for s in spacing]

    ds.save_as(fh, enforce_file_format=True)


def _pixel_spacing(source_scan: Any, shape: tuple[int, int]) -> Optional[tuple[float, float]]:
    """The source's pixel spacing, rescaled if the reconstruction has another size; None if unknown."""
    spacing = getattr(source_scan, "spacing", None) if source_scan is not None else None
    if not spacing or len(spacing) != 2:
        return None
    try:
        rows, cols = (float(s) for s in spacing)
        src_h, src_w = source_scan.slice_shape if getattr(source_scan, "kind", "image") in ("image", "kspace") \
            else shape
    except Exception:
        return None
    if not (rows > 0 and cols > 0):
        return None
    return rows * src_h / shape[0], cols * src_w / shape[1]
