"""DICOM reading: single files, series folders, classic and Enhanced multi-frame.

What this module guarantees:

* **Rescale** (modality LUT) is always applied, wherever the standard allows it
  to live: the top-level RescaleSlope/RescaleIntercept, the
  SharedFunctionalGroupsSequence > PixelValueTransformationSequence of Enhanced
  CT/MR, or per frame in PerFrameFunctionalGroupsSequence (which wins). A
  ModalityLUTSequence is applied when no rescale is present. CT comes out in
  Hounsfield units (``Scan.units == "HU"``).
* **Slice order** of a series folder follows ImagePositionPatient projected on
  the slice normal (cross product of the ImageOrientationPatient cosines); when
  a file lacks geometry it falls back to InstanceNumber, then to the file name.
  Frames of an Enhanced multi-frame object are sorted the same way using their
  PlanePositionSequence.
* **Several series** in one folder raise a ScanError listing them, unless
  ``series=`` (a SeriesInstanceUID or SeriesNumber) picks one; see
  :func:`list_series`.
* **Byte order, VR and signedness** are decoded by pydicom; compressed transfer
  syntaxes use whatever pydicom pixel-data plugins are installed, and a missing
  codec becomes a ScanError that names the file and the package to install.
* **Corrupt inputs** (random bytes, truncated pixel data, no pixel data, a
  structured report) raise ScanError naming the file and the problem; no
  pydicom exception escapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from engine.data.scans import Scan, ScanBudget, ScanLimits, SourceImage, check_finite, display_name, read_head
from engine.errors import ScanError

__all__ = [
    "SeriesInfo",
    "list_series",
    "read_dicom_file",
    "read_dicom_folder",
    "looks_like_dicom_without_preamble",
]

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: pip packages that provide decoders, by transfer-syntax family
_CODEC_HINTS = {
    "jpeg": "pip install pylibjpeg pylibjpeg-libjpeg",
    "jpegls": "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install pyjpegls)",
    "j2k": "pip install pylibjpeg pylibjpeg-openjpeg",
    "rle": "pip install pylibjpeg pylibjpeg-rle",
    "other": "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)",
}

_METADATA_KEYS = (
    "PatientID", "PatientName", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate",
    "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
    "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "SliceThickness", "KVP",
    "Rows", "Columns", "PixelSpacing", "NumberOfFrames", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "MagneticFieldStrength", "EchoTime", "RepetitionTime",
)


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a hard dependency
        raise ScanError("reading DICOM needs pydicom (pip install pydicom)") from None
    return pydicom


# -- file recognition -----------------------------------------------------------------------


def looks_like_dicom_without_preamble(head: bytes) -> bool:
    """True when ``head`` plausibly starts a DICOM stream that has no 128-byte preamble.

    Such files begin directly with a group 0x0002 (file meta) or 0x0008 element,
    little- or big-endian. Random bytes pass this with probability ~3e-5, and
    then still have to parse.
    """
    if len(head) < 8:
        return False
    g_le = int.from_bytes(head[0:2], "little")
    e_le = int.from_bytes(head[2:4], "little")
    g_be = int.from_bytes(head[0:2], "big")
    e_be = int.from_bytes(head[2:4], "big")
    return (g_le in (0x0002, 0x0008) and e_le < 0x1000) or (g_be == 0x0008 and e_be < 0x1000)


def _has_preamble(path: Path) -> tuple[bool, bool]:
    """(is DICOM-looking, has preamble 'DICM')."""
    head = read_head(path, 132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True, True
    return looks_like_dicom_without_preamble(head), False


def _dcmread(path: Path, *, header_only: bool):
    """pydicom.dcmread with every failure mapped to ScanError; never forces random bytes."""
    pydicom = _pydicom()
    name = display_name(path)
    plausible, preamble = _has_preamble(path)
    if not plausible:
        raise ScanError(f"{name}: not a DICOM file (no 'DICM' marker and no DICOM header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only, force=not preamble)
            # force=True reads lazily; touch every top-level element so garbage fails here
            n = sum(1 for _ in ds)
    except ScanError:
        raise
    except pydicom.errors.InvalidDicomError:
        raise ScanError(f"{name}: not a DICOM file") from None
    except MemoryError:
        raise ScanError(f"{name}: corrupt DICOM file (absurd element length)") from None
    except Exception as exc:
        raise ScanError(f"{name}: corrupt or truncated DICOM file ({_short(exc)})") from None
    if n == 0:
        raise ScanError(f"{name}: not a DICOM file (no data elements)")
    if not preamble:
        # a forced parse of non-DICOM bytes yields nonsense tags: require a sane image/identity tag
        keys = ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        if not any(_safe_get(ds, k) is not None for k in keys):
            raise ScanError(f"{name}: not a DICOM file (no recognisable DICOM attributes)")
    return ds


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _safe_get(ds, key, default=None):
    """ds.get(key) that never raises (values of forced/corrupt files convert lazily)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ds.get(key, default)
    except Exception:
        return default
    return default if value is None or value == "" else value


