"""Readers for array and volume files: NumPy, PNG/TIFF (Pillow), NIfTI and InVesalius ``.inv3``.

All of them add up, from the header, the bytes they will allocate (the data as
stored, decompressed, plus the float32/complex64 copy they convert it to) and
refuse the file above the limit (:class:`~engine.data.scans.ScanBudget`) before
reading pixel data; they never unpickle anything (``allow_pickle=False``; plists via :mod:`plistlib`),
and return an image :class:`~engine.data.scans.Scan` (NumPy files holding
complex data give a k-space Scan).

InVesalius ``.inv3`` layout (found in the real ``Cranium.inv3``)
    A gzipped tar with one folder holding ``main.plist`` (XML plist) plus
    ``matrix.dat`` and mask/surface files. ``main.plist`` has
    ``matrix = {filename: "matrix.dat", dtype: "int16", shape: [slices, rows, cols]}``,
    ``spacing = [x, y, z]`` in mm, ``modality`` (e.g. "CT"), ``scalar_range``,
    ``window_level``/``window_width``, ``name``, ``masks``, ``surfaces``.
    ``matrix.dat`` is the raw C-order little-endian volume (a NumPy memmap dump,
    no header) in Hounsfield units for CT. InVesalius displays it through VTK,
    whose image origin is bottom-left, so rows are flipped here to the usual
    top-down display orientation (anterior at the top for axial CT).

NIfTI modality
    Only what the header says: its ``intent_name``, ``descrip`` or ``aux_file``
    naming CT or an MR sequence (:func:`_nifti_modality`). Otherwise the
    modality is "unknown" -- values that look like Hounsfield units are noted in
    ``metadata["ModalityHint"]`` but never taken as CT. A header that says CT
    gives units "HU" when the values reach air (below -500).

NIfTI orientation
    The volume is reoriented to the closest canonical RAS+ orientation and every
    axial slice (last axis, inferior to superior) is shown in radiological
    convention: anterior at the top, patient right on the image left — the same
    way a standard axial DICOM is displayed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import plistlib
import re
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from engine.data.scans import (Scan, ScanBudget, ScanLimits, as_image_stack, as_kspace, check_finite, display_name,
                               image_scan)
from engine.errors import ScanError

__all__ = ["read_npy", "read_npz", "read_pil", "read_nifti", "read_inv3"]

_INV3_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")


# -- NumPy ----------------------------------------------------------------------------------


def _npy_header(fp, source, what):
    """(shape, fortran_order, dtype) from an .npy stream without reading the data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            shape, fortran, dtype = fmt._read_array_header(fp, version)
    except Exception as exc:
        raise ScanError(f"{display_name(source)}: {what} is not a valid .npy array ({str(exc)[:160]})") from None
    if dtype.hasobject:
        raise ScanError(f"{display_name(source)}: {what} holds Python objects; refusing to unpickle")
    return tuple(shape), fortran, dtype


def _array_scan(arr: np.ndarray, source, fmt: str, extra=None) -> Scan:
    """A 2-D/3-D real array -> images; complex 2-D/3-D/4-D -> k-space."""
    if np.iscomplexobj(arr):
        kspace = as_kspace(arr, source)
        meta = {"Format": fmt, "Slices": str(kspace.shape[0]), "Coils": str(kspace.shape[1]),
                "Rows": str(kspace.shape[2]), "Columns": str(kspace.shape[3])}
        meta.update(extra or {})
        return Scan(kind="kspace", kspace=kspace, source=str(source), modality="mri",
                    units="magnitude", metadata=meta)
    if arr.dtype.kind not in "biuf":
        raise ScanError(f"{display_name(source)}: array dtype {arr.dtype} is not numeric")
    scan = image_scan(arr, source, metadata={"Format": fmt, **(extra or {})})
    return scan


def _copy_itemsize(dtype: np.dtype, fortran: bool = False) -> int:
    """Bytes per element of the float32 / complex64 copy :func:`_array_scan` makes (0: none)."""
    target = np.dtype(np.complex64 if dtype.kind == "c" else np.float32)
    return 0 if dtype == target and not fortran else target.itemsize


def _require_numeric(dtype: np.dtype, source, what: str) -> None:
    """Refuse strings, bytes and records from the header, before their data is read."""
    if dtype.kind not in "biufc":
        raise ScanError(f"{display_name(source)}: {what} dtype {dtype} is not numeric")


