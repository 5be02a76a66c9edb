"""Training/validation image sets from a :class:`~engine.config.DataConfig`.

``source = "phantom"``
    ``n_train`` phantoms with ``seed`` and ``n_val`` phantoms with
    ``seed + VAL_SEED_OFFSET`` (so validation never repeats a training image and
    does not change when ``n_train`` changes).
``source = "files"``
    Every path is loaded with :func:`~engine.data.loading.load_scan` and turned
    into ``[0, 1]`` slices of ``physics.img_size`` by
    :func:`~engine.data.intensity.prepare_slices` (CT in HU through
    ``data.window`` or the automatic window; MRI/other as robust-normalised
    magnitudes). Slices of all paths are concatenated in order, then split:
    ``val_slices`` (``"start:stop"``, Python slice semantics, negatives allowed)
    selects validation, ``train_slices`` training; an empty ``train_slices``
    means every slice not in validation, and an empty ``val_slices`` means the
    last 10% of the slices (at least one). A single slice is used for both.
    Only image-domain data (or measurement files that carry reference images,
    like fastMRI's ``reconstruction_rss``) can be used here; the trainer
    routes files of raw measurements (k-space, sinograms) to
    :func:`engine.measured.load_measurement_data` instead, which
    splits their slices the same way (:func:`split_indices`).
"""

from __future__ import annotations

import numpy as np

from engine.data.intensity import prepare_slices
from engine.data.phantoms import phantom_batch
from engine.data.loading import load_scan
from engine.errors import ConfigError, ScanError

__all__ = ["slice_range", "split_indices", "load_training_images", "VAL_SEED_OFFSET"]

VAL_SEED_OFFSET = 1_000_003


def _parse_index(text: str, spec: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"slice range '{spec}': '{text}' is not an integer") from None


def slice_range(spec: str, n: int) -> range:
    """Parse ``"start:stop"`` (either end optional, negatives count from the end) for ``n`` slices.

    A single integer ``"k"`` selects slice ``k`` only; an empty spec selects all.
    Raises ConfigError naming the spec when it is malformed, out of bounds or empty.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"slice range must be a string 'start:stop', got {spec!r}")
    n = int(n)
    text = spec.strip()
    if text == "":
        return range(0, n)
    parts = text.split(":")
    if len(parts) == 1:
        k = _parse_index(parts[0], spec)
        kk = k + n if k < 0 else k
        if not 0 <= kk < n:
            raise ConfigError(f"slice range '{spec}': slice {k} does not exist ({n} slices available)")
        return range(kk, kk + 1)
    if len(parts) != 2:
        raise ConfigError(f"slice range '{spec}' must look like 'start:stop' (e.g. '0:80', '-10:')")
    start, stop = (_parse_index(p, spec) for p in parts)
    for value in (start, stop):
        if value is not None and (value > n or value < -n):
            raise ConfigError(f"slice range '{spec}' is out of bounds ({n} slices available)")
    r = range(n)[slice(start, stop)]
    if len(r) == 0:
        raise ConfigError(f"slice range '{spec}' selects no slices ({n} slices available)")
    return r


def _config_range(key: str, spec: str, n: int) -> range:
    try:
        return slice_range(spec, n)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def split_indices(n: int, data_cfg) -> tuple[list[int], list[int]]:
    """(train, validation) slice indices for ``n`` slices under ``data.train_slices`` / ``data.val_slices``."""
    if data_cfg.val_slices.strip():
        val_idx = list(_config_range("data.val_slices", data_cfg.val_slices, n))
    elif n == 1:
        val_idx = [0]
    else:
        n_val = max(1, int(round(0.1 * n)))
        val_idx = list(range(n - n_val, n))
    if data_cfg.train_slices.strip():
        train_idx = list(_config_range("data.train_slices", data_cfg.train_slices, n))
    elif n == 1:
        train_idx = [0]
    else:
        held = set(val_idx)
        train_idx = [i for i in range(n) if i not in held]
        if not train_idx:
            raise ConfigError(
                f"data.val_slices '{data_cfg.val_slices}' takes all {n} slices; nothing is left for training "
                "(set data.train_slices)"
            )
    return train_idx, val_idx


def _split(images: np.ndarray, data_cfg) -> tuple[np.ndarray, np.ndarray]:
    train_idx, val_idx = split_indices(images.shape[0], data_cfg)
    return images[train_idx], images[val_idx]


def load_training_images(data_cfg, physics_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(train ``[N, S, S]``, val ``[M, S, S]``) float32 images in ``[0, 1]``, ``S = physics.img_size``."""
    size = int(physics_cfg.img_size)
    if data_cfg.source == "phantom":
        train = phantom_batch(data_cfg.phantom, data_cfg.n_train, size, seed=data_cfg.seed)
        val = phantom_batch(data_cfg.phantom, data_cfg.n_val, size, seed=data_cfg.seed + VAL_SEED_OFFSET)
        return train, val
    if data_cfg.source != "files":
        raise ConfigError(f"data.source must be 'phantom' or 'files', got {data_cfg.source!r}")
    paths = list(data_cfg.paths or [])
    if not paths:
        raise ConfigError("data.paths is empty: list scan files or folders when data.source = 'files'")
    window = list(data_cfg.window or []) or None
    stacks = []
    for path in paths:
        scan = load_scan(path)
        if scan.kind != "image" and scan.reference is None:
            raise ScanError(
                f"{path}: holds {scan.kind} measurements without reference images; training needs "
                "image-domain files (DICOM, NIfTI, PNG/TIFF, .npy, .inv3, HDF5 images)"
            )
        stacks.append(prepare_slices(scan, size, window=window))
    images = np.concatenate(stacks, 0)
    train, val = _split(images, data_cfg)
    return np.ascontiguousarray(train), np.ascontiguousarray(val)