def _as_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_as_str(v) for v in value)
    try:
        if isinstance(value, bytes):
            return value.decode("latin-1", errors="replace").strip("\x00 ")
        return str(value).strip()
    except Exception:
        return "?"


def _floats(value, n: int) -> Optional[tuple]:
    try:
        out = tuple(float(v) for v in value)
    except Exception:
        return None
    if len(out) != n or not all(np.isfinite(out)):
        return None
    return out


def _int(value, default=None):
    try:
        return int(value)
    except Exception:
        return default


# -- geometry and rescale -------------------------------------------------------------------


def _normal(orientation: Optional[tuple]) -> Optional[np.ndarray]:
    if orientation is None:
        return None
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 1e-6 else None


def _fg_item(ds, frame: Optional[int], item_name: str):
    """Functional-group macro ``item_name`` for a frame: per-frame first, then shared."""
    if frame is not None:
        per = _safe_get(ds, "PerFrameFunctionalGroupsSequence")
        if per is not None and frame < len(per):
            sub = _safe_get(per[frame], item_name)
            if sub:
                return sub[0]
    shared = _safe_get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        sub = _safe_get(shared[0], item_name)
        if sub:
            return sub[0]
    return None


def _rescale(ds, n_frames: int, name: str) -> tuple[np.ndarray, np.ndarray, bool, str]:
    """Per-frame (slopes, intercepts, found, rescale_type) from top level / functional groups."""
    slope = np.ones(n_frames)
    intercept = np.zeros(n_frames)
    found = False
    rtype = _as_str(_safe_get(ds, "RescaleType"))
    s, i = _safe_get(ds, "RescaleSlope"), _safe_get(ds, "RescaleIntercept")
    if s is not None or i is not None:
        slope[:] = float(s) if s is not None else 1.0
        intercept[:] = float(i) if i is not None else 0.0
        found = True
    has_fg = _safe_get(ds, "SharedFunctionalGroupsSequence") or _safe_get(ds, "PerFrameFunctionalGroupsSequence")
    if has_fg:
        for f in range(n_frames):
            item = _fg_item(ds, f, "PixelValueTransformationSequence")
            if item is None:
                continue
            s, i = _safe_get(item, "RescaleSlope"), _safe_get(item, "RescaleIntercept")
            if s is not None:
                slope[f] = float(s)
                found = True
            if i is not None:
                intercept[f] = float(i)
                found = True
            rtype = _as_str(_safe_get(item, "RescaleType")) or rtype
    if not (np.isfinite(slope).all() and np.isfinite(intercept).all()):
        bad = [f"RescaleSlope {v:g}" for v in np.unique(slope[~np.isfinite(slope)])]
        bad += [f"RescaleIntercept {v:g}" for v in np.unique(intercept[~np.isfinite(intercept)])]
        verb = "is not a finite number" if len(bad) == 1 else "are not finite numbers"
        raise ScanError(f"{name}: {', '.join(bad)} {verb}; cannot rescale the pixel values")
    return slope, intercept, found, rtype


