"""Data layer: procedural phantoms, scan readers and training-image preparation.

Public API (everything a caller needs; the format modules are implementation):

* phantoms: :func:`random_ellipses`, :func:`shepp_logan`, :func:`phantom_batch`
* scans: :class:`Scan`, :func:`load_scan`, :func:`list_series` (+ :class:`SeriesInfo`),
  :data:`MAX_SCAN_BYTES` (memory per file; ``EQUIDEQ_MAX_SCAN_BYTES`` replaces it, see
  ``docs/limits.md``), :data:`MAX_VOXELS`, :data:`SUPPORTED_SUFFIXES`
* intensity: :func:`window`, :data:`CT_WINDOWS`, :data:`AUTO_CT_WINDOW`,
  :func:`normalise_magnitude`, :func:`to_square`, :func:`resize`, :func:`prepare_slices`,
  :func:`native_size`; back to HU: :func:`scan_hu_window`, :func:`to_hu`, :func:`from_hu`
* datasets: :func:`slice_range`, :func:`load_training_images`
* raw measurements (k-space, sinograms) as arrays and geometry, and their layouts:
  :mod:`engine.data.measurements` (imported on demand; it needs torch). Reading them
  against a physics config, and the operator for their geometry, is :mod:`engine.measured`,
  above this layer: nothing here imports :mod:`engine.physics`.
* real data on this machine: :func:`invesalius_head_ct_path`, :func:`colin27_t1_path`,
  :func:`pydicom_test_file`

Never imports Qt. Every user-caused failure is an :class:`~engine.errors.ScanError`
(files) or :class:`~engine.errors.ConfigError` (settings).
"""

from engine.data.datasets import VAL_SEED_OFFSET, load_training_images, slice_range
from engine.data.dicom import SeriesInfo, list_series
from engine.data.intensity import (
    AUTO_CT_WINDOW,
    CT_WINDOWS,
    from_hu,
    native_size,
    normalise_magnitude,
    prepare_slices,
    resize,
    resolve_window,
    scan_hu_window,
    to_hu,
    to_square,
    window,
)
from engine.data.phantoms import PHANTOM_KINDS, phantom_batch, random_ellipses, shepp_logan
from engine.data.real_data import colin27_t1_path, invesalius_head_ct_path, pydicom_test_file
from engine.data.loading import load_scan
from engine.data.scans import MAX_SCAN_BYTES, MAX_SCAN_BYTES_ENV, MAX_VOXELS, SUPPORTED_SUFFIXES, Scan

__all__ = [
    "AUTO_CT_WINDOW",
    "CT_WINDOWS",
    "MAX_SCAN_BYTES",
    "MAX_SCAN_BYTES_ENV",
    "MAX_VOXELS",
    "PHANTOM_KINDS",
    "SUPPORTED_SUFFIXES",
    "Scan",
    "SeriesInfo",
    "VAL_SEED_OFFSET",
    "colin27_t1_path",
    "from_hu",
    "invesalius_head_ct_path",
    "list_series",
    "load_scan",
    "load_training_images",
    "native_size",
    "normalise_magnitude",
    "phantom_batch",
    "prepare_slices",
    "pydicom_test_file",
    "random_ellipses",
    "resize",
    "resolve_window",
    "scan_hu_window",
    "shepp_logan",
    "slice_range",
    "to_hu",
    "to_square",
    "window",
]
