"""Intensity mapping, resizing, prepare_slices, slice ranges and training-set assembly."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from engine.config import DataConfig, PhysicsConfig
from engine.data import (
    AUTO_CT_WINDOW,
    CT_WINDOWS,
    VAL_SEED_OFFSET,
    Scan,
    invesalius_head_ct_path,
    load_training_images,
    normalise_magnitude,
    phantom_batch,
    prepare_slices,
    resize,
    slice_range,
    to_square,
    window,
)
from engine.data.intensity import UNIT_WINDOWS, resolve_window, window_bounds
from engine.errors import ConfigError, ScanError


# -- intensity ------------------------------------------------------------------------------


def test_ct_window_presets():
    assert CT_WINDOWS == {"soft tissue": (-160, 240), "bone": (-450, 1050), "lung": (-1350, 150),
                          "brain": (0, 80)}
    # one preset table: the [0, 1] display equivalents name the same presets, each a valid window
    assert list(UNIT_WINDOWS) == list(CT_WINDOWS)
    assert all(0.0 <= low < high <= 1.0 for low, high in UNIT_WINDOWS.values())


def test_window_bounds_is_the_one_window_check():
    assert window_bounds([1, 2.5], "w") == (1.0, 2.5)
    with pytest.raises(ConfigError, match=r"CT window \(HU\) must be \(low, high\), got \[1\]"):
        resolve_window([1])
    with pytest.raises(ScanError, match=r"f.png: window must have finite low < high, got \(5, 1\)"):
        window_bounds((5, 1), "f.png: window", ScanError)
    with pytest.raises(ConfigError, match="finite"):
        window_bounds((0, float("inf")), "w")


def test_window_maps_linearly_and_clips():
    hu = np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])
    out = window(hu, -160, 240)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32
    with pytest.raises(ConfigError):
        window(hu, 10, 10)


def test_normalise_magnitude_robust():
    x = np.linspace(0, 1, 1000).reshape(10, 100).astype(np.float32)
    x[5, 50] = 1000.0  # one hot outlier must not crush the scale
    out = normalise_magnitude(x)
    assert out.max() == 1.0 and out.min() == 0.0
    assert np.median(out) > 0.4
    z = normalise_magnitude(np.zeros((2, 3, 3)))
    assert np.all(z == 0)
    c = normalise_magnitude(np.full((4, 4), 3 + 4j))
    np.testing.assert_allclose(c, 1.0)


def test_to_square_pad_and_crop():
    x = np.ones((2, 4, 6))
    p = to_square(x)
    assert p.shape == (2, 6, 6) and p[:, 0].sum() == 0 and p[:, 1:5].all()
    c = to_square(x, mode="crop")
    assert c.shape == (2, 4, 4)


def test_resize_antialiased():
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)  # highest frequency
    small = resize(checker, 16)
    assert small.shape == (16, 16)
    np.testing.assert_allclose(small, 0.5, atol=1e-6)  # antialiased: averages, no aliasing
    odd = resize(checker[None], (20, 24))
    assert odd.shape == (1, 20, 24) and abs(odd.mean() - 0.5) < 0.02 and odd.std() < 0.1
    up = resize(np.eye(4, dtype=np.float32), 8)
    assert up.shape == (8, 8)


def test_prepare_slices_ct_uses_window():
    hu = np.full((2, 10, 10), -1000.0, np.float32)
    hu[:, 3:7, 3:7] = 40.0
    hu[1, 0, 0] = 0.0  # slices must not be constant
    scan = Scan(kind="image", images=hu, modality="ct", units="HU")
    out = prepare_slices(scan, 10, window="brain")
    assert out.shape == (2, 10, 10) and out.dtype == np.float32
    assert out[0, 5, 5] == pytest.approx(0.5) and out[0, 0, 0] == 0.0
    auto = prepare_slices(scan, 10)
    low, high = AUTO_CT_WINDOW
    assert auto[0, 5, 5] == pytest.approx((40 - low) / (high - low))
    explicit = prepare_slices(scan, 10, window=[-1000, 1000])
    assert explicit[0, 5, 5] == pytest.approx(0.52)


def test_prepare_slices_mri_and_square_resize():
    img = np.zeros((1, 40, 20), np.float32)
    img[0, 10:30, 5:15] = 500.0
    img[0, 0, 0] = 1.0
    out = prepare_slices(Scan(kind="image", images=img, modality="mri", units="magnitude"), 32)
    assert out.shape == (1, 32, 32) and 0 <= out.min() and out.max() <= 1.0
    assert out[0, 16, 16] == pytest.approx(1.0, abs=1e-3)
    assert out[0, :, :4].max() == 0.0  # zero padding on the short side


def test_prepare_slices_rejects_constant_and_measurements():
    flat = Scan(kind="image", images=np.full((3, 8, 8), 7.0, np.float32), source="flat.npy")
    with pytest.raises(ScanError, match="every slice is constant"):
        prepare_slices(flat, 8)
    one_ok = np.full((3, 8, 8), 7.0, np.float32)
    one_ok[1, 0, 0] = 0
    assert prepare_slices(Scan(kind="image", images=one_ok), 8).shape == (3, 8, 8)
    sino = Scan(kind="sinogram", sinogram=np.ones((1, 4, 4), np.float32), source="s.h5")
    with pytest.raises(ScanError, match="without reference"):
        prepare_slices(sino, 8)
    ref = np.random.default_rng(0).random((2, 6, 6)).astype(np.float32)
    k = Scan(kind="kspace", kspace=np.ones((2, 1, 6, 6), np.complex64), reference=ref, modality="mri",
             units="magnitude")
    assert prepare_slices(k, 6).shape == (2, 6, 6)


# -- slice ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec,expected", [
    ("", range(0, 10)), ("2:5", range(2, 5)), (":3", range(0, 3)), ("7:", range(7, 10)),
    ("-2:", range(8, 10)), ("4", range(4, 5)), ("-1", range(9, 10)), (" 0 : 10 ", range(0, 10)),
])
def test_slice_range_ok(spec, expected):
    assert slice_range(spec, 10) == expected


@pytest.mark.parametrize("spec", ["a:b", "1:2:3", "5:2", "0:11", "10", "3:3", "x"])
def test_slice_range_errors_name_the_spec(spec):
    with pytest.raises(ConfigError) as err:
        slice_range(spec, 10)
    assert f"'{spec}'" in str(err.value)


# -- training images ------------------------------------------------------------------------


def test_training_phantoms():
    data = DataConfig(source="phantom", phantom="shepp_logan", n_train=3, n_val=2, seed=5)
    train, val = load_training_images(data, PhysicsConfig(img_size=32))
    assert train.shape == (3, 32, 32) and val.shape == (2, 32, 32)
    np.testing.assert_array_equal(train, phantom_batch("shepp_logan", 3, 32, 5))
    np.testing.assert_array_equal(val, phantom_batch("shepp_logan", 2, 32, 5 + VAL_SEED_OFFSET))
    bigger, val2 = load_training_images(DataConfig(n_train=6, n_val=2, seed=5, phantom="shepp_logan"),
                                        PhysicsConfig(img_size=32))
    np.testing.assert_array_equal(val, val2)  # validation does not depend on n_train


def _npy_volume(path, n, value_offset=0):
    rng = np.random.default_rng(n + value_offset)
    vol = rng.random((n, 12, 12)).astype(np.float32)
    vol[:, 0, 0] = np.arange(n) + value_offset  # identify slices
    np.save(path, vol)


def test_training_files_default_split(tmp_path):
    _npy_volume(tmp_path / "a.npy", 15)
    _npy_volume(tmp_path / "b.npy", 5)
    data = DataConfig(source="files", paths=[str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    train, val = load_training_images(data, PhysicsConfig(img_size=16))
    assert train.shape == (18, 16, 16) and val.shape == (2, 16, 16)
    assert train.dtype == np.float32 and 0 <= train.min() and train.max() <= 1


def test_training_files_explicit_ranges(tmp_path):
    _npy_volume(tmp_path / "a.npy", 10)
    data = DataConfig(source="files", paths=[str(tmp_path / "a.npy")], train_slices="0:6", val_slices="8:10")
    train, val = load_training_images(data, PhysicsConfig(img_size=12))
    assert train.shape[0] == 6 and val.shape[0] == 2
    data = DataConfig(source="files", paths=[str(tmp_path / "a.npy")], val_slices="0:3")
    train, val = load_training_images(data, PhysicsConfig(img_size=12))
    assert train.shape[0] == 7 and val.shape[0] == 3
    with pytest.raises(ConfigError, match="'0:30'"):
        load_training_images(DataConfig(source="files", paths=[str(tmp_path / "a.npy")], val_slices="0:30"),
                             PhysicsConfig(img_size=12))


def test_training_files_single_slice_and_errors(tmp_path):
    np.save(tmp_path / "one.npy", np.random.default_rng(0).random((8, 8)))
    train, val = load_training_images(DataConfig(source="files", paths=[str(tmp_path / "one.npy")]),
                                      PhysicsConfig(img_size=8))
    assert train.shape == val.shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="paths is empty"):
        load_training_images(DataConfig(source="files"), PhysicsConfig())
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = np.ones((1, 4, 5))
    with pytest.raises(ScanError, match="image-domain"):
        load_training_images(DataConfig(source="files", paths=[str(tmp_path / "s.h5")]), PhysicsConfig())


def test_training_fastmri_reference_as_mri_magnitudes(tmp_path):
    rss = np.random.default_rng(1).random((4, 20, 20)).astype(np.float32) * 1e-4
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["kspace"] = np.ones((4, 2, 8, 8), np.complex64)
        f["reconstruction_rss"] = rss
    train, val = load_training_images(DataConfig(source="files", paths=[str(tmp_path / "f.h5")]),
                                      PhysicsConfig(modality="mri", img_size=16))
    assert train.shape == (3, 16, 16) and val.shape == (1, 16, 16)
    assert 0.7 < train.max() <= 1.0 and train.min() >= 0  # robust max -> 1, then antialiased resize


def test_training_real_head_ct_with_window():
    p = invesalius_head_ct_path()
    if p is None:
        pytest.skip("Cranium.inv3 not installed")
    data = DataConfig(source="files", paths=[str(p)], window=[-160, 240], val_slices="-5:")
    train, val = load_training_images(data, PhysicsConfig(img_size=64))
    assert train.shape == (103, 64, 64) and val.shape == (5, 64, 64)
    mid = train[54]
    assert (mid == 0).mean() > 0.3 and (mid == 1).mean() > 0.02  # air and bone saturate