def _frame_geometry(ds, n_frames: int):
    """(positions per frame or None, orientation or None, spacing or None)."""
    orientation = _floats(_safe_get(ds, "ImageOrientationPatient"), 6)
    spacing = _floats(_safe_get(ds, "PixelSpacing"), 2)
    ipp = _floats(_safe_get(ds, "ImagePositionPatient"), 3)
    positions = [ipp] * n_frames if (ipp is not None and n_frames == 1) else None
    if _safe_get(ds, "SharedFunctionalGroupsSequence") or _safe_get(ds, "PerFrameFunctionalGroupsSequence"):
        pos = []
        for f in range(n_frames):
            item = _fg_item(ds, f, "PlanePositionSequence")
            pos.append(_floats(_safe_get(item, "ImagePositionPatient"), 3) if item is not None else None)
        if all(p is not None for p in pos):
            positions = pos
        item = _fg_item(ds, 0, "PlaneOrientationSequence")
        if item is not None:
            orientation = _floats(_safe_get(item, "ImageOrientationPatient"), 6) or orientation
        item = _fg_item(ds, 0, "PixelMeasuresSequence")
        if item is not None:
            spacing = _floats(_safe_get(item, "PixelSpacing"), 2) or spacing
    return positions, orientation, spacing


# -- pixel decoding -------------------------------------------------------------------------


def _codec_hint(ts) -> str:
    name = _as_str(getattr(ts, "name", ts)).lower()
    if "2000" in name:
        return _CODEC_HINTS["j2k"]
    if "jpeg-ls" in name or "jpeg ls" in name:
        return _CODEC_HINTS["jpegls"]
    if "jpeg" in name:
        return _CODEC_HINTS["jpeg"]
    if "rle" in name:
        return _CODEC_HINTS["rle"]
    return _CODEC_HINTS["other"]


#: Bytes one decoded sample takes in pydicom's pixel array, by BitsAllocated (1-bit data is unpacked).
_DECODED_ITEMSIZE = {1: 1, 8: 1, 16: 2, 32: 4, 64: 8}

#: ITU-R BT.601 luma weights for colour images.
_LUMA = np.array([0.299, 0.587, 0.114])


def _pixel_budget(ds, path: Path, budget: ScanBudget, frames: int, rows: int, cols: int, spp: int) -> None:
    """Count what decoding ``ds`` allocates: pydicom's array, its colour conversion, the float32
    result and one frame in float64."""
    decoded = _DECODED_ITEMSIZE.get(_int(_safe_get(ds, "BitsAllocated"), 0), 8)
    colour = spp * (4 + decoded) if spp > 1 else 0  # pydicom's YBR -> RGB goes through float32
    one_frame = rows * cols * 8 * (spp + 2)  # float64 luma/rescale temporaries of the frame being converted
    budget.add("pixel data", (frames, rows, cols), spp * decoded + colour + 4, fixed_bytes=one_frame)


def _check_pixel_length(ds, name: str, rows: int, cols: int, frames: int, spp: int) -> int:
    """Refuse native pixel data whose length does not match the header; return the padding bytes.

    Data shorter than the header says is truncated. Data longer by a whole frame or
    more means the header describes other data (BitsAllocated 8 or 1 over 16-bit
    pixels, too small a NumberOfFrames): pydicom would decode it, warning only, into
    a garbage image or invented frames. Less than a frame is trailing padding
    (PS 3.5 section 8.1.1), which pydicom drops; it is reported in the metadata.
    """
    from pydicom.pixels.utils import get_expected_length

    bits = _int(_safe_get(ds, "BitsAllocated"), 0)
    if bits not in (1, 8, 16, 32, 64):
        raise ScanError(f"{name}: unsupported BitsAllocated {bits!r}")
    raw = ds.PixelData
    if not isinstance(raw, (bytes, bytearray)):
        return 0
    try:
        expected = int(get_expected_length(ds, "bytes"))
    except Exception:
        expected = (rows * cols * frames * spp * bits + 7) // 8
    if len(raw) < expected:
        raise ScanError(f"{name}: pixel data is truncated ({len(raw):,} of {expected:,} bytes present)")
    if len(raw) - expected >= expected / max(1, frames):  # room for at least one more frame
        raise ScanError(
            f"{name}: pixel data is {len(raw):,} bytes but the header describes {expected:,} "
            f"(Rows {rows} x Columns {cols} x Frames {frames} x SamplesPerPixel {spp} at BitsAllocated {bits}), "
            "a whole frame or more too long; refusing to decode it as a mis-sized image"
        )
    return max(0, len(raw) - expected - expected % 2)  # DICOM pads odd lengths with one byte


