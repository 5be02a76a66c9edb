"""Non-DICOM readers: HDF5 (fastMRI, sinogram, deepinv, plain), NumPy, Pillow, NIfTI, InVesalius."""

from __future__ import annotations

import io
import plistlib
import tarfile

import h5py
import numpy as np
import pytest
from PIL import Image

from engine.data import colin27_t1_path, invesalius_head_ct_path, load_scan
from engine.data.scans import Scan
from engine.errors import ScanError

RNG = np.random.default_rng(0)


def _complex(shape):
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex64)


# -- HDF5 -----------------------------------------------------------------------------------


def test_fastmri_singlecoil(tmp_path):
    k = _complex((4, 32, 24))
    ref = RNG.random((4, 16, 16)).astype(np.float32)
    p = tmp_path / "file1000001.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = k
        f["reconstruction_esc"] = ref
        f["ismrmrd_header"] = np.bytes_(b"<ismrmrdHeader/>")
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["max"] = 0.0003
        f.attrs["patient_id"] = "abc123"
    scan = load_scan(p)
    assert scan.kind == "kspace" and scan.modality == "mri"
    assert scan.kspace.shape == (4, 1, 32, 24) and scan.kspace.dtype == np.complex64
    np.testing.assert_array_equal(scan.kspace[:, 0], k)
    np.testing.assert_array_equal(scan.reference, ref)
    assert scan.mask is None and scan.images is None
    assert scan.metadata["acquisition"] == "CORPD_FBK" and scan.metadata["Reference"] == "reconstruction_esc"
    assert scan.metadata["Acquisition"] == "single-coil"
    assert scan.n_slices == 4 and scan.slice_shape == (32, 24)


def test_fastmri_multicoil_with_mask(tmp_path):
    k = _complex((3, 4, 32, 24))
    mask = np.zeros(24, bool)
    mask[::4] = True
    mask[10:14] = True
    rss = RNG.random((3, 20, 20)).astype(np.float32)
    p = tmp_path / "multi.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = k
        f["mask"] = mask
        f["reconstruction_rss"] = rss
        f.attrs["acquisition"] = "AXT2"
    scan = load_scan(p)
    assert scan.kspace.shape == (3, 4, 32, 24)
    np.testing.assert_array_equal(scan.kspace, k)
    np.testing.assert_array_equal(scan.mask, mask.astype(np.float32))
    assert scan.reference.shape == (3, 20, 20)
    assert scan.metadata["Coils"] == "4" and scan.metadata["Acquisition"] == "multi-coil"


def test_fastmri_mask_attribute_and_bad_mask(tmp_path):
    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = _complex((2, 8, 8))
        f.attrs["mask"] = np.ones(8, np.float32)
    assert load_scan(p).mask.shape == (8,)
    with h5py.File(p, "w") as f:
        f["kspace"] = _complex((2, 8, 8))
        f["mask"] = np.ones(5, np.float32)
    with pytest.raises(ScanError, match="mask"):
        load_scan(p)


def test_fastmri_real_kspace_rejected(tmp_path):
    p = tmp_path / "real.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = np.ones((2, 8, 8), np.float32)
    with pytest.raises(ScanError, match="complex"):
        load_scan(p)


def test_sinogram_layout(tmp_path):
    sino = RNG.random((2, 30, 41)).astype(np.float32)
    p = tmp_path / "sino.h5"
    with h5py.File(p, "w") as f:
        f["sinogram"] = sino
        ds = f.create_dataset("angles", data=np.linspace(0, np.pi, 30, endpoint=False))
        ds.attrs["units"] = "rad"
    scan = load_scan(p)
    assert scan.kind == "sinogram" and scan.modality == "ct"
    np.testing.assert_array_equal(scan.sinogram, sino)
    np.testing.assert_allclose(scan.angles, np.linspace(0, 180, 30, endpoint=False))
    with h5py.File(p, "w") as f:
        f["sinogram"] = sino[0]
        f["angles"] = np.arange(29.0)
    with pytest.raises(ScanError, match="29 entries"):
        load_scan(p)