def read_npy(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """A ``.npy`` file: real [H,W]/[S,H,W] -> images, complex -> k-space."""
    path = Path(path)
    budget = ScanBudget(path, limits)
    with open(path, "rb") as fp:
        shape, fortran, dtype = _npy_header(fp, path, "file")
        _require_numeric(dtype, path, "array")
        count = budget.add("array", shape, dtype.itemsize + _copy_itemsize(dtype, fortran))
        need = fp.tell() + count * dtype.itemsize
    if path.stat().st_size < need:
        raise ScanError(f"{display_name(path)}: file is truncated ({path.stat().st_size:,} of {need:,} bytes)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ScanError(f"{display_name(path)}: cannot read .npy array ({str(exc)[:160]})") from None
    return _array_scan(arr, path, "NumPy .npy")


def read_npz(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """A ``.npz`` archive.

    Recognised keys: ``kspace`` (+ ``mask``, ``reference``), ``sinogram`` (+ ``angles``
    in degrees), ``images``/``image``/``data``; otherwise a single array is used.
    The memory counted is the decompressed size of every array in the archive
    (from each member's .npy header) plus the converted copies of those loaded.
    """
    path = Path(path)
    name = display_name(path)
    budget = ScanBudget(path, limits)
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:
        raise ScanError(f"{name}: not a valid .npz archive ({str(exc)[:160]})") from None
    headers = {}
    with zf:
        try:
            members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            for info in members:
                key = info.filename[:-4]
                with zf.open(info) as fp:  # decompresses the header only
                    shape, fortran, dtype = _npy_header(fp, path, f"array '{key}'")
                    offset = fp.tell()
                count = budget.add(f"array '{key}'", shape, dtype.itemsize)
                need = offset + count * dtype.itemsize
                if info.file_size < need:
                    raise ScanError(f"{name}: array '{key}' is truncated ({info.file_size:,} of {need:,} bytes)")
                headers[key] = (shape, fortran, dtype)
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{name}: corrupt .npz archive ({type(exc).__name__}: {str(exc)[:160]})") from None
    keys = sorted(headers)
    if not keys:
        raise ScanError(f"{name}: the .npz archive holds no arrays")

    def plan(key, copy_itemsize=None):
        """Count the converted copy of ``key`` (float32/complex64 unless given) before loading it."""
        shape, fortran, dtype = headers[key]
        _require_numeric(dtype, path, f"array '{key}'")
        extra = _copy_itemsize(dtype, fortran) if copy_itemsize is None else copy_itemsize
        budget.add(f"array '{key}' (converted)", shape, extra)

    def load(key):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return np.asarray(npz[key])
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{name}: cannot read array '{key}' ({type(exc).__name__}: {str(exc)[:160]})") from None

    if "kspace" in headers:
        plan("kspace")
        if "mask" in headers:
            plan("mask", 4)  # always copied to float32
        if "reference" in headers:
            plan("reference")
        scan = _array_scan(load("kspace"), path, "NumPy .npz")
        if scan.kind != "kspace":
            raise ScanError(f"{name}: array 'kspace' is real; expected complex k-space")
        if "mask" in headers:
            mask = load("mask").astype(np.float32)
            h, w = scan.kspace.shape[-2:]
            if not ((mask.ndim == 1 and mask.shape[0] == w) or (mask.ndim == 2 and mask.shape == (h, w))):
                raise ScanError(f"{name}: mask of shape {mask.shape} does not fit k-space slices {h} x {w}")
            scan.mask = mask
        if "reference" in headers:
            scan.reference = as_image_stack(load("reference"), path, "reference")
        return scan
    if "sinogram" in headers:
        plan("sinogram")
        if "angles" in headers:
            plan("angles", 8)  # always copied to float64
        sino = load("sinogram")
        if np.iscomplexobj(sino) or sino.ndim not in (2, 3):
            raise ScanError(f"{name}: 'sinogram' has shape {sino.shape}; expected real [slices, views, detectors]")
        sino = as_image_stack(sino, path, "sinogram")
        views = sino.shape[1]
        meta = {"Format": "NumPy .npz (sinogram)", "Slices": str(sino.shape[0]), "Views": str(views),
                "Detectors": str(sino.shape[2])}
        if "angles" in headers:
            angles = load("angles").astype(np.float64).reshape(-1)
            if angles.shape[0] != views or not np.isfinite(angles).all():
                raise ScanError(f"{name}: 'angles' must hold {views} finite values (got {angles.shape[0]})")
        else:
            angles = np.linspace(0.0, 180.0, views, endpoint=False)
            meta["AnglesAssumed"] = "uniform 0-180 degrees"
        return Scan(kind="sinogram", sinogram=sino, angles=angles, modality="ct", source=str(path), metadata=meta)
    for key in ("images", "image", "data"):
        if key in headers:
            plan(key)
            return _array_scan(load(key), path, "NumPy .npz", {"Array": key})
    if len(keys) == 1:
        plan(keys[0])
        return _array_scan(load(keys[0]), path, "NumPy .npz", {"Array": keys[0]})
    raise ScanError(
        f"{name}: cannot tell which array to load; found keys [{', '.join(keys)}]; expected 'images', "
        "'image', 'data', 'kspace' (+ 'mask') or 'sinogram' (+ 'angles'), or a single array"
    )


# -- Pillow ---------------------------------------------------------------------------------


def _pil_core_bytes(mode: str) -> int:
    """Bytes per pixel Pillow holds for a decoded page: 1 for 1/L/P, 2 for I;16*, else 4
    (Pillow stores I, F and every multi-band mode, RGB included, in 32 bits per pixel)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _pil_page_bytes(mode: str) -> int:
    """Bytes per pixel of one page in memory while it is converted: Pillow's copy, NumPy's, temporaries."""
    core = _pil_core_bytes(mode)
    if mode in ("RGB", "RGBA", "RGBX"):
        return core + 4  # + the NumPy copy (up to 4 bands of uint8); luma is computed in row blocks
    if mode in ("I", "F", "L") or mode.startswith("I;16"):
        return core + core  # + the NumPy copy
    return core + 1 + 1  # convert("L"): Pillow's 8-bit copy + NumPy's


#: Rows per block when turning RGB into luma: bounds the float64 temporary to a few MiB.
_LUMA_ROWS_BYTES = 1 << 23


def _pil_frame_into(img, out: np.ndarray, source) -> str:
    """Write the current page of ``img`` as gray float32 into ``out`` [H, W]; return its sample type."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16, copy=False)
    elif mode in ("I", "F", "L"):
        arr = np.asarray(img)
    elif mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(img)
        if rgb.ndim != 3 or rgb.shape[:2] != out.shape:
            raise ScanError(f"{display_name(source)}: unexpected image shape {rgb.shape}")
        weights = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, in float64 as before
        rows = max(1, _LUMA_ROWS_BYTES // max(1, rgb.shape[1] * 3 * 8))
        for r in range(0, rgb.shape[0], rows):
            out[r:r + rows] = rgb[r:r + rows, :, :3].astype(np.float64) @ weights
        return str(rgb.dtype)
    elif mode in ("1", "P", "PA", "LA", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("L"))
    else:
        raise ScanError(f"{display_name(source)}: unsupported image mode {mode!r}")
    if arr.shape != out.shape:
        raise ScanError(f"{display_name(source)}: unexpected image shape {arr.shape}")
    out[...] = arr
    return str(arr.dtype)


def _pil_bomb_error(name: str):
    from PIL import Image

    cap = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0
    return ScanError(
        f"{name}: image has more than {cap:,} pixels, Pillow's decompression-bomb limit "
        "(2 x PIL.Image.MAX_IMAGE_PIXELS); refused before decoding"
    )


def read_pil(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """PNG / TIFF / JPEG / BMP as grayscale images (16-bit kept); multi-page TIFF -> slices.

    The size is checked from the header (width x height x pages, and the bytes per
    pixel of the mode) before any page is decoded. Pillow's own pixel-count guard
    stays in force: its warning is superseded by this byte check, its error
    (above 2 x ``PIL.Image.MAX_IMAGE_PIXELS``) becomes a one-line ScanError.
    """
    from PIL import Image

    path = Path(path)
    name = display_name(path)
    budget = ScanBudget(path, limits)
    with warnings.catch_warnings():  # Pillow warns on odd EXIF/metadata; errors still raise
        warnings.simplefilter("ignore")
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise _pil_bomb_error(name) from None
        except Exception as exc:
            raise ScanError(f"{name}: not a readable image ({type(exc).__name__}: {str(exc)[:160]})") from None
        try:
            with img:
                n = int(getattr(img, "n_frames", 1) or 1)
                w, h = img.size
                mode = img.mode
                budget.add("image", (n, h, w), 4)  # the float32 stack
                page_bytes = _pil_page_bytes(mode)
                budget.add("one decoded page", (h, w), page_bytes)
                stack = np.empty((n, h, w), dtype=np.float32)
                sample = ""
                for i in range(n):
                    img.seek(i)
                    if img.size != (w, h):
                        raise ScanError(f"{name}: page {i} is {img.size[1]} x {img.size[0]} but page 0 is {h} x {w}")
                    if _pil_page_bytes(img.mode) > page_bytes:  # a later page in a costlier mode
                        budget.add(f"page {i} ({img.mode})", (h, w), _pil_page_bytes(img.mode) - page_bytes)
                        page_bytes = _pil_page_bytes(img.mode)
                    img.load()
                    page_sample = _pil_frame_into(img, stack[i], path)
                    sample = sample or page_sample
                fmt = img.format or "image"
        except ScanError:
            raise
        except Image.DecompressionBombError:
            raise _pil_bomb_error(name) from None
        except Exception as exc:
            raise ScanError(f"{name}: corrupt or truncated image ({type(exc).__name__}: {str(exc)[:160]})") from None
    return image_scan(stack, path, metadata={"Format": fmt, "Mode": mode, "BitDepth": sample})


# -- NIfTI ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs header fix-ups of odd files to stderr; keep the console clean while reading."""
    logger = logging.getLogger("nibabel")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def read_nifti(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """NIfTI-1/2 (``.nii`` / ``.nii.gz``) via nibabel; axial slices in radiological display.

    The memory needed is worked out from the header alone (dims x bitpix, of the
    first volume) before a byte of the data, gzipped or not, is decompressed.
    """
    path = Path(path)
    name = display_name(path)
    budget = ScanBudget(path, limits)
    try:
        import nibabel as nib
    except ImportError:
        raise ScanError(f"{name}: reading NIfTI needs nibabel (pip install nibabel)") from None
    try:
        with warnings.catch_warnings(), _quiet_nibabel():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))  # reads the header only
            shape = tuple(int(s) for s in img.shape)
            stored = np.dtype(img.get_data_dtype())
            slope, inter = float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))
            scaled = (slope, inter) != (1.0, 0.0)
    except Exception as exc:
        raise ScanError(f"{name}: not a readable NIfTI file ({type(exc).__name__}: {str(exc)[:160]})") from None
    if len(shape) < 2 or len(shape) > 5:
        raise ScanError(f"{name}: NIfTI image has {len(shape)} dimensions; expected 2 to 4")
    extra = {}
    if len(shape) >= 4:
        if any(s > 1 for s in shape[4:]):
            raise ScanError(f"{name}: NIfTI image of shape {shape} has more than 4 dimensions")
        if shape[3] > 1:
            extra["Volumes"] = f"{shape[3]} (first one loaded)"
    if stored.kind not in "biufc":
        raise ScanError(f"{name}: NIfTI data type {stored} is not supported")
    # the data as stored (decompressed), nibabel's float64 result when scl_slope/inter apply,
    # the magnitude of complex data, and the reoriented float32 copy
    per_voxel = stored.itemsize + (8 if scaled else 0) + (stored.itemsize // 2 if stored.kind == "c" else 0) + 4
    budget.add("NIfTI volume", shape[:3], per_voxel)
    try:
        with warnings.catch_warnings(), _quiet_nibabel():
            warnings.simplefilter("ignore")
            if len(shape) == 2:
                data = np.asarray(img.dataobj)[:, :, None]
            elif len(shape) == 3:
                data = np.asarray(img.dataobj)
            else:  # first volume only; ArrayProxy slicing reads just that part
                data = np.asarray(img.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
            # reorder/flip the array axes to RAS+ (what as_closest_canonical does)
            ornt = nib.orientations.io_orientation(img.affine)
            data = nib.orientations.apply_orientation(data, ornt)
            raw_zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * max(0, 3 - len(shape))
            zooms = [1.0, 1.0, 1.0]
            for i in range(3):
                zooms[int(ornt[i, 0])] = raw_zooms[i]
            header_text = {key: _header_text(img.header.get(key)) for key in ("descrip", "intent_name", "aux_file")}
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"{name}: corrupt NIfTI data ({type(exc).__name__}: {str(exc)[:160]})") from None
    if np.iscomplexobj(data):
        data = np.abs(data)
        extra["Complex"] = "magnitude taken"
    if data.dtype.kind not in "biuf":
        raise ScanError(f"{name}: NIfTI data type {data.dtype} is not supported")
    # RAS+ [x, y, z] -> slices [z, rows = y descending (anterior top), cols = x descending (patient right left)]
    vol = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)), dtype=np.float32)
    check_finite(vol, path)
    modality, said_by = _nifti_modality(header_text)
    looks_hu = float(vol.min()) < -500.0 and float(vol.max()) > 0.0  # air at about -1000 HU
    if modality == "ct":
        units = "HU" if looks_hu else "arbitrary"
        extra["Modality"] = f"CT ({said_by})"
    elif modality == "mri":
        units = "magnitude"
        extra["Modality"] = f"MR ({said_by})"
    else:
        # the header does not say: never guess CT from the values (an MR image can have negative
        # values too); say what they look like, for whoever chooses the modality
        units = "arbitrary"
        if looks_hu:
            extra["ModalityHint"] = "values below -500 look like CT in Hounsfield units; the header does not say"
    if header_text["descrip"]:
        extra["Description"] = header_text["descrip"][:80]
    return image_scan(vol, path, modality=modality, units=units, spacing=(zooms[1], zooms[0]),
                      metadata={"Format": "NIfTI", "VoxelSize": "x".join(f"{z:g}" for z in zooms), **extra})


