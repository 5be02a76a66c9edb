"""The :class:`Scan` model and :func:`load_scan`, the one entry point for scan files.

``load_scan`` dispatches on the file extension (and, for unknown extensions, on
the first bytes of the file) to the format readers:

* DICOM file (``.dcm``/``.dicom``/``.ima`` or sniffed) or series folder -> :mod:`engine.data.dicom`
* HDF5 (``.h5``/``.hdf5``/``.hdf``: fastMRI, sinogram, deepinv, plain) -> :mod:`engine.data.hdf5`
* ``.npy``/``.npz``, PNG/TIFF/JPEG/BMP, NIfTI (``.nii``/``.nii.gz``),
  InVesalius ``.inv3`` -> :mod:`engine.data.volumes`

Every failure a file can cause surfaces as :class:`~engine.errors.ScanError`
with a one-line message naming the file and the problem; no reader lets a raw
third-party exception escape.

Sizes are checked from headers *before* anything is decompressed or read: each
reader adds up the bytes it will allocate for one file (the arrays as stored,
times their item size and channels, decompressed; plus the float32/complex64
copies it converts them to) and refuses the file when the sum is above
:data:`MAX_SCAN_BYTES` (1 GiB). The limit is raised or lowered with the
environment variable ``EQUIDEQ_MAX_SCAN_BYTES`` (e.g. ``4GiB``) or per call with
``load_scan(..., max_bytes=)``; see ``docs/limits.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from engine.errors import ConfigError, ScanError

__all__ = [
    "Scan",
    "SourceImage",
    "ScanBudget",
    "ScanLimits",
    "load_scan",
    "MAX_SCAN_BYTES",
    "MAX_SCAN_BYTES_ENV",
    "MAX_VOXELS",
    "SCAN_KINDS",
    "SUPPORTED_SUFFIXES",
]

#: Default upper bound on the bytes a reader allocates for one scan file (1 GiB): a bad or
#: hostile file (a zip bomb, a header claiming a huge float64 or RGB volume) costs at most this.
MAX_SCAN_BYTES = 2**30
#: Environment variable that replaces :data:`MAX_SCAN_BYTES`, e.g. ``EQUIDEQ_MAX_SCAN_BYTES=4GiB``.
MAX_SCAN_BYTES_ENV = "EQUIDEQ_MAX_SCAN_BYTES"
#: Elements of a float32 volume at the default byte limit. Kept for callers that imported it;
#: the byte limit is what is enforced (``max_voxels=`` adds an element cap on request).
MAX_VOXELS = MAX_SCAN_BYTES // 4

SCAN_KINDS = ("image", "kspace", "sinogram")

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
NUMPY_SUFFIXES = (".npy", ".npz")
PIL_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
INV3_SUFFIXES = (".inv3",)

#: Every suffix :func:`load_scan` knows (folders are read as DICOM series).
SUPPORTED_SUFFIXES = (
    DICOM_SUFFIXES + HDF5_SUFFIXES + NUMPY_SUFFIXES + PIL_SUFFIXES + NIFTI_SUFFIXES + INV3_SUFFIXES
)


@dataclass(frozen=True)
class SourceImage:
    """The DICOM instance (and frame) one slice was read from: what an image derived from it names.

    Three short strings per slice, so a scan of thousands of slices keeps a few
    hundred kilobytes of them and never the DICOM datasets themselves.
    """

    sop_class_uid: str  #: SOPClassUID of the instance (e.g. CT Image Storage)
    sop_instance_uid: str  #: its SOPInstanceUID
    frame: Optional[int] = None  #: 1-based frame number within a multi-frame instance, None for single-frame


@dataclass
class Scan:
    """A loaded scan: image-domain slices or raw measurements plus display metadata.

    Exactly one of ``images`` (kind ``"image"``), ``kspace`` (``"kspace"``) or
    ``sinogram`` (``"sinogram"``) holds the data.
    """

    kind: str  #: "image" | "kspace" | "sinogram"
    images: Optional[np.ndarray] = None  #: float32 [slices, H, W]; CT in HU when known
    kspace: Optional[np.ndarray] = None  #: complex64 [slices, coils, H, W]
    mask: Optional[np.ndarray] = None  #: k-space sampling mask [H, W] or [W]
    sinogram: Optional[np.ndarray] = None  #: float32 [slices, views, detectors]
    angles: Optional[np.ndarray] = None  #: projection angles in degrees
    reference: Optional[np.ndarray] = None  #: optional reference images [slices, H, W]
    modality: str = "unknown"  #: "ct" | "mri" | "unknown"
    source: str = ""  #: file or folder path
    units: str = "arbitrary"  #: "HU" | "magnitude" | "arbitrary"
    spacing: Optional[tuple] = None  #: (row, col) pixel spacing in mm
    positions: Optional[list] = None  #: per-slice ImagePositionPatient
    orientation: Optional[tuple] = None  #: ImageOrientationPatient (6 direction cosines)
    metadata: dict = field(default_factory=dict)  #: str -> str, for the GUI info panel
    #: per slice, the DICOM instance it came from (None for a slice whose file has no UIDs); DICOM scans only
    source_images: Optional[list] = None
    frame_of_reference_uid: str = ""  #: DICOM FrameOfReferenceUID of ``positions`` / ``orientation``

    @property
    def data(self) -> np.ndarray:
        """The array that holds this scan's data (images, kspace or sinogram)."""
        arr = {"image": self.images, "kspace": self.kspace, "sinogram": self.sinogram}.get(self.kind)
        if arr is None:
            raise ScanError(f"{self.source or 'scan'}: kind '{self.kind}' has no data")
        return arr

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of one image / k-space slice, or (views, detectors) of a sinogram."""
        return tuple(int(s) for s in self.data.shape[-2:])

    def summary(self) -> str:
        """One line for logs and status bars."""
        shape = "x".join(str(s) for s in self.data.shape)
        name = os.path.basename(str(self.source).rstrip("/\\")) or "scan"
        return f"{name}: {self.kind} {shape} ({self.modality}, {self.units})"


# -- helpers shared by the readers --------------------------------------------------------


def display_name(path) -> str:
    """The short name used in messages (file name, or folder name for a series)."""
    p = Path(path)
    return p.name or str(p)


def read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (for format sniffing); a one-line ScanError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise ScanError(f"{display_name(path)}: cannot read file ({exc.strerror or exc})") from None


_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,  # as ulimit and numfmt --from=iec read them
}


def parse_byte_size(text: str, setting: str = MAX_SCAN_BYTES_ENV) -> int:
    """``"4GiB"`` or ``"4G"`` -> 4294967296; a plain number is bytes; KB/MB/GB/TB are powers of 1000."""
    raw = str(text).strip()
    number = raw.rstrip("bBkKmMgGtTiI ")
    unit = raw[len(number):].strip().lower()
    try:
        value = float(number.replace("_", "")) * _BYTE_UNITS[unit]
    except (KeyError, ValueError):
        value = float("nan")
    if not (value >= 1 and value < 2**63):  # also refuses NaN
        raise ConfigError(
            f"{setting}={raw!r} is not a size in bytes (e.g. 2147483648, 2GiB or 1500MB)"
        )
    return int(value)


def format_bytes(n: int) -> str:
    """``2147483648`` -> ``"2,147,483,648 bytes (2.0 GiB)"`` for messages."""
    n = int(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


@dataclass(frozen=True)
class ScanLimits:
    """The size limits in force for one :func:`load_scan` call."""

    max_bytes: int = MAX_SCAN_BYTES  #: bytes a reader may allocate for one file
    max_voxels: Optional[int] = None  #: optional extra cap on the elements of any one array
    #: the end of every size message: where the limit came from and how to raise it
    how_to_raise: str = f"raise it with the environment variable {MAX_SCAN_BYTES_ENV}, e.g. {MAX_SCAN_BYTES_ENV}=4GiB"

    @classmethod
    def resolve(cls, max_bytes: Optional[int] = None, max_voxels: Optional[int] = None) -> "ScanLimits":
        """``max_bytes`` if given, else ``$EQUIDEQ_MAX_SCAN_BYTES``, else :data:`MAX_SCAN_BYTES`."""
        voxels = None if max_voxels is None else int(max_voxels)
        if max_bytes is not None:
            limit = int(max_bytes)
            if limit < 1:
                raise ConfigError(f"max_bytes={max_bytes!r} must be a positive number of bytes")
            return cls(limit, voxels, "the limit passed as max_bytes=; pass a larger one to read this file")
        env = os.environ.get(MAX_SCAN_BYTES_ENV, "").strip()
        if env:
            return cls(parse_byte_size(env), voxels, f"the limit set by {MAX_SCAN_BYTES_ENV}={env}; raise it there")
        return cls(MAX_SCAN_BYTES, voxels)


def _element_count(shape, source, what: str) -> tuple[tuple, int]:
    """(dims, product) of a header's shape; ScanError for invalid, negative or empty shapes."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ScanError(f"{display_name(source)}: {what} has an invalid shape {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ScanError(f"{display_name(source)}: {what} has a negative dimension {dims}")
    total = 1
    for d in dims:
        total *= d
    if total == 0:
        raise ScanError(f"{display_name(source)}: {what} is empty (shape {dims})")
    return dims, total


