"""Image export: PNG windowing, raw NumPy/HDF5, derived DICOM that reads back, atomic writes, errors."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from engine import __version__
from engine.data import load_scan, pydicom_test_file
from engine.errors import ScanError
from engine.export import export_image, quantise_uint16


def ramp(h=32, w=40, low=-1000.0, high=1500.0) -> np.ndarray:
    return np.linspace(low, high, h * w, dtype=np.float32).reshape(h, w)


def read_back(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def source_ct():
    path = pydicom_test_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    return path, load_scan(path)


# -- PNG ------------------------------------------------------------------------------------------

def test_png_applies_the_window(tmp_path):
    img = np.array([[-200.0, -100.0, 0.0, 50.0], [100.0, 150.0, 400.0, 1e4]], dtype=np.float32)
    path = export_image(img, tmp_path / "w.png", window=(-100.0, 100.0), description="DEQ", checkpoint_name="a.pt")
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (4, 2)
        pixels = np.asarray(im)
        info = dict(im.info)
    expected = np.array([[0, 0, 128, 191], [255, 255, 255, 255]], dtype=np.uint8)  # (v+100)/200*255, clipped
    np.testing.assert_array_equal(pixels, expected)
    assert info["Window"] == "-100.0 100.0" and info["Checkpoint"] == "a.pt" and info["Description"] == "DEQ"
    assert __version__ in info["Software"]


def test_png_default_window_is_min_to_max_and_16_bit(tmp_path):
    img = ramp()
    with Image.open(export_image(img, tmp_path / "d.png")) as im:
        p8 = np.asarray(im)
    assert p8.dtype == np.uint8 and p8.min() == 0 and p8.max() == 255
    assert p8.flat[0] == 0 and p8.flat[-1] == 255 and np.all(np.diff(p8.ravel().astype(int)) >= 0)
    with Image.open(export_image(img, tmp_path / "d16.png", bit_depth=16)) as im:
        p16 = np.asarray(im)
    assert p16.dtype == np.uint16 and p16.min() == 0 and p16.max() == 65535
    expected = np.rint((img.astype(np.float64) - img.min()) / (img.max() - img.min()) * 65535)
    np.testing.assert_array_equal(p16, expected.astype(np.uint16))


def test_png_constant_image_and_torch_input(tmp_path):
    with Image.open(export_image(np.full((5, 6), 3.0), tmp_path / "c.png")) as im:
        assert np.asarray(im).max() == 0
    tensor = torch.from_numpy(ramp(8, 8)).reshape(1, 1, 8, 8)
    with Image.open(export_image(tensor, tmp_path / "t.png")) as im:
        assert im.size == (8, 8)


# -- NPY / HDF5 -----------------------------------------------------------------------------------

def test_npy_is_raw_float32(tmp_path):
    img = ramp().astype(np.float64) + 0.123
    back = np.load(export_image(img, tmp_path / "r.npy", window=(0, 1)))
    assert back.dtype == np.float32 and back.shape == img.shape
    np.testing.assert_array_equal(back, img.astype(np.float32))


@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_hdf5_dataset_and_attributes(tmp_path, suffix):
    _, scan = source_ct()
    img = ramp()
    path = export_image(img, tmp_path / f"r{suffix}", window=(-160, 240), source_scan=scan,
                        description="DEQ (Anderson), EI-trained", checkpoint_name="run_0200.pt")
    with h5py.File(path, "r") as f:
        dset = f["reconstruction"]
        np.testing.assert_array_equal(dset[()], img)
        assert dset.dtype == np.float32
        attrs = dict(dset.attrs)
    assert attrs["description"] == "DEQ (Anderson), EI-trained"
    assert attrs["checkpoint"] == "run_0200.pt"
    np.testing.assert_array_equal(attrs["window"], [-160.0, 240.0])
    assert attrs["units"] == "HU" and attrs["source"].endswith("CT_small.dcm")


# -- DICOM ----------------------------------------------------------------------------------------

def test_dicom_from_source_scan_reads_back(tmp_path):
    src_path, scan = source_ct()
    src = pydicom.dcmread(src_path)
    recon = scan.images[0] + np.random.default_rng(0).normal(0, 3, scan.images[0].shape).astype(np.float32)
    path = export_image(recon, tmp_path / "recon.dcm", window=(-160, 240), source_scan=scan,
                        description="DEQ-Anderson", checkpoint_name="run_0200.pt")

    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)  # no force=True
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    # Same patient and study, new series and instance.
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID and str(ds.PatientName) == str(src.PatientName)
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    assert pydicom.uid.UID(ds.SeriesInstanceUID).is_valid and pydicom.uid.UID(ds.SOPInstanceUID).is_valid
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert "DEQ-Anderson" in ds.SeriesDescription and "run_0200.pt" in ds.SeriesDescription
    assert ds.Modality == "CT" and ds.RescaleType == "HU"
    assert float(ds.WindowCenter) == 40.0 and float(ds.WindowWidth) == 400.0
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.661468, 0.661468])
    # Pixels: uint16 plus rescale gives the values back within half a quantisation step.
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == recon.shape
    slope = float(ds.RescaleSlope)
    error = np.abs(read_back(ds) - recon.astype(np.float64))
    assert error.max() <= slope / 2 + 1e-9 * np.abs(recon).max()
    assert slope <= (recon.max() - recon.min()) / 65535 * 1.001
    # The project's own reader gets the same HU values.
    again = load_scan(path)
    assert again.units == "HU" and again.metadata["StudyInstanceUID"] == src.StudyInstanceUID
    assert np.abs(again.images[0] - recon).max() <= slope / 2 + 1e-3


def test_dicom_without_source_is_a_new_anonymous_study(tmp_path):
    img = ramp(16, 20, -3.5, 7.25)
    a = pydicom.dcmread(export_image(img, tmp_path / "a.dcm", description="EI", checkpoint_name="c.safetensors"))
    b = pydicom.dcmread(export_image(img, tmp_path / "b.dcm"))
    assert str(a.PatientName) == "ANONYMOUS" and a.PatientID == "ANONYMOUS"
    assert a.Modality == "OT" and "PixelSpacing" not in a
    assert len({a.StudyInstanceUID, b.StudyInstanceUID, a.SeriesInstanceUID, b.SeriesInstanceUID,
                a.SOPInstanceUID, b.SOPInstanceUID}) == 6
    assert b.SeriesDescription == "EquiDEQ reconstruction"
    assert np.abs(read_back(a) - img).max() <= float(a.RescaleSlope) / 2 + 1e-12


def test_dicom_scan_like_object_with_rescaled_spacing(tmp_path):
    scan = SimpleNamespace(metadata={"PatientID": "P7", "PatientName": "Doe^Jane", "Modality": "MR",
                                     "StudyInstanceUID": "1.2.3.4.5", "SeriesNumber": "4"},
                           source="/data/knee.h5", units="magnitude", modality="mri", kind="kspace",
                           spacing=(0.5, 0.25), slice_shape=(320, 320))
    ds = pydicom.dcmread(export_image(ramp(160, 160, 0, 1), tmp_path / "m.dcm", source_scan=scan))
    assert ds.StudyInstanceUID == "1.2.3.4.5" and ds.PatientID == "P7" and ds.Modality == "MR"
    assert ds.SeriesNumber == 1004 and ds.RescaleType == "US"
    assert [float(v) for v in ds.PixelSpacing] == [1.0, 0.5]  # 320 -> 160 pixels doubles the spacing


@settings(max_examples=60, deadline=None)
@given(offset=st.floats(-1e6, 1e6), scale=st.floats(1e-6, 1e5), seed=st.integers(0, 2**16),
       constant=st.booleans())
def test_dicom_quantisation_bound(offset, scale, seed, constant):
    img = np.random.default_rng(seed).random((6, 7)).astype(np.float32) * np.float32(scale) + np.float32(offset)
    if constant:
        img[:] = img[0, 0]
    stored, slope_s, intercept_s = quantise_uint16(img.astype(np.float64))
    assert len(slope_s) <= 16 and len(intercept_s) <= 16
    slope, intercept = float(slope_s), float(intercept_s)
    assert stored.dtype == np.uint16 and slope > 0
    error = np.abs(stored * slope + intercept - img.astype(np.float64))
    assert error.max() <= slope / 2 + 1e-12 * max(1.0, np.abs(img).max())


# -- errors and atomicity -------------------------------------------------------------------------

def test_unknown_extension_and_bad_inputs(tmp_path):
    img = ramp(4, 4)
    with pytest.raises(ScanError, match=r"r\.tiff: cannot export to '\.tiff'; use \.png, \.npy, \.npz, \.h5/\.hdf5 or \.dcm"):
        export_image(img, tmp_path / "r.tiff")
    with pytest.raises(ScanError, match="no extension"):
        export_image(img, tmp_path / "r")
    with pytest.raises(ScanError, match=r"one 2-D slice.*\(2, 4, 4\)"):
        export_image(np.stack([img, img]), tmp_path / "s.png")
    with pytest.raises(ScanError, match="NaN or Inf"):
        export_image(np.full((3, 3), np.nan), tmp_path / "n.png")
    with pytest.raises(ScanError, match="complex"):
        export_image(img.astype(np.complex64), tmp_path / "c.npy")
    with pytest.raises(ScanError, match=r"low < high, got \(5, 1\)"):
        export_image(img, tmp_path / "w.png", window=(5, 1))
    with pytest.raises(ScanError, match="bit depth"):
        export_image(img, tmp_path / "b.png", bit_depth=12)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_old_file(tmp_path, monkeypatch):
    path = export_image(ramp(8, 8), tmp_path / "keep.png")
    before = path.read_bytes()

    def broken_save(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ScanError, match=r"cannot write .*keep\.png: No space left on device"):
        export_image(ramp(8, 8) * 2, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