def _decode(ds, path: Path, budget: ScanBudget) -> tuple[np.ndarray, dict]:
    """Decoded, rescaled frames as float32 [frames, H, W] plus geometry/units info.

    ``budget`` already holds the file itself; the pixel arrays are counted before decoding.
    """
    name = display_name(path)
    present = [t for t in _PIXEL_TAGS if t in ds]
    if not present:
        sop = _safe_get(ds, "SOPClassUID")
        what = getattr(sop, "name", None) or _as_str(sop) or "unknown object"
        modality = _as_str(_safe_get(ds, "Modality"))
        extra = f", Modality {modality}" if modality else ""
        raise ScanError(f"{name}: no pixel data (missing PixelData; SOP class: {what}{extra}; not an image)")
    rows, cols = _int(_safe_get(ds, "Rows")), _int(_safe_get(ds, "Columns"))
    if not rows or not cols or rows <= 0 or cols <= 0:
        raise ScanError(f"{name}: image has no valid Rows/Columns ({rows!r} x {cols!r})")
    frames = _int(_safe_get(ds, "NumberOfFrames", 1), 1) or 1
    spp = _int(_safe_get(ds, "SamplesPerPixel", 1), 1) or 1
    if frames < 0 or spp not in (1, 3, 4):
        raise ScanError(f"{name}: invalid NumberOfFrames/SamplesPerPixel ({frames}, {spp})")
    _pixel_budget(ds, path, budget, frames, rows, cols, spp)

    file_meta = getattr(ds, "file_meta", None)
    ts = _safe_get(file_meta, "TransferSyntaxUID") if file_meta is not None else None
    compressed = bool(getattr(ts, "is_compressed", False))

    padding = 0
    if present[0] == "PixelData" and not compressed:
        padding = _check_pixel_length(ds, name, rows, cols, frames, spp)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except ScanError:
        raise
    except MemoryError:
        raise ScanError(f"{name}: not enough memory to decode the pixel data") from None
    except Exception as exc:
        msg = str(exc)
        if "less than expected" in msg or "truncat" in msg.lower():
            raise ScanError(f"{name}: pixel data is truncated ({_short(exc)})") from None
        if compressed and (
            "missing dependencies" in msg or "plugin" in msg.lower() or "not support" in msg
            or isinstance(exc, (RuntimeError, NotImplementedError))
        ):
            tsname = getattr(ts, "name", _as_str(ts))
            raise ScanError(
                f"{name}: cannot decode '{tsname}' compressed pixel data: no working decoder is "
                f"installed ({_codec_hint(ts)})"
            ) from None
        raise ScanError(f"{name}: cannot decode pixel data ({_short(exc)})") from None

    arr = np.asarray(arr)
    # normalise to [frames, H, W(, samples)]
    if spp > 1:
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ScanError(f"{name}: unexpected colour pixel array shape {arr.shape}")
    else:
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ScanError(f"{name}: unexpected pixel array shape {arr.shape}")
    if arr.shape[1:3] != (rows, cols):
        raise ScanError(f"{name}: decoded {arr.shape[1:3]} pixels but header says {rows} x {cols}")
    n = arr.shape[0]

    slope, intercept, found, rtype = _rescale(ds, n, name)
    lut = not found and bool(_safe_get(ds, "ModalityLUTSequence"))
    if lut:
        from pydicom.pixels import apply_modality_lut

    def values(f: int) -> np.ndarray:
        """Frame ``f`` in float64: colour -> luma, then rescale or modality LUT.

        One frame at a time, so the float64 working copy never spans the whole object.
        """
        frame = arr[f][..., :3].astype(np.float64) @ _LUMA if spp > 1 else arr[f]
        if found:
            return frame.astype(np.float64) * slope[f] + intercept[f]
        if lut:
            return np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
        return frame.astype(np.float64)

    modality_tag = _as_str(_safe_get(ds, "Modality")).upper()
    sop_name = _as_str(getattr(_safe_get(ds, "SOPClassUID"), "name", "")).lower()
    if modality_tag == "CT" or (not modality_tag and " ct " in f" {sop_name} "):
        modality, units = "ct", ("HU" if rtype.upper() in ("", "HU") else "arbitrary")
    elif modality_tag == "MR" or (not modality_tag and " mr " in f" {sop_name} "):
        modality, units = "mri", "magnitude"
    else:
        modality, units = "unknown", "arbitrary"

    photometric = _as_str(_safe_get(ds, "PhotometricInterpretation")).upper()
    flip = None
    if photometric == "MONOCHROME1" and units != "HU":
        # MONOCHROME1: the lowest value is displayed white; flip so bright = high
        # (about the extremes of the whole object, found in a first pass)
        extremes = [(float(v.max()), float(v.min())) for v in map(values, range(n))]
        flip = max(hi for hi, _ in extremes) + min(lo for _, lo in extremes)

    positions, orientation, spacing = _frame_geometry(ds, n)
    order = _sort_order(positions, orientation, None, n)
    if order is not None and n > 1:
        positions = [positions[i] for i in order]
    else:
        order = range(n)
    sources = _source_images(ds, order, n)
    out = np.empty((n, rows, cols), dtype=np.float32)
    for k, f in enumerate(order):  # frames written in slice order: no reordering copy
        v = values(f)
        out[k] = v if flip is None else flip - v
    check_finite(out, path)
    info = {
        "modality": modality, "units": units, "positions": positions, "orientation": orientation,
        "spacing": spacing, "rescaled": found, "transfer_syntax": getattr(ts, "name", _as_str(ts)),
        "padding": padding, "sources": sources, "frame_of_reference": _uid(_safe_get(ds, "FrameOfReferenceUID")),
        "slice_thickness": _slice_thickness(ds),
    }
    return out, info