#: Words in a NIfTI header's text fields (descrip, intent_name, aux_file) that say the modality.
_NIFTI_CT_WORDS = re.compile(r"\b(ct|computed tomography|hounsfield|hu)\b", re.IGNORECASE)
_NIFTI_MR_WORDS = re.compile(r"\b(mr|mri|magnetic resonance|t1w?|t2w?|pdw?|flair|dwi|dti|bold|fmri|epi|mprage)\b"
                             r"|\bte=\s*[1-9]", re.IGNORECASE)


def _header_text(value) -> str:
    """A NIfTI header string field as text ("" when empty)."""
    if value is None:
        return ""
    raw = value.tobytes() if hasattr(value, "tobytes") else str(value).encode("latin-1", errors="replace")
    return raw.decode("latin-1", errors="replace").strip("\x00 ")


def _nifti_modality(header_text: dict) -> tuple[str, str]:
    """("ct" | "mri" | "unknown", which field said so) from the header's text fields.

    Only what the header states counts (dcm2niix writes ``TE=...`` for MR, other
    tools the sequence or modality name); both or neither -> "unknown".
    """
    for key in ("intent_name", "descrip", "aux_file"):
        text = header_text.get(key, "")
        ct, mr = bool(_NIFTI_CT_WORDS.search(text)), bool(_NIFTI_MR_WORDS.search(text))
        if ct != mr:
            return ("ct" if ct else "mri"), f"header {key} '{text[:40]}'"
    return "unknown", ""