class ScanBudget:
    """The bytes a reader will allocate for one file, added up from headers before reading.

    Every array a reader materialises is announced with :meth:`add` (its element
    count times the bytes per element it costs: item size x channels as stored,
    plus any converted copy); the running total is refused, with a one-line
    ScanError naming the file and the limit, as soon as it exceeds
    ``limits.max_bytes``. Nothing has been allocated at that point.
    """

    def __init__(self, source, limits: Optional[ScanLimits] = None, measure: str = "of memory"):
        self.source = source
        self.limits = limits if limits is not None else ScanLimits.resolve()
        self.measure = measure  #: what is counted, for messages: "of memory" or "decompressed"
        self.total = 0

    def add(self, what: str, shape, bytes_per_element: float, fixed_bytes: int = 0) -> int:
        """Count ``prod(shape) * bytes_per_element + fixed_bytes``; return the element count."""
        dims, count = _element_count(shape, self.source, what)
        limit = self.limits.max_voxels
        if limit is not None and count > limit:
            raise ScanError(
                f"{display_name(self.source)}: {what} of shape {dims} has {count:,} elements, "
                f"more than the limit of {limit:,}"
            )
        self.add_bytes(what, int(count * bytes_per_element) + int(fixed_bytes), dims)
        return count

    def add_bytes(self, what: str, nbytes: int, dims=None) -> None:
        """Count ``nbytes`` for ``what`` (an archive member, a whole file read into memory)."""
        self.total += max(0, int(nbytes))
        if self.total <= self.limits.max_bytes:
            return
        shape = f" of shape {dims}" if dims is not None else ""
        so_far = "" if self.total == nbytes else f", {format_bytes(self.total)} for this file in all"
        raise ScanError(
            f"{display_name(self.source)}: {what}{shape} needs {format_bytes(nbytes)} {self.measure}{so_far}, "
            f"more than the limit of {format_bytes(self.limits.max_bytes)} per scan file "
            f"({self.limits.how_to_raise})"
        )