def _uid(value) -> str:
    """A DICOM UID as a string, or "" when missing or not a valid UID (digits and dots, at most 64)."""
    text = _as_str(value)
    parts = text.split(".")
    if not text or len(text) > 64 or not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts):
        return ""
    return text


def _source_images(ds, order, n: int) -> list:
    """Per slice (in slice order), the :class:`SourceImage` it was read from, or None without valid UIDs."""
    sop_class, sop_instance = _uid(_safe_get(ds, "SOPClassUID")), _uid(_safe_get(ds, "SOPInstanceUID"))
    if not sop_class or not sop_instance:
        return [None] * n
    return [SourceImage(sop_class, sop_instance, f + 1 if n > 1 else None) for f in order]


def _slice_thickness(ds) -> Optional[float]:
    """SliceThickness in mm: the top-level one, else the shared functional groups' (Enhanced CT/MR)."""
    raw = _safe_get(ds, "SliceThickness")
    if raw is None:
        item = _fg_item(ds, 0, "PixelMeasuresSequence")
        raw = _safe_get(item, "SliceThickness") if item is not None else None
    value = _floats([raw], 1) if raw is not None else None
    return value[0] if value is not None and value[0] > 0 else None


def _sort_order(positions, orientation, fallback_numbers, n) -> Optional[list[int]]:
    """Order along the slice normal; None if geometry is missing (caller falls back)."""
    normal = _normal(orientation)
    if normal is None or positions is None or any(p is None for p in positions):
        if fallback_numbers is not None and all(v is not None for v in fallback_numbers):
            return sorted(range(n), key=lambda i: (fallback_numbers[i], i))
        return None
    keys = [float(np.dot(normal, p)) for p in positions]
    return sorted(range(n), key=lambda i: (keys[i], i))


def _metadata(ds, n_slices: int, info: dict, source: Path, extra: Optional[dict] = None) -> dict:
    meta = {"Format": "DICOM"}
    for key in _METADATA_KEYS:
        value = _safe_get(ds, key)
        if value is not None:
            text = _as_str(value)
            if text:
                meta[key] = text[:200]
    sop = _safe_get(ds, "SOPClassUID")
    if sop is not None:
        meta["SOPClass"] = _as_str(getattr(sop, "name", sop))
    if info.get("transfer_syntax"):
        meta["TransferSyntax"] = _as_str(info["transfer_syntax"])
    meta["Slices"] = str(n_slices)
    if info.get("slice_thickness") is not None and "SliceThickness" not in meta:
        meta["SliceThickness"] = f"{info['slice_thickness']:g}"
    meta["Units"] = info["units"]
    meta["Rescaled"] = "yes" if info.get("rescaled") else "no"
    if info.get("padding"):
        meta["PixelDataPadding"] = f"{info['padding']} trailing bytes ignored"
    meta.update(extra or {})
    return meta


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ScanError(f"{display_name(path)}: cannot read file ({exc.strerror or exc})") from None


