"""Open any supported scan: the format is chosen from the suffix or the first bytes, then its reader runs.

The readers (:mod:`engine.data.dicom`, :mod:`engine.data.hdf5`,
:mod:`engine.data.volumes`) build :class:`~engine.data.scans.Scan` objects and
know nothing of each other; this module is the only one that knows them all,
so the data layer has no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from engine.data.scans import (
    DICOM_SUFFIXES,
    HDF5_SUFFIXES,
    INV3_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Scan,
    ScanLimits,
    display_name,
    read_head,
)
from engine.errors import ScanError


# -- dispatch -------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _sniff(path: Path) -> str:
    """Guess the format of a file with an unknown extension from its first bytes."""
    head = read_head(path, 512)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.startswith(b"\x89PNG") or head[:4] in (b"II*\x00", b"MM\x00*") or head.startswith(b"\xff\xd8"):
        return "pil"
    if head.startswith(b"BM"):
        return "pil"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        # gzip: a .nii.gz or an .inv3 (gzipped tar)
        import gzip

        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(512)
        except (OSError, EOFError):
            return "unknown"
        if len(inner) >= 348 and inner[344:348] in (b"n+1\x00", b"ni1\x00"):
            return "nifti"
        if len(inner) >= 262 and inner[257:262] == b"ustar":
            return "inv3"
        return "unknown"
    from engine.data.dicom import looks_like_dicom_without_preamble

    if looks_like_dicom_without_preamble(head):
        return "dicom"
    return "unknown"


def load_scan(path, *, series: Optional[str] = None, max_bytes: Optional[int] = None,
              max_voxels: Optional[int] = None) -> Scan:
    """Load a scan file or DICOM series folder as a :class:`Scan`.

    ``series`` picks one SeriesInstanceUID (or SeriesNumber) in a DICOM folder
    holding several series. ``max_bytes`` replaces the memory limit per file
    (default ``$EQUIDEQ_MAX_SCAN_BYTES``, else :data:`MAX_SCAN_BYTES`);
    ``max_voxels`` adds a cap on the element count of any one array.
    Raises :class:`ScanError` for anything that cannot be read as asked
    (:class:`~engine.errors.ConfigError` for an unreadable limit setting).
    """
    if path is None or str(path) == "":
        raise ScanError("no scan path given")
    limits = ScanLimits.resolve(max_bytes, max_voxels)
    p = Path(path).expanduser()
    if not p.exists():
        raise ScanError(f"{p}: no such file or folder")
    try:
        scan = _dispatch(p, series, limits)
    except ScanError as exc:
        text = str(exc)
        if "\n" in text:  # keep the promise of one-line messages
            raise ScanError(" ".join(text.split())) from None
        raise
    except MemoryError:
        raise ScanError(f"{display_name(p)}: not enough memory to load this scan") from None
    except Exception as exc:  # a reader bug or an exotic library failure: still one line
        text = " ".join(str(exc).split())[:300]
        raise ScanError(f"{display_name(p)}: cannot be read ({type(exc).__name__}: {text})") from None
    if scan.kind == "image" and scan.images is not None:
        flat = scan.images.reshape(scan.images.shape[0], -1)
        constant = int(np.count_nonzero(flat.max(axis=1) == flat.min(axis=1)))
        if constant:
            scan.metadata["ConstantSlices"] = f"{constant} of {flat.shape[0]}"
    return scan


def _dispatch(p: Path, series, limits: ScanLimits) -> Scan:
    if p.is_dir():
        from engine.data.dicom import read_dicom_folder

        return read_dicom_folder(p, series=series, limits=limits)
    if not p.is_file():
        raise ScanError(f"{p}: not a regular file")

    suffix = _suffix(p)
    if suffix in DICOM_SUFFIXES:
        fmt = "dicom"
    elif suffix in HDF5_SUFFIXES:
        fmt = "hdf5"
    elif suffix == ".npy":
        fmt = "npy"
    elif suffix == ".npz":
        fmt = "npz"
    elif suffix in PIL_SUFFIXES:
        fmt = "pil"
    elif suffix in NIFTI_SUFFIXES:
        fmt = "nifti"
    elif suffix in INV3_SUFFIXES:
        fmt = "inv3"
    else:
        fmt = _sniff(p)

    if fmt == "dicom":
        from engine.data.dicom import read_dicom_file

        return read_dicom_file(p, limits=limits)
    if fmt == "hdf5":
        from engine.data.hdf5 import read_hdf5  # h5py only when an HDF5 file is opened

        return read_hdf5(p, limits=limits)
    import engine.data.volumes as volumes

    readers = {"npy": volumes.read_npy, "npz": volumes.read_npz, "pil": volumes.read_pil,
               "nifti": volumes.read_nifti, "inv3": volumes.read_inv3}
    if fmt in readers:
        return readers[fmt](p, limits=limits)
    known = ", ".join(SUPPORTED_SUFFIXES)
    raise ScanError(f"{display_name(p)}: unrecognised file format (supported: {known}, or a DICOM folder)")
