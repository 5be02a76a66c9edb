"""DICOM reading: rescale, sorting, series selection, enhanced multi-frame, encodings, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from engine.data import list_series, load_scan, pydicom_test_file
from engine.errors import ScanError

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _base(sop_class, *, modality="CT", series_uid=None, study_uid="1.2.3.4", ts=ExplicitVRLittleEndian,
          series_number=1, description="test series"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "ANON42"
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    return ds


def _set_pixels(ds, pixels: np.ndarray, *, signed: bool, big_endian: bool = False):
    pixels = np.asarray(pixels)
    frames = 1 if pixels.ndim == 2 else pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    dtype = (">" if big_endian else "<") + ("i2" if signed else "u2")
    ds.PixelData = pixels.astype(dtype).tobytes()


def write_ct(path, pixels, *, slope=1.0, intercept=-1024.0, z=0.0, instance=1, series_uid=None,
             ts=ExplicitVRLittleEndian, signed=True, modality="CT", position=True, series_number=1,
             description="test series"):
    sop = CTImageStorage if modality == "CT" else MRImageStorage
    ds = _base(sop, modality=modality, series_uid=series_uid, ts=ts, series_number=series_number,
               description=description)
    ds.InstanceNumber = instance
    if position:
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.75]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    _set_pixels(ds, pixels, signed=signed, big_endian=(ts == ExplicitVRBigEndian))
    ds.save_as(path, enforce_file_format=True)
    return ds


RNG = np.random.default_rng(0)
RAW = RNG.integers(0, 2000, size=(12, 10)).astype(np.int16)


# -- single files ---------------------------------------------------------------------------


def test_ct_rescale_exact_hu(tmp_path):
    p = tmp_path / "ct.dcm"
    write_ct(p, RAW, slope=2, intercept=-1024)
    scan = load_scan(p)
    assert scan.kind == "image" and scan.modality == "ct" and scan.units == "HU"
    assert scan.images.shape == (1, 12, 10) and scan.images.dtype == np.float32
    np.testing.assert_array_equal(scan.images[0], RAW.astype(np.float32) * 2 - 1024)
    assert scan.spacing == (0.5, 0.75)
    assert scan.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert scan.positions == [(0.0, 0.0, 0.0)]
    meta = scan.metadata
    assert meta["PatientID"] == "ANON42" and meta["Modality"] == "CT"
    assert meta["StudyInstanceUID"] == "1.2.3.4" and meta["Rows"] == "12" and meta["Columns"] == "10"
    assert meta["SeriesDescription"] == "test series"
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("ts", [ExplicitVRBigEndian, ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_transfer_syntaxes_give_same_hu(tmp_path, ts):
    p = tmp_path / "ct.dcm"
    raw = RAW - 500  # negative stored values too
    write_ct(p, raw, slope=1, intercept=-24, ts=ts)
    scan = load_scan(p)
    np.testing.assert_array_equal(scan.images[0], raw.astype(np.float32) - 24)
    assert scan.metadata["TransferSyntax"] == ts.name


def test_signed_and_unsigned(tmp_path):
    signed = np.array([[-32768, -1, 0], [1, 1000, 32767]], dtype=np.int16)
    write_ct(tmp_path / "s.dcm", signed, slope=None, modality="MR", signed=True)
    s = load_scan(tmp_path / "s.dcm")
    np.testing.assert_array_equal(s.images[0], signed.astype(np.float32))
    assert s.modality == "mri" and s.units == "magnitude"

    unsigned = np.array([[0, 1, 40000], [65535, 32768, 7]], dtype=np.uint16)
    write_ct(tmp_path / "u.dcm", unsigned, slope=None, modality="MR", signed=False)
    u = load_scan(tmp_path / "u.dcm")
    np.testing.assert_array_equal(u.images[0], unsigned.astype(np.float32))


def test_rle_compressed_decodes_with_builtin_handler(tmp_path):
    ds = _base(CTImageStorage)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    _set_pixels(ds, RAW, signed=True)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    scan = load_scan(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(scan.images[0], RAW.astype(np.float32) - 1024)


def test_file_without_extension_is_sniffed(tmp_path):
    p = tmp_path / "IM0001"
    write_ct(p, RAW)
    assert load_scan(p).images.shape == (1, 12, 10)


# -- enhanced multi-frame -------------------------------------------------------------------


def _enhanced(path, frames, zs, *, shared_rescale=(2.0, -1000.0), per_frame_rescale=None):
    ds = _base(EnhancedCTImageStorage)
    _set_pixels(ds, frames, signed=True)
    shared = Dataset()
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = shared_rescale[0], shared_rescale[1], "HU"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    po = Dataset()
    po.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = Sequence([po])
    pm = Dataset()
    pm.PixelSpacing = [0.4, 0.4]
    pm.SliceThickness = 1.0
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for i, z in enumerate(zs):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, float(z)]
        item.PlanePositionSequence = Sequence([pp])
        if per_frame_rescale and i in per_frame_rescale:
            fr = Dataset()
            fr.RescaleSlope, fr.RescaleIntercept = per_frame_rescale[i]
            item.PixelValueTransformationSequence = Sequence([fr])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_ct_rescale_in_shared_groups_and_frames_sorted(tmp_path):
    frames = np.stack([np.full((8, 6), v, np.int16) for v in (30, 10, 20)])
    _enhanced(tmp_path / "enh.dcm", frames, zs=[30.0, 10.0, 20.0])
    scan = load_scan(tmp_path / "enh.dcm")
    assert scan.units == "HU" and scan.modality == "ct"
    assert scan.images.shape == (3, 8, 6)
    # sorted by z (10, 20, 30) and rescaled 2 * v - 1000 from the shared functional group
    np.testing.assert_array_equal(scan.images[:, 0, 0], [2 * 10 - 1000, 2 * 20 - 1000, 2 * 30 - 1000])
    assert [p[2] for p in scan.positions] == [10.0, 20.0, 30.0]
    assert scan.spacing == (0.4, 0.4)
    assert scan.metadata["Rescaled"] == "yes"


def test_enhanced_per_frame_rescale_overrides_shared(tmp_path):
    frames = np.stack([np.full((4, 4), 100, np.int16)] * 3)
    _enhanced(tmp_path / "enh.dcm", frames, zs=[0, 1, 2], per_frame_rescale={1: (1.0, -50.0)})
    scan = load_scan(tmp_path / "enh.dcm")
    np.testing.assert_array_equal(scan.images[:, 0, 0], [2 * 100 - 1000, 100 - 50, 2 * 100 - 1000])


# -- series folders -------------------------------------------------------------------------


def test_series_sorted_by_position_not_name(tmp_path):
    uid = generate_uid()
    # file names in one order, positions in another; pixel value encodes z
    for name, z in (("a.dcm", 10.0), ("b.dcm", -5.0), ("c.dcm", 2.5)):
        write_ct(tmp_path / name, np.full((6, 6), int(z * 10) + 100, np.int16), z=z, series_uid=uid,
                 instance={"a.dcm": 1, "b.dcm": 2, "c.dcm": 3}[name], intercept=0)
    (tmp_path / "README.txt").write_text("not dicom")
    scan = load_scan(tmp_path)
    assert scan.images.shape == (3, 6, 6)
    assert [p[2] for p in scan.positions] == [-5.0, 2.5, 10.0]
    np.testing.assert_array_equal(scan.images[:, 0, 0], [50, 125, 200])
    assert scan.metadata["SliceOrder"] == "position"
    assert scan.source == str(tmp_path)


def test_series_position_projected_on_oblique_normal(tmp_path):
    uid = generate_uid()
    # sagittal slices: rows along +y, columns along -z -> normal = row x col = -x
    for i, x in enumerate((3.0, 1.0, 2.0)):
        ds = _base(CTImageStorage, series_uid=uid)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, 100.0 - x, 0.0]  # y varies too: must use the projection on x
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        _set_pixels(ds, np.full((4, 4), int(x), np.int16), signed=True)
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    scan = load_scan(tmp_path)
    # ascending along the normal (-x): x = 3, 2, 1 (sorting on y = 100 - x would give the reverse)
    np.testing.assert_array_equal(scan.images[:, 0, 0], [3, 2, 1])


def test_series_without_geometry_falls_back_to_instance_number(tmp_path):
    uid = generate_uid()
    for name, inst in (("x1.dcm", 3), ("x2.dcm", 1), ("x3.dcm", 2)):
        write_ct(tmp_path / name, np.full((4, 4), inst, np.int16), instance=inst, series_uid=uid,
                 position=False, intercept=0)
    scan = load_scan(tmp_path)
    np.testing.assert_array_equal(scan.images[:, 0, 0], [1, 2, 3])
    assert scan.metadata["SliceOrder"] == "InstanceNumber"
    assert scan.positions is None


def test_two_series_listed_and_selectable(tmp_path):
    uid1, uid2 = "1.2.826.0.1.1", "1.2.826.0.1.2"
    for i in range(2):
        write_ct(tmp_path / f"s1_{i}.dcm", np.full((4, 4), 1, np.int16), z=i, series_uid=uid1,
                 series_number=1, description="head", intercept=0)
    for i in range(3):
        write_ct(tmp_path / f"s2_{i}.dcm", np.full((5, 5), 2, np.int16), z=i, series_uid=uid2,
                 series_number=2, description="bone", intercept=0)
    with pytest.raises(ScanError) as err:
        load_scan(tmp_path)
    msg = str(err.value)
    assert uid1 in msg and uid2 in msg and "series=" in msg and "head" in msg
    a = load_scan(tmp_path, series=uid1)
    b = load_scan(tmp_path, series=uid2)
    assert a.images.shape == (2, 4, 4) and b.images.shape == (3, 5, 5)
    assert load_scan(tmp_path, series="2").images.shape == (3, 5, 5)  # by SeriesNumber
    with pytest.raises(ScanError, match="not in this folder"):
        load_scan(tmp_path, series="9.9.9")
    infos = list_series(tmp_path)
    assert [s.uid for s in infos] == [uid1, uid2]
    assert [s.n_files for s in infos] == [2, 3]
    assert infos[1].description == "bone" and infos[1].rows == 5


def test_series_in_subfolders_and_mixed_sizes(tmp_path):
    uid = generate_uid()
    (tmp_path / "sub").mkdir()
    write_ct(tmp_path / "a.dcm", np.zeros((4, 4), np.int16), series_uid=uid, z=0)
    write_ct(tmp_path / "sub" / "b.dcm", np.zeros((5, 4), np.int16), series_uid=uid, z=1)
    with pytest.raises(ScanError, match="mixes image sizes"):
        load_scan(tmp_path)


def test_empty_and_non_dicom_folder(tmp_path):
    with pytest.raises(ScanError, match="no DICOM image files"):
        load_scan(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanError, match="no DICOM image files"):
        load_scan(tmp_path)


# -- corruption -----------------------------------------------------------------------------


def test_truncated_pixel_data_element(tmp_path):
    ds = _base(CTImageStorage)
    _set_pixels(ds, RAW, signed=True)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "half.dcm", enforce_file_format=True)
    with pytest.raises(ScanError, match=r"half\.dcm.*truncated"):
        load_scan(tmp_path / "half.dcm")


def test_truncated_file(tmp_path):
    p = tmp_path / "cut.dcm"
    write_ct(p, RAW)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 60])
    with pytest.raises(ScanError, match=r"cut\.dcm"):
        load_scan(p)


def test_missing_pixel_data(tmp_path):
    ds = _base(CTImageStorage)
    ds.Rows, ds.Columns = 4, 4
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(ScanError, match=r"nopix\.dcm: no pixel data"):
        load_scan(tmp_path / "nopix.dcm")


def test_structured_report_is_not_an_image(tmp_path):
    ds = _base(BASIC_TEXT_SR, modality="SR")
    ds.ContentDate = "20240101"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(ScanError) as err:
        load_scan(tmp_path / "report.dcm")
    assert "report.dcm" in str(err.value) and "no pixel data" in str(err.value) and "SR" in str(err.value)
    # in a folder with only the report: no image series
    with pytest.raises(ScanError, match="non-image"):
        load_scan(tmp_path)


def test_random_bytes_not_dicom(tmp_path):
    p = tmp_path / "noise.dcm"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ScanError, match=r"noise\.dcm: not a DICOM file"):
        load_scan(p)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(ScanError, match="not a DICOM file"):
        load_scan(tmp_path / "empty.dcm")


def test_size_guard_before_decoding(tmp_path):
    p = tmp_path / "ct.dcm"
    write_ct(p, RAW)
    with pytest.raises(ScanError, match="limit"):
        load_scan(p, max_voxels=100)


def test_missing_path():
    with pytest.raises(ScanError, match="no such file"):
        load_scan("/nonexistent/definitely/not/here.dcm")


# -- real files bundled with pydicom ---------------------------------------------------------


def test_pydicom_ct_small_in_hu():
    p = pydicom_test_file("CT_small.dcm")
    if p is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    scan = load_scan(p)
    assert scan.images.shape == (1, 128, 128)
    assert scan.units == "HU" and scan.modality == "ct"
    assert scan.metadata["RescaleIntercept"] == "-1024"
    lo, hi = float(scan.images.min()), float(scan.images.max())
    assert -1024 <= lo < -500 and 500 < hi < 3000  # air-ish and bone present


def test_pydicom_mr_small_encodings_agree():
    names = ("MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm")
    paths = [pydicom_test_file(n) for n in names]
    if any(p is None for p in paths):
        pytest.skip("pydicom's MR_small test files are not installed")
    ref = load_scan(paths[0]).images
    assert ref.shape == (1, 64, 64)
    for p in paths[1:]:
        np.testing.assert_array_equal(load_scan(p).images, ref)


def test_pydicom_truncated_and_sr_files():
    p = pydicom_test_file("MR_truncated.dcm")
    if p is None:
        pytest.skip("pydicom test files not installed")
    with pytest.raises(ScanError, match="truncated"):
        load_scan(p)
    sr = pydicom_test_file("test-SR.dcm")
    with pytest.raises(ScanError, match="no pixel data"):
        load_scan(sr)


def test_missing_codec_names_package():
    p = pydicom_test_file("JPGExtended.dcm")
    if p is None:
        pytest.skip("pydicom test files not installed")
    try:
        scan = load_scan(p)
    except ScanError as exc:
        assert "JPGExtended.dcm" in str(exc)
        assert "pip install pylibjpeg" in str(exc)
    else:  # a 12-bit JPEG decoder is installed on this machine
        assert scan.images.ndim == 3


def test_pydicom_test_file_rejects_paths():
    assert pydicom_test_file("../__init__.py") is None
    assert pydicom_test_file("no_such_file_here.dcm") is None


def test_monochrome1_inverted_unless_hu(tmp_path):
    ds = _base(MRImageStorage, modality="MR")
    _set_pixels(ds, np.array([[0, 100], [200, 300]], np.int16), signed=True)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    s = load_scan(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(s.images[0], [[300, 200], [100, 0]])  # bright = high after flip
