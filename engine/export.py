"""Export of a reconstructed slice to PNG, NumPy, HDF5 or DICOM.

:func:`export_image` picks the format from the file extension:

``.png``
    8-bit (default) or 16-bit grayscale with the display window applied
    (``window=(low, high)`` in the image's units, default its min..max):
    ``low`` maps to black, ``high`` to white, values outside are clipped. The
    window, its units, description and checkpoint go into PNG text chunks.
``.npy``
    The raw values as float32 ``[H, W]`` (the format has no room for their
    units: HU for a CT scan in HU, see ``units`` below; ``.npz`` records them).
``.npz``
    Arrays ``reconstruction`` (float32 ``[H, W]``), ``units``, ``window``
    (``[low, high]``), ``description``, ``checkpoint``, ``source`` (strings
    stored as NumPy text, so ``np.load`` reads them without pickle).
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
    for the values as written; RescaleType ``HU`` when ``units`` is HU (the
    stored values read back in Hounsfield units), else ``US``. From a DICOM
    source slice (``source_slice``) it keeps the geometry -- PixelSpacing and
    ImagePositionPatient of the reconstruction's own pixel grid
    (:func:`engine.data.intensity.resampled_grid`), ImageOrientationPatient,
    SliceThickness, FrameOfReferenceUID -- and names the slice it was made from
    (SOPClassUID, SOPInstanceUID, frame) in SourceImageSequence and
    ReferencedImageSequence. Explicit VR little endian, with the file meta
    header, so ``pydicom.dcmread`` reads it without ``force``.

``units`` says what the image's values are ("HU", "normalised" for a ``[0, 1]``
reconstruction of a scan not in HU, ...); by default the source scan's. PNG,
NumPy archive and HDF5 record it with the window, which is in those units.

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
from engine.data.intensity import resampled_grid, window_bounds
from engine.errors import ScanError

__all__ = ["export_image", "quantise_uint16", "EXPORT_SUFFIXES"]

#: Extensions :func:`export_image` writes.
EXPORT_SUFFIXES = (".png", ".npy", ".npz", ".h5", ".hdf5", ".dcm")

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_U16_MAX = 65535


def export_image(image: Any, path: str | os.PathLike, *, window: Optional[tuple[float, float]] = None,
                 source_scan: Any = None, source_slice: Optional[int] = None, units: Optional[str] = None,
                 description: str = "", checkpoint_name: str = "", bit_depth: int = 8) -> Path:
    """Write one reconstructed slice ``image`` ([H, W], real) to ``path``; returns the path.

    ``window`` is the display window ``(low, high)`` in the image's units
    (default: the image's min..max); it is applied to PNGs and recorded in
    PNG text, NumPy archive, HDF5 attributes and DICOM WindowCenter/Width.
    ``units`` names those units (default: ``source_scan``'s). ``source_scan``
    is the scan the slice was reconstructed from (an :class:`engine.data.scans.Scan`
    or anything with ``.metadata`` / ``.source``; may be None): DICOM export
    keeps its study and patient, and with ``source_slice`` (the slice's index
    in the scan) that slice's geometry and UIDs. ``description`` names the
    method, ``checkpoint_name`` the weights. ``bit_depth`` (8 or 16) is for PNG.

    Leading singleton axes are dropped (``[1, 1, H, W]`` is fine) and torch
    tensors are accepted. Raises :class:`ScanError` for an unknown extension,
    an image that is not 2-D, real and finite, an empty window, or a write error.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        shown = suffix or "(no extension)"
        raise ScanError(f"{path.name}: cannot export to '{shown}'; use .png, .npy, .npz, .h5/.hdf5 or .dcm")
    img = _as_image(image, path.name)
    low, high = _window(img, window, path.name)
    if bit_depth not in (8, 16):
        raise ScanError(f"{path.name}: PNG bit depth must be 8 or 16, got {bit_depth}")
    if units is None:
        units = _source_info(source_scan)[2]
    if source_slice is not None:
        _check_source_slice(source_scan, source_slice, path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            if suffix == ".png":
                _write_png(img, fh, low, high, bit_depth, description, checkpoint_name, units)
            elif suffix == ".npy":
                np.save(fh, img.astype(np.float32), allow_pickle=False)
            elif suffix == ".npz":
                _write_npz(img, fh, low, high, source_scan, description, checkpoint_name, units)
            elif suffix in (".h5", ".hdf5"):
                _write_hdf5(img, fh, low, high, source_scan, description, checkpoint_name, units)
            else:
                _write_dicom(img, fh, low, high, source_scan, source_slice, description, checkpoint_name, units)
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


def _check_source_slice(source_scan: Any, index: Any, name: str) -> None:
    count = None
    try:
        count = int(source_scan.n_slices)
    except Exception:
        pass
    if not isinstance(index, (int, np.integer)) or count is None or not 0 <= int(index) < count:
        where = f"0..{count - 1}" if count else "a scan with slices"
        raise ScanError(f"{name}: source slice {index!r} is not a slice of the source scan ({where})")


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

def _write_png(img, fh, low, high, bit_depth, description, checkpoint_name, units) -> None:
    from PIL import Image, PngImagePlugin

    top = 255 if bit_depth == 8 else _U16_MAX
    scaled = np.clip((img - low) / (high - low), 0.0, 1.0) * top
    pixels = np.rint(scaled).astype(np.uint8 if bit_depth == 8 else np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"EquiDEQ Workbench {engine.__version__}")
    info.add_text("Window", f"{low!r} {high!r}")
    if units:
        info.add_text("Units", units)  # of the window: e.g. HU, so black is `low` HU
    if description:
        info.add_itxt("Description", description)
    if checkpoint_name:
        info.add_itxt("Checkpoint", checkpoint_name)
    Image.fromarray(pixels).save(fh, format="PNG", pnginfo=info)


def _write_npz(img, fh, low, high, source_scan, description, checkpoint_name, units) -> None:
    source = _source_info(source_scan)[1]
    np.savez(fh, reconstruction=img.astype(np.float32), units=np.array(units or ""),
             window=np.array([low, high], dtype=np.float64), description=np.array(description),
             checkpoint=np.array(checkpoint_name), source=np.array(source),
             software=np.array(f"EquiDEQ Workbench {engine.__version__}"))


def _write_hdf5(img, fh, low, high, source_scan, description, checkpoint_name, units) -> None:
    import h5py

    source = _source_info(source_scan)[1]
    with h5py.File(fh, "w") as f:
        dset = f.create_dataset("reconstruction", data=img.astype(np.float32))
        dset.attrs["description"] = description
        dset.attrs["checkpoint"] = checkpoint_name
        dset.attrs["window"] = np.array([low, high], dtype=np.float64)
        dset.attrs["software"] = f"EquiDEQ Workbench {engine.__version__}"
        dset.attrs["source"] = source
        dset.attrs["units"] = units or ""


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


def _write_dicom(img, fh, low, high, source_scan, source_slice, description, checkpoint_name, units) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage,
                             generate_uid)

    meta, source, _source_units, modality = _source_info(source_scan)
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

    # Where the pixels are: the source slice's plane, on the reconstruction's own pixel grid.
    geometry = _slice_geometry(source_scan, source_slice, img.shape)
    if "spacing" in geometry:
        ds.PixelSpacing = [_ds(s)[0] for s in geometry["spacing"]]
    if "position" in geometry:
        ds.ImagePositionPatient = [_ds(v)[0] for v in geometry["position"]]
        ds.ImageOrientationPatient = [_ds(v)[0] for v in geometry["orientation"]]
    thickness = _positive_number(meta.get("SliceThickness", ""))
    if source_slice is not None and thickness is not None:
        ds.SliceThickness = _ds(thickness)[0]
    frame_uid = str(getattr(source_scan, "frame_of_reference_uid", "") or "")
    if "position" in geometry and _UID_RE.match(frame_uid) and len(frame_uid) <= 64:
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""

    # Lineage: the source slice this image was derived from.
    origin = _source_image(source_scan, source_slice)
    if origin is not None:
        ds.SourceImageSequence = [_image_reference(origin)]
        ds.ReferencedImageSequence = [_image_reference(origin)]

    ds.save_as(fh, enforce_file_format=True)


def _positive_number(text: str) -> Optional[float]:
    """``text`` as a finite positive float, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


def _source_image(source_scan: Any, source_slice: Optional[int]):
    """The :class:`engine.data.scans.SourceImage` of the source slice, or None (not DICOM, no UIDs)."""
    if source_scan is None or source_slice is None:
        return None
    sources = getattr(source_scan, "source_images", None) or []
    origin = sources[source_slice] if 0 <= source_slice < len(sources) else None
    if origin is None or not all(_UID_RE.match(u) and len(u) <= 64
                                 for u in (origin.sop_class_uid, origin.sop_instance_uid)):
        return None
    return origin


def _image_reference(origin):
    """One item of SourceImageSequence / ReferencedImageSequence naming ``origin``."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = origin.sop_class_uid
    item.ReferencedSOPInstanceUID = origin.sop_instance_uid
    if origin.frame is not None:
        item.ReferencedFrameNumber = int(origin.frame)
    return item


def _slice_geometry(source_scan: Any, source_slice: Optional[int], shape: tuple[int, int]) -> dict:
    """``spacing`` (row, col) mm of the output pixels, and with a source slice that has a position,
    its ``position`` (the first output pixel's centre, patient mm) and ``orientation``; what is unknown is left out.

    Image scans were squared and resized by :func:`engine.data.prepare_slices`
    (:func:`~engine.data.intensity.resampled_grid` says where each output pixel
    lies in the source slice); k-space scans were centre-cropped in k-space
    (same field of view, each axis sampled ``H / h`` times coarser).
    """
    spacing = getattr(source_scan, "spacing", None) if source_scan is not None else None
    try:
        row_mm, col_mm = (float(s) for s in spacing)
        src_shape = tuple(int(s) for s in source_scan.slice_shape)
    except Exception:
        return {}
    if not (row_mm > 0 and col_mm > 0):
        return {}
    if getattr(source_scan, "kind", "image") != "image":
        if getattr(source_scan, "kind", "") != "kspace":
            return {}
        return {"spacing": (row_mm * src_shape[0] / shape[0], col_mm * src_shape[1] / shape[1])}
    if shape[0] != shape[1]:
        return {"spacing": (row_mm * src_shape[0] / shape[0], col_mm * src_shape[1] / shape[1])}
    row0, col0, step = resampled_grid(src_shape, shape[0])
    out = {"spacing": (row_mm * step, col_mm * step)}
    positions = getattr(source_scan, "positions", None) or []
    orientation = getattr(source_scan, "orientation", None)
    position = positions[source_slice] if source_slice is not None and 0 <= source_slice < len(positions) else None
    if position is None or orientation is None or len(orientation) != 6:
        return out
    along_row, along_col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    # ImageOrientationPatient: first the direction of increasing column index, then of increasing row index
    first = np.asarray(position, float) + col0 * col_mm * along_row + row0 * row_mm * along_col
    out.update(position=tuple(float(v) for v in first), orientation=tuple(float(v) for v in orientation))
    return out
