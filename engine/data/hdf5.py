"""HDF5 readers: fastMRI k-space, sinograms, deepinv datasets and plain image stacks.

Layouts recognised (root-level datasets), tried in this order:

fastMRI
    ``kspace``: complex, ``[slices, H, W]`` (single-coil) or ``[slices, coils, H, W]``
    (multi-coil); a real array whose last axis has length 2 is read as (real, imag).
    Optional sampling mask: a ``mask`` dataset (``[W]`` or ``[H, W]``) or a ``mask``
    attribute. Optional reference images: ``reconstruction_rss`` (multi-coil) or
    ``reconstruction_esc`` (single-coil). File attributes (acquisition, max, norm,
    patient_id) go to ``Scan.metadata``. -> kind ``"kspace"``, modality ``"mri"``.
sinogram
    ``sinogram``: real ``[slices, views, detectors]`` or ``[views, detectors]``, and
    ``angles`` ``[views]`` in degrees (``angles.attrs["units"] == "rad"`` for radians;
    absent angles are assumed uniform on [0, 180) and flagged in metadata).
    Optional ``images``/``reference`` ground truth. -> kind ``"sinogram"``, modality ``"ct"``.
deepinv ``generate_dataset``
    Datasets named ``x_train``/``x_test``/``x_val`` (ground truth, ``[N, C, H, W]``),
    ``y_train``/``y0_train``/... (measurements) and per-split physics parameters,
    with an ``operator`` file attribute. Images come from the ``x_*`` datasets,
    concatenated train, val, test; ``C == 1`` is squeezed, ``C == 2`` (real/imag,
    deepinv's MRI convention) becomes the magnitude, ``C == 3`` becomes luma.
    A file without any ``x_*`` (unsupervised, measurements only) is refused.
plain images
    A single real 2-D or 3-D dataset named ``images``, ``image`` or ``data``.

Anything else raises a ScanError that lists the keys found and the layouts expected.

Memory: before any dataset is read, every dataset the layout will read is counted
against the byte limit (:class:`~engine.data.scans.ScanBudget`) with its shape x
item size as stored plus the float32/complex64 copy it becomes; a few-KB file
whose lazy dataset claims gigabytes is refused without reading it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from engine.data.scans import Scan, ScanBudget, ScanLimits, as_image_stack, as_kspace, check_finite, display_name
from engine.errors import ScanError

__all__ = ["read_hdf5", "EXPECTED_LAYOUTS"]

EXPECTED_LAYOUTS = (
    "fastMRI ('kspace' [+ 'mask', 'reconstruction_rss'/'reconstruction_esc']), "
    "sinogram ('sinogram' + 'angles'), deepinv generate_dataset ('x_train', 'x_test', 'x_val', 'y_*'), "
    "or one real 2-D/3-D dataset named 'images', 'image' or 'data'"
)

_DEEPINV_KEY = re.compile(r"^(x|y\d*)_(train|test|val)$")
_SPLIT_ORDER = ("train", "val", "test")


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - hard dependency
        raise ScanError("reading HDF5 needs h5py (pip install h5py)") from None
    return h5py


def _dataset(f, key, name):
    h5py = _h5py()
    obj = f.get(key)
    if obj is None:
        return None
    if not isinstance(obj, h5py.Dataset):
        raise ScanError(f"{name}: '{key}' is a {type(obj).__name__}, expected a dataset")
    return obj


def _is_compound_complex(dtype) -> bool:
    """A compound {r, i} dtype: complex data as ISMRMRD/MATLAB write it."""
    return bool(dtype.names) and set(dtype.names) >= {"r", "i"}


def _check_dtype(ds, source, what) -> None:
    if ds.dtype.kind not in "biufc" and not _is_compound_complex(ds.dtype):
        raise ScanError(f"{display_name(source)}: dataset '{what}' has unsupported dtype {ds.dtype}")


def _plan(budget: ScanBudget, ds, source, what, target, extra_itemsize: int = 0) -> None:
    """Count ``ds`` as stored plus its copy as ``target`` (none when it is stored as ``target``)."""
    _check_dtype(ds, source, what)
    target = np.dtype(target)
    copy = 0 if ds.dtype == target else target.itemsize
    budget.add(f"dataset '{what}'", ds.shape, ds.dtype.itemsize + copy + extra_itemsize)


def _complex64(real: np.ndarray, imag: np.ndarray) -> np.ndarray:
    """complex64 from its parts without a complex128 temporary (same values as the cast of one)."""
    out = np.empty(real.shape, dtype=np.complex64)
    out.real = real
    out.imag = imag
    return out


def _read(ds, source, what, rows: Optional[slice] = None):
    """Read a h5py dataset (or ``rows`` of it), already counted against the budget.

    Compound complex becomes complex64.
    """
    _check_dtype(ds, source, what)
    try:
        arr = ds[()] if rows is None else ds[rows]
    except Exception as exc:
        raise ScanError(f"{display_name(source)}: cannot read dataset '{what}' ({type(exc).__name__}: {exc})") from None
    if _is_compound_complex(arr.dtype):  # compound complex (e.g. ISMRMRD/MATLAB)
        arr = _complex64(arr["r"], arr["i"])
    return np.asarray(arr)


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=8) if value.size > 1 else str(value.reshape(-1)[0]) if value.size else ""
    return str(value)


def _layout_error(name, keys, detail=""):
    found = ", ".join(repr(k) for k in keys) or "none"
    extra = f" ({detail})" if detail else ""
    return ScanError(f"{name}: unrecognised HDF5 layout{extra}; found keys [{found}]; expected {EXPECTED_LAYOUTS}")


def read_hdf5(path, *, limits: Optional[ScanLimits] = None) -> Scan:
    """Read an HDF5 file in one of the layouts described in the module docstring."""
    h5py = _h5py()
    path = Path(path)
    name = display_name(path)
    budget = ScanBudget(path, limits)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ScanError(f"{name}: not a readable HDF5 file ({type(exc).__name__}: {str(exc)[:200]})") from None
    try:
        with f:
            keys = sorted(f.keys())
            if "kspace" in keys:
                return _fastmri(f, path, keys, budget)
            if "sinogram" in keys:
                return _sinogram(f, path, keys, budget)
            if any(_DEEPINV_KEY.match(k) for k in keys):
                return _deepinv(f, path, keys, budget)
            for key in ("images", "image", "data"):
                if key in keys:
                    return _plain(f, path, key, budget)
            raise _layout_error(name, keys)
    except ScanError:
        raise
    except Exception as exc:  # corrupt internals surface as OSError/KeyError/... from h5py
        raise ScanError(f"{name}: corrupt HDF5 file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _fastmri(f, path, keys, budget: ScanBudget) -> Scan:
    name = display_name(path)
    ds = _dataset(f, "kspace", name)
    if ds is None:
        raise _layout_error(name, keys, "'kspace' is not a dataset")
    shape = ds.shape
    is_pairs = ds.dtype.kind in "fiu" and len(shape) >= 3 and shape[-1] == 2
    if not (ds.dtype.kind == "c" or ds.dtype.names or is_pairs):
        raise _layout_error(name, keys, f"'kspace' has real dtype {ds.dtype} and shape {shape}; expected complex")
    # every dataset this layout reads is counted before the first one is read
    if is_pairs:  # (real, imag) pairs become half as many complex64 values
        _check_dtype(ds, path, "kspace")
        budget.add("dataset 'kspace'", shape, ds.dtype.itemsize + np.dtype(np.complex64).itemsize / 2)
    else:
        _plan(budget, ds, path, "kspace", np.complex64)
    mds = _dataset(f, "mask", name)
    if mds is not None:
        _plan(budget, mds, path, "mask", np.float64, 4)  # a float64 finiteness check, then float32
    ref_key = next((k for k in ("reconstruction_rss", "reconstruction_esc") if k in keys), None)
    rds = _dataset(f, ref_key, name) if ref_key is not None else None
    if rds is not None:
        _plan(budget, rds, path, ref_key, np.float32)

    kspace = _read(ds, path, "kspace")
    if is_pairs:
        kspace = _complex64(kspace[..., 0], kspace[..., 1])
    if kspace.ndim not in (2, 3, 4):
        raise _layout_error(
            name, keys, f"'kspace' has shape {kspace.shape}; expected [slices, H, W] or [slices, coils, H, W]"
        )
    kspace = as_kspace(kspace, path, "kspace")

    mask = None
    if mds is not None:
        mask = _read(mds, path, "mask")
    elif "mask" in f.attrs:
        mask = np.asarray(f.attrs["mask"])
    if mask is not None:
        mask = np.asarray(mask)
        h, w = kspace.shape[-2:]
        fits = (mask.ndim == 1 and mask.shape[0] == w) or (mask.ndim == 2 and mask.shape == (h, w))
        if not fits:
            raise ScanError(f"{name}: mask of shape {mask.shape} does not fit k-space slices {h} x {w}")
        if np.iscomplexobj(mask) or not np.isfinite(mask.astype(np.float64)).all():
            raise ScanError(f"{name}: mask must be real and finite")
        mask = mask.astype(np.float32)

    reference = None
    if ref_key is not None:
        if rds is None:
            raise ScanError(f"{name}: '{ref_key}' is not a dataset")
        reference = as_image_stack(_read(rds, path, ref_key), path, ref_key)
        if reference.shape[0] != kspace.shape[0]:
            raise ScanError(
                f"{name}: '{ref_key}' has {reference.shape[0]} slices but kspace has {kspace.shape[0]}"
            )

    meta = {
        "Format": "HDF5 (fastMRI)", "Slices": str(kspace.shape[0]), "Coils": str(kspace.shape[1]),
        "Rows": str(kspace.shape[2]), "Columns": str(kspace.shape[3]),
        "Acquisition": "multi-coil" if kspace.shape[1] > 1 else "single-coil",
    }
    for attr in ("acquisition", "patient_id", "max", "norm"):
        if attr in f.attrs:
            meta[attr] = _attr_str(f.attrs[attr])[:200]
    if ref_key:
        meta["Reference"] = ref_key
    if mask is not None:
        meta["MaskSampled"] = f"{float(mask.mean()):.3f}"
    return Scan(kind="kspace", kspace=kspace, mask=mask, reference=reference, modality="mri",
                source=str(path), units="magnitude", metadata=meta)


def _sinogram(f, path, keys, budget: ScanBudget) -> Scan:
    name = display_name(path)
    ds = _dataset(f, "sinogram", name)
    if ds is None:
        raise _layout_error(name, keys, "'sinogram' is not a dataset")
    if ds.dtype.kind not in "biuf" or len(ds.shape) not in (2, 3):
        raise _layout_error(
            name, keys, f"'sinogram' has dtype {ds.dtype} and shape {ds.shape}; expected real "
            "[views, detectors] or [slices, views, detectors]"
        )
    ads = _dataset(f, "angles", name)
    ref_key = next((k for k in ("images", "reference", "image") if k in keys), None)
    rds = _dataset(f, ref_key, name) if ref_key is not None else None
    _plan(budget, ds, path, "sinogram", np.float32)
    if ads is not None:
        _plan(budget, ads, path, "angles", np.float64)
    if rds is not None:
        _plan(budget, rds, path, ref_key, np.float32)

    sino = _read(ds, path, "sinogram").astype(np.float32, copy=False)
    if sino.ndim == 2:
        sino = sino[None]
    check_finite(sino, path, "sinogram")
    views = sino.shape[1]
    meta = {"Format": "HDF5 (sinogram)", "Slices": str(sino.shape[0]), "Views": str(views),
            "Detectors": str(sino.shape[2])}
    if ads is None:
        angles = np.linspace(0.0, 180.0, views, endpoint=False)
        meta["AnglesAssumed"] = "uniform 0-180 degrees"
    else:
        angles = np.asarray(_read(ads, path, "angles"), dtype=np.float64).reshape(-1)
        if angles.shape[0] != views:
            raise ScanError(f"{name}: 'angles' has {angles.shape[0]} entries but the sinogram has {views} views")
        if not np.isfinite(angles).all():
            raise ScanError(f"{name}: 'angles' contains NaN or Inf")
        unit = _attr_str(ads.attrs.get("units", ads.attrs.get("unit", "deg"))).lower()
        if unit.startswith("rad"):
            angles = np.rad2deg(angles)
    reference = None
    if ref_key is not None:
        if rds is None:
            raise ScanError(f"{name}: '{ref_key}' is not a dataset")
        reference = as_image_stack(_read(rds, path, ref_key), path, ref_key)
        meta["Reference"] = ref_key
    return Scan(kind="sinogram", sinogram=np.ascontiguousarray(sino), angles=angles.astype(np.float64),
                reference=reference, modality="ct", source=str(path), units="arbitrary", metadata=meta)


def _to_gray(x: np.ndarray, path, key) -> np.ndarray:
    """deepinv tensors [N, C, H, W] -> [N, H, W]."""
    if np.iscomplexobj(x):
        x = np.abs(x)
    if x.ndim == 4:
        c = x.shape[1]
        if c == 1:
            x = x[:, 0]
        elif c == 2:
            x = np.sqrt(x[:, 0].astype(np.float64) ** 2 + x[:, 1].astype(np.float64) ** 2)
        elif c == 3:
            x = np.tensordot(np.array([0.299, 0.587, 0.114]), x.astype(np.float64), axes=([0], [1]))
        else:
            raise ScanError(f"{display_name(path)}: '{key}' has {c} channels; expected 1, 2 or 3")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ScanError(f"{display_name(path)}: '{key}' has shape {x.shape}; expected [N, C, H, W]")
    return x


#: Stored bytes of ground truth converted at a time by :func:`_deepinv` (at least one sample).
_DEEPINV_CHUNK_BYTES = 32 * 2**20


def _gray_shape(shape, path, key) -> tuple:
    """[N, H, W] of the gray images :func:`_to_gray` makes from a dataset of ``shape``."""
    if len(shape) == 4:
        c = shape[1]
        if c not in (1, 2, 3):
            raise ScanError(f"{display_name(path)}: '{key}' has {c} channels; expected 1, 2 or 3")
        return (shape[0], shape[2], shape[3])
    return tuple(shape)


def _deepinv(f, path, keys, budget: ScanBudget) -> Scan:
    name = display_name(path)
    x_keys = [f"x_{s}" for s in _SPLIT_ORDER if f"x_{s}" in keys]
    if not x_keys:
        ys = [k for k in keys if _DEEPINV_KEY.match(k)]
        raise ScanError(
            f"{name}: deepinv dataset without ground truth: found only measurements "
            f"[{', '.join(ys)}] and no 'x_train'/'x_val'/'x_test'; cannot load it as images"
        )
    datasets, gray_shapes = {}, {}
    for k in x_keys:
        ds = _dataset(f, k, name)
        if ds is None or len(ds.shape) not in (3, 4):
            shape = None if ds is None else ds.shape
            raise _layout_error(name, keys, f"'{k}' has shape {shape}; expected [N, C, H, W]")
        _check_dtype(ds, path, k)
        gray = _gray_shape(ds.shape, path, k)
        first = gray_shapes.get(x_keys[0])
        if first is not None and gray[1:] != first[1:]:
            raise ScanError(f"{name}: '{k}' images are {gray[1:]} but '{x_keys[0]}' images are {first[1:]}")
        datasets[k], gray_shapes[k] = ds, gray
    total = sum(g[0] for g in gray_shapes.values())
    height, width = gray_shapes[x_keys[0]][1:]
    budget.add("deepinv ground truth", (total, height, width), 4)  # the float32 stack
    # plus one chunk at a time as stored and in float64 while it becomes gray
    steps, chunk_bytes = {}, 0
    for k, ds in datasets.items():
        per_sample = int(np.prod(ds.shape[1:], dtype=np.int64))
        steps[k] = max(1, _DEEPINV_CHUNK_BYTES // max(1, per_sample * ds.dtype.itemsize))
        chunk_bytes = max(chunk_bytes, min(steps[k], ds.shape[0]) * per_sample * (ds.dtype.itemsize + 24))
    budget.add_bytes("one chunk of deepinv ground truth being converted", chunk_bytes)

    images = np.empty((total, height, width), dtype=np.float32)
    splits, start = [], 0
    for k, ds in datasets.items():
        n = gray_shapes[k][0]
        for i in range(0, n, steps[k]):
            rows = slice(i, min(n, i + steps[k]))
            images[start + rows.start:start + rows.stop] = _to_gray(_read(ds, path, k, rows), path, k)
        splits.append(f"{k[2:]} {start}-{start + n - 1}")
        start += n
    images = as_image_stack(images, path, "deepinv ground truth")
    meta = {"Format": "HDF5 (deepinv generate_dataset)", "Slices": str(images.shape[0]),
            "Rows": str(images.shape[1]), "Columns": str(images.shape[2]), "Splits": ", ".join(splits)}
    if "operator" in f.attrs:
        meta["Operator"] = _attr_str(f.attrs["operator"])[:200]
    return Scan(kind="image", images=images, source=str(path), metadata=meta)


def _plain(f, path, key, budget: ScanBudget) -> Scan:
    name = display_name(path)
    ds = _dataset(f, key, name)
    keys = sorted(f.keys())
    if ds is None or len(ds.shape) not in (2, 3) or ds.dtype.kind not in "biuf":
        shape = None if ds is None else ds.shape
        dtype = None if ds is None else ds.dtype
        raise _layout_error(name, keys, f"'{key}' has shape {shape} and dtype {dtype}; expected a real 2-D/3-D array")
    _plan(budget, ds, path, key, np.float32)
    images = as_image_stack(_read(ds, path, key), path, key)
    meta = {"Format": "HDF5", "Dataset": key, "Slices": str(images.shape[0]),
            "Rows": str(images.shape[1]), "Columns": str(images.shape[2])}
    units = _attr_str(ds.attrs.get("units", "")).strip()
    modality = _attr_str(ds.attrs.get("modality", "")).strip().lower()
    return Scan(kind="image", images=images, source=str(path),
                units="HU" if units.upper() == "HU" else "arbitrary",
                modality=modality if modality in ("ct", "mri") else ("ct" if units.upper() == "HU" else "unknown"),
                metadata=meta)