# -- InVesalius -----------------------------------------------------------------------------


def read_inv3(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """An InVesalius 3 project (``.inv3``): the image volume from ``main.plist`` + raw matrix.

    The archive is refused as soon as its tar headers announce more decompressed
    bytes than the limit (before that data is decompressed); the volume read
    into memory and its float32 copy count against the limit separately.
    """
    path = Path(path)
    name = display_name(path)
    archive = ScanBudget(path, limits, measure="decompressed")  # what decompressing passes through
    budget = ScanBudget(path, limits)  # what stays in memory
    try:
        tar = tarfile.open(path, "r:*")
    except Exception as exc:
        raise ScanError(f"{name}: not an InVesalius project (not a tar archive: {str(exc)[:120]})") from None
    with tar:
        members = {}
        try:
            # member by member: each header gives the size before its data is decompressed
            for m in tar:
                archive.add_bytes(f"archive member '{PurePosixPath(m.name).name}'", m.size + tarfile.BLOCKSIZE)
                if m.isfile():
                    members[PurePosixPath(m.name).name] = m
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{name}: corrupt InVesalius project ({type(exc).__name__}: {str(exc)[:160]})") from None
        plists = sorted((n for n in members if n.endswith(".plist")), key=len)
        main_name = "main.plist" if "main.plist" in members else (plists[0] if plists else None)
        if main_name is None:
            raise ScanError(f"{name}: not an InVesalius project (no main.plist; files: {', '.join(sorted(members)[:10])})")

        def read_member(member_name, limit):
            m = members[member_name]
            if m.size > limit:
                raise ScanError(f"{name}: '{member_name}' is {m.size:,} bytes, more than expected ({limit:,})")
            try:
                fp = tar.extractfile(m)
                data = fp.read() if fp is not None else b""
            except Exception as exc:
                raise ScanError(f"{name}: corrupt InVesalius project ({type(exc).__name__}: {str(exc)[:160]})") from None
            if len(data) != m.size:
                raise ScanError(f"{name}: '{member_name}' is truncated")
            return data

        try:
            main = plistlib.loads(read_member(main_name, 16 * 2**20))
        except ScanError:
            raise
        except Exception as exc:
            raise ScanError(f"{name}: {main_name} is not a valid plist ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(main, dict) or not isinstance(main.get("matrix"), dict):
            raise ScanError(f"{name}: {main_name} has no 'matrix' entry describing the volume")
        matrix = main["matrix"]
        fname = PurePosixPath(str(matrix.get("filename", ""))).name
        dtype_name = str(matrix.get("dtype", ""))
        shape = matrix.get("shape")
        if dtype_name not in _INV3_DTYPES:
            raise ScanError(f"{name}: unsupported volume dtype {dtype_name!r} (expected one of {', '.join(_INV3_DTYPES)})")
        if (not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise ScanError(f"{name}: invalid volume shape {shape!r} in {main_name}")
        shape = tuple(shape) if len(shape) == 3 else (1,) + tuple(shape)
        dtype = np.dtype(dtype_name).newbyteorder("<")
        # the raw member read into memory, then the flipped float32 copy
        count = budget.add("InVesalius volume", shape, dtype.itemsize + 4)
        if fname not in members:
            raise ScanError(f"{name}: volume file {fname!r} named in {main_name} is missing")
        nbytes = count * dtype.itemsize
        if fname.endswith(".npy"):
            raw = read_member(fname, nbytes + 65536)
            buf = io.BytesIO(raw)
            vshape, fortran, vdtype = _npy_header(buf, path, fname)
            if tuple(vshape) != shape:
                raise ScanError(f"{name}: {fname} has shape {vshape} but {main_name} says {shape}")
            _require_numeric(vdtype, path, fname)
            offset = buf.tell()
            need = count * vdtype.itemsize
            if len(raw) - offset < need:
                raise ScanError(f"{name}: {fname} is truncated ({len(raw) - offset:,} of {need:,} bytes)")
            # a view of the bytes already in memory: no second copy of the volume
            vol = np.frombuffer(raw, dtype=vdtype, count=count, offset=offset).reshape(
                shape, order="F" if fortran else "C")
        else:
            if members[fname].size != nbytes:
                raise ScanError(
                    f"{name}: {fname} holds {members[fname].size:,} bytes but shape {shape} of {dtype_name} "
                    f"needs {nbytes:,}"
                )
            vol = np.frombuffer(read_member(fname, nbytes), dtype=dtype).reshape(shape)
    vol = vol[:, ::-1, :]  # VTK bottom-left origin -> top-down display rows
    modality_tag = str(main.get("modality", "")).upper()
    modality, units = ("ct", "HU") if modality_tag == "CT" else (("mri", "magnitude") if modality_tag in ("MR", "MRI") else ("unknown", "arbitrary"))
    spacing = None
    sp = main.get("spacing")
    if isinstance(sp, (list, tuple)) and len(sp) >= 2:
        try:
            spacing = (float(sp[1]), float(sp[0]))
        except (TypeError, ValueError):
            spacing = None
    meta = {"Format": "InVesalius project", "Modality": modality_tag or "unknown"}
    for key, label in (("name", "SeriesDescription"), ("date", "Date"), ("invesalius_version", "InVesaliusVersion"),
                       ("scalar_range", "ScalarRange"), ("window_level", "WindowCenter"),
                       ("window_width", "WindowWidth"), ("orientation", "Orientation"), ("spacing", "Spacing")):
        if key in main:
            value = main[key]
            meta[label] = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if isinstance(main.get("masks"), dict):
        meta["Masks"] = str(len(main["masks"]))
    return image_scan(vol, path, modality=modality, units=units, spacing=spacing, metadata=meta)