def test_deepinv_generate_dataset_layout(tmp_path):
    """Write the file with deepinv itself, so the layout is exactly what it produces."""
    import torch
    from deepinv.datasets import generate_dataset
    from deepinv.physics import Denoising

    class Images(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            self.x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    train, test = Images(5, 0), Images(3, 1)
    path = generate_dataset(train, Denoising(), str(tmp_path), test_dataset=test, batch_size=2,
                            verbose=False, supervised=True)
    path = path[0] if isinstance(path, list) else path
    with h5py.File(path, "r") as f:
        assert {"x_train", "y_train", "x_test", "y_test"} <= set(f.keys())
    scan = load_scan(path)
    assert scan.kind == "image" and scan.images.shape == (8, 16, 16)
    np.testing.assert_allclose(scan.images[:5], train.x[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(scan.images[5:], test.x[:, 0].numpy(), rtol=1e-6)
    assert "train 0-4" in scan.metadata["Splits"] and "test 5-7" in scan.metadata["Splits"]
    assert scan.metadata["Operator"] == "Denoising"


def test_deepinv_layout_handwritten_channels_and_measurements_only(tmp_path):
    p = tmp_path / "dinv.h5"
    x = RNG.random((2, 2, 8, 8)).astype(np.float32)  # real/imag channels
    with h5py.File(p, "w") as f:
        f["x_val"] = x
        f["y_val"] = x
    scan = load_scan(p)
    np.testing.assert_allclose(scan.images, np.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2), rtol=1e-6)
    with h5py.File(p, "w") as f:
        f["y_train"] = x
    with pytest.raises(ScanError, match="without ground truth"):
        load_scan(p)


def test_plain_hdf5_images(tmp_path):
    p = tmp_path / "plain.h5"
    vol = RNG.random((3, 10, 12)).astype(np.float32)
    with h5py.File(p, "w") as f:
        f["images"] = vol
    np.testing.assert_array_equal(load_scan(p).images, vol)
    with h5py.File(p, "w") as f:
        f["data"] = vol[0].astype(np.float64)
    assert load_scan(p).images.shape == (1, 10, 12)


def test_wrong_hdf5_layout_lists_keys(tmp_path):
    p = tmp_path / "weird.h5"
    with h5py.File(p, "w") as f:
        f["foo"] = np.zeros(3)
        f.create_group("bar")
    with pytest.raises(ScanError) as err:
        load_scan(p)
    msg = str(err.value)
    assert "weird.h5" in msg and "'foo'" in msg and "'bar'" in msg
    assert "fastMRI" in msg and "sinogram" in msg and "x_train" in msg
    with h5py.File(p, "w") as f:
        f["images"] = np.zeros((2, 3, 4, 5))
    with pytest.raises(ScanError, match="expected a real 2-D/3-D"):
        load_scan(p)


def test_hdf5_nan_and_size_guard(tmp_path):
    p = tmp_path / "nan.h5"
    vol = np.ones((2, 4, 4), np.float32)
    vol[1, 2, 2] = np.nan
    with h5py.File(p, "w") as f:
        f["images"] = vol
    with pytest.raises(ScanError, match="contains NaN"):
        load_scan(p)
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as f:  # declared 10^10 voxels, nothing written: must not be allocated
        f.create_dataset("images", shape=(100000, 100000), dtype=np.float32, chunks=(64, 64))
    with pytest.raises(ScanError, match="limit"):
        load_scan(big)


def test_not_hdf5(tmp_path):
    p = tmp_path / "fake.h5"
    p.write_bytes(b"definitely not hdf5" * 10)
    with pytest.raises(ScanError, match="not a readable HDF5"):
        load_scan(p)


# -- NumPy ----------------------------------------------------------------------------------


def test_npy_real_2d_3d_and_complex(tmp_path):
    img = RNG.random((10, 12)).astype(np.float64)
    np.save(tmp_path / "a.npy", img)
    s = load_scan(tmp_path / "a.npy")
    assert s.kind == "image" and s.images.shape == (1, 10, 12) and s.images.dtype == np.float32
    np.testing.assert_allclose(s.images[0], img, rtol=1e-6)
    np.save(tmp_path / "b.npy", np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    assert load_scan(tmp_path / "b.npy").images.shape == (2, 3, 4)
    k = _complex((2, 3, 8, 8))
    np.save(tmp_path / "k.npy", k)
    ks = load_scan(tmp_path / "k.npy")
    assert ks.kind == "kspace" and ks.kspace.shape == (2, 3, 8, 8)


def test_npy_rejects_pickles_4d_nan_empty(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ScanError, match="unpickle"):
        load_scan(tmp_path / "obj.npy")
    np.save(tmp_path / "four.npy", np.zeros((2, 2, 3, 3)))
    with pytest.raises(ScanError, match="expected"):
        load_scan(tmp_path / "four.npy")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.inf]]))
    with pytest.raises(ScanError, match="contains Inf"):
        load_scan(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    with pytest.raises(ScanError, match="empty"):
        load_scan(tmp_path / "empty.npy")


def test_npy_size_guard_from_header_only(tmp_path):
    """A header claiming 2^40 elements is refused without reading or allocating."""
    p = tmp_path / "huge.npy"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)})
    p.write_bytes(buf.getvalue())
    with pytest.raises(ScanError, match="limit"):
        load_scan(p)
    np.save(tmp_path / "small.npy", np.ones((8, 8)))
    with pytest.raises(ScanError, match="limit"):
        load_scan(tmp_path / "small.npy", max_voxels=10)
    data = (tmp_path / "small.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-40])
    with pytest.raises(ScanError, match="truncated"):
        load_scan(tmp_path / "cut.npy")


def test_npz_layouts(tmp_path):
    k = _complex((2, 8, 8))
    np.savez(tmp_path / "k.npz", kspace=k, mask=np.ones(8))
    s = load_scan(tmp_path / "k.npz")
    assert s.kind == "kspace" and s.mask.shape == (8,)
    np.savez(tmp_path / "sino.npz", sinogram=np.ones((1, 10, 7)), angles=np.arange(10.0))
    s = load_scan(tmp_path / "sino.npz")
    assert s.kind == "sinogram" and s.sinogram.shape == (1, 10, 7)
    np.savez(tmp_path / "one.npz", whatever=np.ones((5, 6)))
    assert load_scan(tmp_path / "one.npz").images.shape == (1, 5, 6)
    np.savez(tmp_path / "two.npz", a=np.ones((5, 6)), b=np.ones((5, 6)))
    with pytest.raises(ScanError, match=r"found keys \[a, b\]"):
        load_scan(tmp_path / "two.npz")


# -- Pillow ---------------------------------------------------------------------------------


def test_png_8_and_16_bit(tmp_path):
    a8 = RNG.integers(0, 256, (9, 11)).astype(np.uint8)
    Image.fromarray(a8).save(tmp_path / "a.png")
    s = load_scan(tmp_path / "a.png")
    np.testing.assert_array_equal(s.images[0], a8)
    a16 = RNG.integers(0, 65536, (9, 11)).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    s = load_scan(tmp_path / "b.png")
    np.testing.assert_array_equal(s.images[0], a16.astype(np.float32))
    assert s.images.max() > 255


def test_rgb_png_to_gray_and_multipage_tiff(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_allclose(load_scan(tmp_path / "c.png").images[0], 0.587 * 200, rtol=1e-5)
    pages = [Image.fromarray(np.full((6, 7), v, np.uint16)) for v in (1, 1000, 60000)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    s = load_scan(tmp_path / "stack.tif")
    assert s.images.shape == (3, 6, 7)
    np.testing.assert_array_equal(s.images[:, 0, 0], [1, 1000, 60000])


def test_corrupt_png(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match=r"bad\.png"):
        load_scan(tmp_path / "bad.png")


# -- NIfTI ----------------------------------------------------------------------------------


def test_nifti_reoriented_for_display(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.zeros((6, 5, 4), np.int16)  # x, y, z in RAS
    data[5, 4, 1] = 100  # patient right-most x, anterior-most y, slice z = 1
    ras = np.diag([2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    s = load_scan(tmp_path / "ras.nii.gz")
    assert s.images.shape == (4, 5, 6)  # slices along z, rows = y, cols = x
    # radiological display: anterior (max y) at the top, patient right (max x in RAS+) on the image left
    assert s.images[1, 0, 0] == 100
    assert s.spacing == (3.0, 2.0)
    # the same anatomy stored with flipped x and y axes (LPS-like affine) displays identically
    lps = np.diag([-2.0, -3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), lps), tmp_path / "lps.nii")
    np.testing.assert_array_equal(load_scan(tmp_path / "lps.nii").images, s.images)


def test_nifti_4d_takes_first_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.stack([np.full((4, 4, 3), 5.0), np.full((4, 4, 3), 9.0)], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t.nii")
    s = load_scan(tmp_path / "t.nii")
    assert s.images.shape == (3, 4, 4) and np.all(s.images == 5.0)
    assert "first" in s.metadata["Volumes"]


# -- InVesalius -----------------------------------------------------------------------------


def _inv3(path, vol, *, dtype="int16", modality="CT", shape=None, extra_bytes=0, plist_name="main.plist"):
    main = {"matrix": {"filename": "matrix.dat", "dtype": dtype, "shape": list(shape or vol.shape)},
            "modality": modality, "spacing": [0.5, 0.7, 2.0], "name": "synthetic", "format_version": 1}
    raw = vol.astype("<" + np.dtype(dtype).str[1:]).tobytes() + b"\0" * extra_bytes
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((plist_name, plistlib.dumps(main)), ("matrix.dat", raw)):
            info = tarfile.TarInfo(f"tmpabc/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_inv3_synthetic(tmp_path):
    vol = RNG.integers(-1024, 2000, (3, 5, 4)).astype(np.int16)
    _inv3(tmp_path / "v.inv3", vol)
    s = load_scan(tmp_path / "v.inv3")
    assert s.modality == "ct" and s.units == "HU" and s.images.shape == (3, 5, 4)
    np.testing.assert_array_equal(s.images, vol[:, ::-1, :].astype(np.float32))  # VTK rows flipped
    assert s.spacing == (0.7, 0.5)
    assert s.metadata["SeriesDescription"] == "synthetic"


def test_inv3_inconsistent(tmp_path):
    vol = np.zeros((2, 3, 4), np.int16)
    _inv3(tmp_path / "a.inv3", vol, extra_bytes=2)
    with pytest.raises(ScanError, match="needs"):
        load_scan(tmp_path / "a.inv3")
    _inv3(tmp_path / "b.inv3", vol, dtype="object")
    with pytest.raises(ScanError, match="dtype"):
        load_scan(tmp_path / "b.inv3")
    _inv3(tmp_path / "c.inv3", vol, shape=[2, 3])
    with pytest.raises(ScanError):
        load_scan(tmp_path / "c.inv3")
    (tmp_path / "d.inv3").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ScanError, match="not an InVesalius project"):
        load_scan(tmp_path / "d.inv3")


# -- real files on this machine --------------------------------------------------------------


def installed_scan(find, package: str):
    """The scan at ``find()``; the test is skipped when the package that ships it is not installed."""
    path = find()
    if path is None:
        pytest.skip(f"{package} is not installed")
    return load_scan(path)


def test_real_invesalius_cranium():
    s = installed_scan(invesalius_head_ct_path, "invesalius-examples (Cranium.inv3)")
    assert s.images.shape == (108, 256, 256)
    assert s.units == "HU" and s.modality == "ct"
    assert s.images.min() == pytest.approx(-1024)
    assert np.percentile(s.images, 5) < -900  # lots of air around the head
    assert s.images.max() > 1000  # dense bone
    mid = s.images[54]
    assert (mid > 300).mean() > 0.02  # skull ring
    brain = mid[96:160, 96:160]
    assert 0 < np.median(brain) < 80  # brain parenchyma in HU
    # display orientation: the head rest (dense arc) lies behind the head, i.e. at the bottom
    assert (s.images[54, 200:, :] > 300).sum() > (s.images[54, :30, :] > 300).sum()
    assert s.spacing == pytest.approx((0.957, 0.957), abs=1e-3)


def test_real_colin27_t1():
    s = installed_scan(colin27_t1_path, "mricron templates (ch2.nii.gz)")
    assert s.images.shape == (181, 217, 181)
    assert s.images.min() == 0 and s.images.max() == 254
    assert s.modality == "unknown" and s.units == "arbitrary"
    # brain in the middle of the middle slice is brighter than the background corner
    mid = s.images[90]
    assert mid[100:120, 80:100].mean() > 40 and mid[:10, :10].mean() < 5


def test_scan_summary_and_data_property():
    s = Scan(kind="image", images=np.zeros((2, 3, 4), np.float32), source="/x/y.npy")
    assert s.summary() == "y.npy: image 2x3x4 (unknown, arbitrary)"
    assert s.n_slices == 2 and s.slice_shape == (3, 4)
    with pytest.raises(ScanError):
        Scan(kind="kspace").data


def test_constant_slices_flagged_not_refused(tmp_path):
    vol = np.zeros((3, 4, 4), np.float32)
    vol[1, 0, 0] = 1.0
    np.save(tmp_path / "c.npy", vol)
    s = load_scan(tmp_path / "c.npy")
    assert s.metadata["ConstantSlices"] == "2 of 3"


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.xyz"
    p.write_text("just text, no scan here\n" * 30)
    with pytest.raises(ScanError, match="unrecognised file format"):
        load_scan(p)