#: Elements per block when scanning an array for NaN/Inf: bounds the boolean temporary to 4 MiB.
_FINITE_BLOCK = 1 << 22


def _blocks(arr: np.ndarray):
    """Views of ``arr`` along its first axis of about :data:`_FINITE_BLOCK` elements each."""
    if arr.ndim == 0:
        yield arr
        return
    per_row = max(1, arr.size // max(1, arr.shape[0]))
    step = max(1, _FINITE_BLOCK // per_row)
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def check_finite(arr: np.ndarray, source, what: str = "image data") -> None:
    """ScanError when ``arr`` contains NaN or Inf."""
    if arr.size == 0:
        raise ScanError(f"{display_name(source)}: {what} is empty")
    if not np.issubdtype(arr.dtype, np.inexact):
        return
    # block by block: a whole-array isfinite() would allocate another arr.size bytes
    if all(np.isfinite(block).all() for block in _blocks(arr)):
        return
    kind = "NaN" if any(np.isnan(block).any() for block in _blocks(arr)) else "Inf"
    raise ScanError(f"{display_name(source)}: {what} contains {kind} values (not allowed)")


def as_image_stack(arr: np.ndarray, source, what: str = "image data") -> np.ndarray:
    """A real 2-D or 3-D array as float32 ``[slices, H, W]``, checked for size and finiteness."""
    arr = np.asarray(arr)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ScanError(f"{display_name(source)}: {what} has unsupported dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ScanError(f"{display_name(source)}: {what} is complex; expected real images")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ScanError(
            f"{display_name(source)}: {what} has shape {arr.shape}; expected [H, W] or [slices, H, W]"
        )
    if arr.size == 0:
        raise ScanError(f"{display_name(source)}: {what} is empty (shape {arr.shape})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite(out, source, what)
    return out


def as_kspace(arr: np.ndarray, source, what: str = "k-space") -> np.ndarray:
    """Complex k-space as complex64 ``[slices, coils, H, W]`` ([H,W] / [S,H,W] get unit axes)."""
    arr = np.asarray(arr)
    if not np.iscomplexobj(arr):
        raise ScanError(f"{display_name(source)}: {what} has real dtype {arr.dtype}; expected complex")
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ScanError(
            f"{display_name(source)}: {what} has shape {arr.shape}; expected [H, W], "
            "[slices, H, W] or [slices, coils, H, W]"
        )
    out = np.ascontiguousarray(arr, dtype=np.complex64)
    check_finite(out, source, what)
    return out


def image_scan(images, source, *, modality="unknown", units="arbitrary", metadata=None, **kw) -> Scan:
    """Build a kind="image" Scan with standard metadata filled in."""
    images = as_image_stack(images, source)
    meta = {"Format": "", "Slices": str(images.shape[0]), "Rows": str(images.shape[1]),
            "Columns": str(images.shape[2])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return Scan(kind="image", images=images, modality=modality, source=str(source), units=units,
                metadata=meta, **kw)