def read_dicom_file(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """One DICOM file (single- or multi-frame) as an image Scan."""
    path = Path(path)
    budget = ScanBudget(path, limits)
    budget.add_bytes("file", _file_size(path))  # pydicom holds the whole file, pixel data included
    ds = _dcmread(path, header_only=False)
    try:
        images, info = _decode(ds, path, budget)
        meta = _metadata(ds, images.shape[0], info, path)
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"{display_name(path)}: invalid DICOM image ({_short(exc)})") from None
    return Scan(
        kind="image", images=images, modality=info["modality"], source=str(path), units=info["units"],
        spacing=info["spacing"], positions=info["positions"], orientation=info["orientation"], metadata=meta,
        source_images=info["sources"], frame_of_reference_uid=info["frame_of_reference"],
    )


# -- folders and series ---------------------------------------------------------------------


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder (see :func:`list_series`)."""

    uid: str
    modality: str = ""
    description: str = ""
    number: str = ""
    rows: int = 0
    columns: int = 0
    files: list = field(default_factory=list)  #: file paths (str), unsorted

    @property
    def n_files(self) -> int:
        return len(self.files)

    def label(self) -> str:
        parts = [self.uid]
        details = ", ".join(
            x for x in (self.modality, f"#{self.number}" if self.number else "",
                        repr(self.description) if self.description else "",
                        f"{self.n_files} file{'s' if self.n_files != 1 else ''}",
                        f"{self.rows}x{self.columns}") if x
        )
        return f"{parts[0]} ({details})"


def _candidate_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or p.name.upper() == "DICOMDIR" or not p.is_file():
            continue
        files.append(p)
    return files


def _scan_headers(folder: Path):
    """(headers by file, skipped [(file, reason)]) for every DICOM image file under folder."""
    headers, skipped, non_image = [], [], []
    for p in _candidate_files(folder):
        try:
            plausible, _ = _has_preamble(p)
            if not plausible:
                continue
            ds = _dcmread(p, header_only=True)
        except ScanError as exc:
            skipped.append((p, str(exc)))
            continue
        if _safe_get(ds, "Rows") is None or _safe_get(ds, "Columns") is None:
            sop = _safe_get(ds, "SOPClassUID")
            non_image.append((p, _as_str(getattr(sop, "name", sop)) or "non-image object"))
            continue
        headers.append((p, ds))
    return headers, skipped, non_image


def _group(headers) -> dict[str, SeriesInfo]:
    groups: dict[str, SeriesInfo] = {}
    for p, ds in headers:
        uid = _as_str(_safe_get(ds, "SeriesInstanceUID")) or "<no SeriesInstanceUID>"
        info = groups.get(uid)
        if info is None:
            info = groups[uid] = SeriesInfo(
                uid=uid,
                modality=_as_str(_safe_get(ds, "Modality")),
                description=_as_str(_safe_get(ds, "SeriesDescription")),
                number=_as_str(_safe_get(ds, "SeriesNumber")),
                rows=_int(_safe_get(ds, "Rows"), 0),
                columns=_int(_safe_get(ds, "Columns"), 0),
            )
        info.files.append(str(p))
    return groups


def _series_sort_key(s: SeriesInfo):
    num = _int(s.number)
    return (num is None, num if num is not None else 0, s.uid)


def list_series(folder) -> list[SeriesInfo]:
    """The image series in a DICOM folder (searched recursively), ordered by SeriesNumber."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"{folder}: not a folder")
    headers, _, _ = _scan_headers(folder)
    return sorted(_group(headers).values(), key=_series_sort_key)


