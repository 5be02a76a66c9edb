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
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.data.scans import MAX_VOXELS, Scan, as_image_stack, as_kspace, check_finite, check_voxels, display_name
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


def _read(ds, source, max_voxels, what):
    """Read a whole h5py dataset after checking its size and dtype."""
    check_voxels(ds.shape, source, max_voxels, what=f"dataset '{what}'")
    if ds.dtype.kind not in "biufc" and not (ds.dtype.names and set(ds.dtype.names) >= {"r", "i"}):
        raise ScanError(f"{display_name(source)}: dataset '{what}' has unsupported dtype {ds.dtype}")
    try:
        arr = ds[()]
    except Exception as exc:
        raise ScanError(f"{display_name(source)}: cannot read dataset '{what}' ({type(exc).__name__}: {exc})") from None
    if arr.dtype.names and set(arr.dtype.names) >= {"r", "i"}:  # compound complex (e.g. ISMRMRD/MATLAB)
        arr = arr["r"] + 1j * arr["i"]
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


def read_hdf5(path, *, max_voxels: int = MAX_VOXELS) -> Scan:
    """Read an HDF5 file in one of the layouts described in the module docstring."""
    h5py = _h5py()
    path = Path(path)
    name = display_name(path)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ScanError(f"{name}: not a readable HDF5 file ({type(exc).__name__}: {str(exc)[:200]})") from None
    try:
        with f:
            keys = sorted(f.keys())
            if "kspace" in keys:
                return _fastmri(f, path, keys, max_voxels)
            if "sinogram" in keys:
                return _sinogram(f, path, keys, max_voxels)
            if any(_DEEPINV_KEY.match(k) for k in keys):
                return _deepinv(f, path, keys, max_voxels)
            for key in ("images", "image", "data"):
                if key in keys:
                    return _plain(f, path, key, max_voxels)
            raise _layout_error(name, keys)
    except ScanError:
        raise
    except Exception as exc:  # corrupt internals surface as OSError/KeyError/... from h5py
        raise ScanError(f"{name}: corrupt HDF5 file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _fastmri(f, path, keys, max_voxels) -> Scan:
    name = display_name(path)
    ds = _dataset(f, "kspace", name)
    if ds is None:
        raise _layout_error(name, keys, "'kspace' is not a dataset")
    shape = ds.shape
    is_pairs = ds.dtype.kind in "fiu" and len(shape) >= 3 and shape[-1] == 2
    if not (ds.dtype.kind == "c" or ds.dtype.names or is_pairs):
        raise _layout_error(name, keys, f"'kspace' has real dtype {ds.dtype} and shape {shape}; expected complex")
    kspace = _read(ds, path, max_voxels, "kspace")
    if is_pairs:
        kspace = kspace[..., 0] + 1j * kspace[..., 1]
    if kspace.ndim not in (2, 3, 4):
        raise _layout_error(
            name, keys, f"'kspace' has shape {kspace.shape}; expected [slices, H, W] or [slices, coils, H, W]"
        )
    kspace = as_kspace(kspace, path, "kspace")

    mask = None
    mds = _dataset(f, "mask", name)
    if mds is not None:
        mask = _read(mds, path, max_voxels, "mask")
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
    ref_key = next((k for k in ("reconstruction_rss", "reconstruction_esc") if k in keys), None)
    if ref_key is not None:
        rds = _dataset(f, ref_key, name)
        reference = as_image_stack(_read(rds, path, max_voxels, ref_key), path, ref_key)
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


def _sinogram(f, path, keys, max_voxels) -> Scan:
    name = display_name(path)
    ds = _dataset(f, "sinogram", name)
    if ds is None:
        raise _layout_error(name, keys, "'sinogram' is not a dataset")
    if ds.dtype.kind not in "biuf" or len(ds.shape) not in (2, 3):
        raise _layout_error(
            name, keys, f"'sinogram' has dtype {ds.dtype} and shape {ds.shape}; expected real "
            "[views, detectors] or [slices, views, detectors]"
        )
    sino = _read(ds, path, max_voxels, "sinogram").astype(np.float32)
    if sino.ndim == 2:
        sino = sino[None]
    check_finite(sino, path, "sinogram")
    views = sino.shape[1]
    meta = {"Format": "HDF5 (sinogram)", "Slices": str(sino.shape[0]), "Views": str(views),
            "Detectors": str(sino.shape[2])}
    ads = _dataset(f, "angles", name)
    if ads is None:
        angles = np.linspace(0.0, 180.0, views, endpoint=False)
        meta["AnglesAssumed"] = "uniform 0-180 degrees"
    else:
        angles = np.asarray(_read(ads, path, max_voxels, "angles"), dtype=np.float64).reshape(-1)
        if angles.shape[0] != views:
            raise ScanError(f"{name}: 'angles' has {angles.shape[0]} entries but the sinogram has {views} views")
        if not np.isfinite(angles).all():
            raise ScanError(f"{name}: 'angles' contains NaN or Inf")
        unit = _attr_str(ads.attrs.get("units", ads.attrs.get("unit", "deg"))).lower()
        if unit.startswith("rad"):
            angles = np.rad2deg(angles)
    reference = None
    for key in ("images", "reference", "image"):
        if key in keys:
            reference = as_image_stack(_read(_dataset(f, key, name), path, max_voxels, key), path, key)
            meta["Reference"] = key
            break
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


def _deepinv(f, path, keys, max_voxels) -> Scan:
    name = display_name(path)
    x_keys = [f"x_{s}" for s in _SPLIT_ORDER if f"x_{s}" in keys]
    if not x_keys:
        ys = [k for k in keys if _DEEPINV_KEY.match(k)]
        raise ScanError(
            f"{name}: deepinv dataset without ground truth: found only measurements "
            f"[{', '.join(ys)}] and no 'x_train'/'x_val'/'x_test'; cannot load it as images"
        )
    total, shapes = 0, {}
    for k in x_keys:
        ds = _dataset(f, k, name)
        if ds is None or len(ds.shape) not in (3, 4):
            shape = None if ds is None else ds.shape
            raise _layout_error(name, keys, f"'{k}' has shape {shape}; expected [N, C, H, W]")
        shapes[k] = ds.shape
        total += int(np.prod(ds.shape, dtype=np.int64))
    check_voxels((total,), path, max_voxels, what="deepinv ground truth")
    parts, splits, start = [], [], 0
    for k in x_keys:
        x = _to_gray(_read(f[k], path, max_voxels, k), path, k)
        if parts and x.shape[1:] != parts[0].shape[1:]:
            raise ScanError(f"{name}: '{k}' images are {x.shape[1:]} but '{x_keys[0]}' images are {parts[0].shape[1:]}")
        parts.append(x)
        splits.append(f"{k[2:]} {start}-{start + x.shape[0] - 1}")
        start += x.shape[0]
    images = as_image_stack(np.concatenate(parts, 0), path, "deepinv ground truth")
    meta = {"Format": "HDF5 (deepinv generate_dataset)", "Slices": str(images.shape[0]),
            "Rows": str(images.shape[1]), "Columns": str(images.shape[2]), "Splits": ", ".join(splits)}
    if "operator" in f.attrs:
        meta["Operator"] = _attr_str(f.attrs["operator"])[:200]
    return Scan(kind="image", images=images, source=str(path), metadata=meta)


def _plain(f, path, key, max_voxels) -> Scan:
    name = display_name(path)
    ds = _dataset(f, key, name)
    keys = sorted(f.keys())
    if ds is None or len(ds.shape) not in (2, 3) or ds.dtype.kind not in "biuf":
        shape = None if ds is None else ds.shape
        dtype = None if ds is None else ds.dtype
        raise _layout_error(name, keys, f"'{key}' has shape {shape} and dtype {dtype}; expected a real 2-D/3-D array")
    images = as_image_stack(_read(ds, path, max_voxels, key), path, key)
    meta = {"Format": "HDF5", "Dataset": key, "Slices": str(images.shape[0]),
            "Rows": str(images.shape[1]), "Columns": str(images.shape[2])}
    units = _attr_str(ds.attrs.get("units", "")).strip()
    modality = _attr_str(ds.attrs.get("modality", "")).strip().lower()
    return Scan(kind="image", images=images, source=str(path),
                units="HU" if units.upper() == "HU" else "arbitrary",
                modality=modality if modality in ("ct", "mri") else ("ct" if units.upper() == "HU" else "unknown"),
                metadata=meta)