def read_dicom_folder(folder, *, series: Optional[str] = None, limits: Optional[ScanLimits] = None) -> Scan:
    """A DICOM series folder as one image Scan, slices sorted along the slice normal."""
    folder = Path(folder)
    name = display_name(folder)
    headers, skipped, non_image = _scan_headers(folder)
    if not headers:
        detail = ""
        if non_image:
            detail = f"; found only non-image objects ({', '.join(sorted({w for _, w in non_image}))})"
        elif skipped:
            detail = f"; {len(skipped)} unreadable file(s), e.g. {skipped[0][1]}"
        raise ScanError(f"{name}: no DICOM image files in this folder{detail}")
    groups = _group(headers)
    ordered = sorted(groups.values(), key=_series_sort_key)
    if series is not None:
        key = str(series).strip()
        chosen = [s for s in ordered if s.uid == key] or [s for s in ordered if s.number and s.number == key]
        if len(chosen) != 1:
            listing = "; ".join(s.label() for s in ordered)
            why = "matches several series" if chosen else "is not in this folder"
            raise ScanError(f"{name}: series '{key}' {why}; available: {listing}")
        info = chosen[0]
    elif len(ordered) > 1:
        listing = "; ".join(s.label() for s in ordered)
        raise ScanError(f"{name}: folder holds {len(ordered)} series, choose one with series=: {listing}")
    else:
        info = ordered[0]

    by_path = {str(p): ds for p, ds in headers}
    members = [(Path(f), by_path[f]) for f in info.files]

    # consistent slice size, size guard before decoding anything
    sizes = {(_int(_safe_get(ds, "Rows"), 0), _int(_safe_get(ds, "Columns"), 0)) for _, ds in members}
    if len(sizes) != 1:
        listing = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ScanError(f"{name}: series {info.uid} mixes image sizes ({listing})")
    rows, cols = sizes.pop()
    total_frames = sum(max(1, _int(_safe_get(ds, "NumberOfFrames", 1), 1) or 1) for _, ds in members)
    limits = limits if limits is not None else ScanLimits.resolve()
    series_budget = ScanBudget(folder, limits)
    series_budget.add("series", (total_frames, rows, cols), 4)  # the float32 stack
    # plus the costliest file while it is decoded (files are decoded one at a time)
    costliest = 0
    for p, ds in members:
        frames = max(1, _int(_safe_get(ds, "NumberOfFrames", 1), 1) or 1)
        spp = _int(_safe_get(ds, "SamplesPerPixel", 1), 1) or 1
        one_file = ScanBudget(p, limits)
        one_file.add_bytes("file", _file_size(p))
        _pixel_budget(ds, p, one_file, frames, rows, cols, spp if spp in (1, 3, 4) else 1)
        costliest = max(costliest, one_file.total)
    series_budget.add_bytes("decoding its largest file", costliest)

    # sort files: position along the normal, else InstanceNumber, else file name
    first_orientation = _floats(_safe_get(members[0][1], "ImageOrientationPatient"), 6)
    positions = [_floats(_safe_get(ds, "ImagePositionPatient"), 3) for _, ds in members]
    numbers = [_int(_safe_get(ds, "InstanceNumber")) for _, ds in members]
    order = _sort_order(positions, first_orientation, numbers, len(members))
    sort_by = "position" if order is not None and _normal(first_orientation) is not None and all(
        p is not None for p in positions) else ("InstanceNumber" if order is not None else "file name")
    if order is None:
        order = sorted(range(len(members)), key=lambda i: members[i][0].name)
    members = [members[i] for i in order]

    stack = np.empty((total_frames, rows, cols), dtype=np.float32)
    all_positions: list = []
    all_sources: list = []
    first_info = None
    k = 0
    for p, _ in members:
        one_file = ScanBudget(p, limits)
        one_file.add_bytes("file", _file_size(p))
        ds = _dcmread(p, header_only=False)
        try:
            frames, finfo = _decode(ds, p, one_file)
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{display_name(p)}: invalid DICOM image ({_short(exc)})") from None
        if frames.shape[1:] != (rows, cols):
            raise ScanError(f"{display_name(p)}: decoded size {frames.shape[1:]} differs from the series")
        stack[k:k + frames.shape[0]] = frames
        k += frames.shape[0]
        fpos = finfo["positions"]
        all_positions.extend(fpos if fpos is not None else [None] * frames.shape[0])
        all_sources.extend(finfo["sources"])
        if first_info is None:
            first_info, first_ds = finfo, ds
    stack = stack[:k]
    meta = _metadata(first_ds, k, first_info, folder, extra={
        "Files": str(len(members)), "SliceOrder": sort_by,
        **({"SkippedFiles": str(len(skipped))} if skipped else {}),
    })
    return Scan(
        kind="image", images=stack, modality=first_info["modality"], source=str(folder),
        units=first_info["units"], spacing=first_info["spacing"],
        positions=all_positions if any(p is not None for p in all_positions) else None,
        orientation=first_info["orientation"], metadata=meta,
        source_images=all_sources, frame_of_reference_uid=first_info["frame_of_reference"],
    )
