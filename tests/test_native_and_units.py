"""Real scans at their own size and in their own units: HU round trips through reconstruct and export,
geometry and UID lineage of exported DICOM, native-size reconstruction (512x512 from the CLI), sizes
that measurements do not allow, modality detection and the CLI's modality rule, and ``--version``."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import deepinv as dinv
import h5py
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import engine
from engine import linalg
from engine.checkpoint import Checkpoint, save_checkpoint
from engine.cli import main
from engine.config import ExperimentConfig, PhysicsConfig, builtin_config
from engine.data import (AUTO_CT_WINDOW, colin27_t1_path, from_hu, invesalius_head_ct_path, load_scan, native_size,
                         phantom_batch, prepare_slices, pydicom_test_file, resize, scan_hu_window, to_hu)
from engine.data.intensity import resampled_grid
from engine.errors import ConfigError, ScanError
from engine.export import export_image
from engine.inference import check_modality, model_from_config
from engine.measured import measured_image_size
from engine.model import build_model
from engine.physics import SparseTomography, _radon_rows, build_physics, detector_count, radon_matrices
from tests.helpers import ct_dicom_bytes

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(path: Path, config: ExperimentConfig) -> Path:
    """A checkpoint of the config's model with the shipped pretrained denoiser (no training)."""
    state = {k: v.detach().clone() for k, v in build_model(config).state_dict().items()}
    save_checkpoint(path, Checkpoint(model_state=state, config=config.to_dict()))
    return path


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory) -> Path:
    """ct_head (128 px, 30 views) with the shipped weights: reconstructions worth measuring in HU."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ct_head.pt", builtin_config("ct_head"))


@pytest.fixture(scope="module")
def fast_ct_checkpoint(tmp_path_factory) -> Path:
    """The same network, few views and iterations: a 512 px operator and solve in seconds."""
    config = builtin_config("ct_head").replace(**{"physics.views": 8, "solver.max_iter": 3})
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ct_fast.pt", config)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def hu_of(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def real(getter, *args):
    path = getter(*args)
    if path is None:
        pytest.skip(f"{args[0] if args else getter.__name__} is not installed")
    return path


# -- HU, the one mapping ---------------------------------------------------------------------------

def test_to_hu_and_from_hu_invert_the_window_prepare_slices_used():
    assert to_hu(np.array([0.0, 1.0]), None).tolist() == list(AUTO_CT_WINDOW)
    assert to_hu(0.5, "brain") == pytest.approx(40.0) and to_hu(np.float32(0.5), (-160, 240)).dtype == np.float32
    x = np.linspace(-0.1, 1.1, 13, dtype=np.float32)  # beyond [0, 1] too: no clipping
    np.testing.assert_allclose(from_hu(to_hu(x, (-1000, 1500)), (-1000, 1500)), x, atol=1e-6)
    hu = np.array([[-1000.0, 0.0], [40.0, 1500.0]], dtype=np.float32)
    scan = load_scan(real(pydicom_test_file, "CT_small.dcm"))
    window = scan_hu_window(scan, None)
    assert window == AUTO_CT_WINDOW
    np.testing.assert_allclose(to_hu(from_hu(hu, window), window), hu, atol=1e-3)
    np.testing.assert_allclose(from_hu(hu, window), np.clip((hu + 1000) / 2500, 0, 1), atol=1e-7)
    assert scan_hu_window(load_scan(real(pydicom_test_file, "MR_small.dcm"))) is None  # no unit to go back to


def test_resampled_grid_is_where_prepare_slices_puts_its_pixels():
    """A linear image stays linear under padding-free area/bilinear resampling: its values locate the pixels."""
    rows, cols = np.mgrid[0:96, 0:64].astype(np.float32)
    image = 3.0 * rows + 1.0 * cols + 10.0
    for size in (48, 32):  # factor 2 (block means) and 3 (bilinear, antialiased)
        squared = np.zeros((96, 96), np.float32)
        squared[:, 16:80] = image  # prepare_slices pads the short side about the centre
        out = resize(squared, size)
        row0, col0, step = resampled_grid((96, 64), size)
        i, j = np.mgrid[0:size, 0:size]
        expected = 3.0 * (row0 + i * step) + (col0 + j * step) + 10.0
        inside = (col0 + j * step > 2) & (col0 + j * step < 61)  # away from the padding's edge
        np.testing.assert_allclose(out[inside], expected[inside], rtol=1e-4)
    assert resampled_grid((96, 64), 96) == (0.0, -16.0, 1.0)


# -- HU round trip: read -> reconstruct -> export -> read back ------------------------------------

def test_ct_small_round_trip_in_hu_keeps_geometry_and_lineage(ct_checkpoint, tmp_path, capsys):
    source_path = real(pydicom_test_file, "CT_small.dcm")
    source = pydicom.dcmread(source_path)
    out = tmp_path / "recon.dcm"
    code, stdout, err = cli(capsys, "reconstruct", "--checkpoint", ct_checkpoint, "--input", source_path,
                            "--output", out, "--size", "native")
    assert code == 0, err
    assert "at 128x128" in stdout and "(HU)" in stdout and err == ""
    ds = pydicom.dcmread(out)
    assert ds.Modality == "CT" and ds.RescaleType == "HU" and (ds.Rows, ds.Columns) == (128, 128)
    low, high = AUTO_CT_WINDOW
    assert float(ds.WindowCenter) == (low + high) / 2 and float(ds.WindowWidth) == high - low
    # geometry: native size, so the same pixel grid as the source slice
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([float(v) for v in source.ImagePositionPatient])
    assert [float(v) for v in ds.ImageOrientationPatient] == [float(v) for v in source.ImageOrientationPatient]
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) for v in source.PixelSpacing])
    assert float(ds.SliceThickness) == float(source.SliceThickness)
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    # lineage: same study, new series and instance, the source slice named
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    for sequence in (ds.SourceImageSequence, ds.ReferencedImageSequence):
        assert sequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert sequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # values in HU where the source has soft tissue and its darkest (below-window) background
    recon, truth = hu_of(ds), hu_of(source)
    soft = (truth > -100) & (truth < 100)
    background = truth < -700
    assert soft.sum() > 2000 and background.sum() > 1000
    assert abs(np.median(recon[soft]) - np.median(truth[soft])) < 30
    assert abs(np.median(recon[background]) - np.median(truth[background])) < 60
    # the project's reader gets the same HU back
    again = load_scan(out)
    assert again.units == "HU" and again.modality == "ct"
    np.testing.assert_allclose(again.images[0], recon, atol=float(ds.RescaleSlope))


def test_head_ct_round_trip_air_and_brain_in_hu(ct_checkpoint, tmp_path, capsys):
    scan_path = real(invesalius_head_ct_path)
    scan = load_scan(scan_path)
    out = tmp_path / "head.dcm"
    code, stdout, err = cli(capsys, "reconstruct", "--checkpoint", ct_checkpoint, "--input", scan_path,
                            "--output", out, "--slice", "54")
    assert code == 0, err
    recon = hu_of(pydicom.dcmread(out))
    truth = prepare_slices(scan, 128)[54]  # the slice on the model's grid, in [0, 1] of the window
    truth_hu = to_hu(truth, AUTO_CT_WINDOW)
    air, brain = truth_hu < -990, (truth_hu > 0) & (truth_hu < 80)
    assert air.sum() > 2000 and brain.sum() > 500
    assert abs(np.median(recon[air]) - (-1000)) < 50  # air near -1000 HU
    assert 0 < np.median(recon[brain]) < 100  # brain near water


def test_exports_record_units_and_window(tmp_path):
    image = np.linspace(-1000, 1500, 64, dtype=np.float32).reshape(8, 8)
    scan = load_scan(real(pydicom_test_file, "CT_small.dcm"))
    npz = np.load(export_image(image, tmp_path / "r.npz", window=(-160, 240), units="HU", source_scan=scan))
    assert str(npz["units"]) == "HU" and npz["window"].tolist() == [-160, 240]
    np.testing.assert_array_equal(npz["reconstruction"], image)
    with h5py.File(export_image(image, tmp_path / "r.h5", window=(0, 1), units="normalised", source_scan=scan)) as f:
        assert f["reconstruction"].attrs["units"] == "normalised"  # not the source's HU: these are [0, 1]
    with Image.open(export_image(image, tmp_path / "r.png", window=(-160, 240), units="HU")) as im:
        assert im.info["Units"] == "HU" and im.info["Window"] == "-160.0 240.0"
    with pytest.raises(ScanError, match="source slice 3"):
        export_image(image, tmp_path / "x.dcm", source_scan=scan, source_slice=3)


def test_export_at_another_size_moves_position_and_spacing(tmp_path):
    """A 2x coarser reconstruction: spacing doubles, the first pixel's centre moves half a source pixel."""
    scan = load_scan(real(pydicom_test_file, "CT_small.dcm"))
    ds = pydicom.dcmread(export_image(np.zeros((64, 64)), tmp_path / "half.dcm", source_scan=scan, source_slice=0,
                                      units="HU"))
    spacing = np.asarray(scan.spacing)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(2 * spacing))
    shift = 0.5 * spacing[1] * np.asarray(scan.orientation[:3]) + 0.5 * spacing[0] * np.asarray(scan.orientation[3:])
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(list(np.asarray(scan.positions[0]) + shift),
                                                                        abs=1e-4)


# -- native resolution -----------------------------------------------------------------------------

def dicom_512(path: Path) -> Path:
    """A 512x512 CT slice in HU with full geometry (a phantom: air, skull, brain)."""
    hu = np.round(phantom_batch("shepp_logan", 1, 512, seed=0)[0] * 1100 - 1000).astype(np.int16)
    path.write_bytes(ct_dicom_bytes(512, 512, pixels=(hu + 1024).astype("<i2").tobytes(), intercept=-1024,
                                    PixelSpacing=[0.5, 0.5], ImagePositionPatient=[-128.0, -140.0, 30.0],
                                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SliceThickness=2.5,
                                    FrameOfReferenceUID=pydicom.uid.generate_uid(),
                                    StudyInstanceUID=pydicom.uid.generate_uid()))
    return path


def test_512_dicom_reconstructs_at_512_from_the_cli(fast_ct_checkpoint, tmp_path, capsys):
    source_path = dicom_512(tmp_path / "big.dcm")
    out = tmp_path / "big_recon.dcm"
    started = time.perf_counter()
    code, stdout, err = cli(capsys, "reconstruct", "--checkpoint", fast_ct_checkpoint, "--input", source_path,
                            "--output", out, "--size", "native")
    seconds = time.perf_counter() - started
    assert code == 0, err
    assert "at 512x512" in stdout
    ds, source = pydicom.dcmread(out), pydicom.dcmread(source_path)
    assert (ds.Rows, ds.Columns) == (512, 512) and ds.RescaleType == "HU"
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
    assert [float(v) for v in ds.ImagePositionPatient] == [-128.0, -140.0, 30.0]
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID and float(ds.SliceThickness) == 2.5
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    truth = hu_of(source)
    assert abs(np.median(hu_of(ds)[truth < -990]) - (-1000)) < 50  # the air around the phantom
    print(f"512x512 CLI reconstruction (8 views, 3 iterations): {seconds:.1f} s")  # ~10 s on 2 shared cores


def test_at_size_shares_the_network_and_builds_the_operator_for_the_size():
    base = model_from_config(builtin_config("ct_phantom_quick"))
    big = base.at_size(96)
    assert big.size == 96 and big.physics.img_width == 96 and big.model is base.model
    assert base.at_size(96) is big and big.at_size(base.size) is base and base.at_size(base.size) is base
    assert big.physics.A(torch.zeros(1, 1, 96, 96)).shape[-2:] == (detector_count(96), base.config.physics.views)
    result = big.reconstruct(phantom_batch("shepp_logan", 1, 96, seed=0))
    assert result.reconstruction.shape == (1, 96, 96) and result.psnr[0] > result.baseline_psnr[0]
    with pytest.raises(ConfigError, match="physics.img_size"):
        base.at_size(4)
    mri = model_from_config(builtin_config("mri_brain")).at_size(64)
    assert mri.physics.mask.shape[-2:] == (64, 64)


def test_measurements_fix_their_size(tmp_path):
    cfg = builtin_config("ct_phantom_quick").physics  # 64 px, 16 views
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = np.random.default_rng(0).random((2, cfg.views, detector_count(48))).astype(np.float32)
    sinogram = load_scan(tmp_path / "s.h5")
    assert sinogram.modality == "ct" and measured_image_size(sinogram, cfg) == 48
    with pytest.raises(ScanError, match=r"--size 64 is not possible: the sinogram's 68 detector cells fix the "
                                        r"image at 48 x 48"):
        measured_image_size(sinogram, cfg, 64)
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["kspace"] = np.ones((1, 40, 36), np.complex64)
    kspace = load_scan(tmp_path / "k.h5")
    assert kspace.modality == "mri" and measured_image_size(kspace, cfg) == 36
    assert measured_image_size(kspace, cfg, 24) == 24  # a centre crop: same field of view, coarser
    with pytest.raises(ScanError, match="--size 40 is not possible: the k-space is 40 x 36"):
        measured_image_size(kspace, cfg, 40)
    with pytest.raises(ScanError, match="image slices are needed"):
        native_size(kspace)


def test_cli_refuses_a_size_the_sinogram_does_not_allow(tmp_path, capsys):
    config = builtin_config("ct_phantom_quick").replace(**{"model.channels": 8, "model.depth": 1})
    ckpt = write_checkpoint(tmp_path / "c.pt", config)
    physics = build_physics(config.physics)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = np.random.default_rng(0).random((1, 16, detector_count(64))).astype(np.float32)
    code, _, err = cli(capsys, "reconstruct", "--checkpoint", ckpt, "--input", tmp_path / "s.h5",
                       "--output", tmp_path / "o.npy", "--size", "128")
    assert code == 2 and err.count("\n") == 1
    assert "--size 128 is not possible: the sinogram's 91 detector cells fix the image at 64 x 64" in err
    assert physics.img_width == 64


# -- modality ---------------------------------------------------------------------------------------

def test_modality_from_dicom_nifti_and_hdf5(tmp_path):
    nib = pytest.importorskip("nibabel")
    assert load_scan(real(pydicom_test_file, "CT_small.dcm")).modality == "ct"
    assert load_scan(real(pydicom_test_file, "MR_small.dcm")).modality == "mri"
    volume = np.full((8, 8, 3), -1000.0, np.float32)
    volume[2:6, 2:6] = 40.0

    def nifti(name, descrip=b"", intent_name=b""):
        image = nib.Nifti1Image(volume, np.eye(4))
        image.header["descrip"], image.header["intent_name"] = descrip, intent_name
        nib.save(image, tmp_path / name)
        return load_scan(tmp_path / name)

    said_ct = nifti("ct.nii", b"CT head, converted")
    assert said_ct.modality == "ct" and said_ct.units == "HU"
    assert nifti("mr.nii", b"TE=3.5;Time=101530").modality == "mri"
    assert nifti("t1.nii", intent_name=b"T1w").modality == "mri"
    silent = nifti("plain.nii")  # HU-like values, a header that says nothing: never guessed CT
    assert silent.modality == "unknown" and silent.units == "arbitrary" and "Hounsfield" in silent.metadata["ModalityHint"]
    colin = colin27_t1_path()
    if colin is not None:
        assert load_scan(colin).modality in ("mri", "unknown")
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["kspace"] = np.ones((1, 8, 8), np.complex64)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = np.ones((1, 4, 12), np.float32)
    assert load_scan(tmp_path / "k.h5").modality == "mri" and load_scan(tmp_path / "s.h5").modality == "ct"


def test_dicom_keeps_per_slice_uids_in_slice_order(tmp_path):
    from tests.test_data_dicom import _enhanced, write_ct

    uid = pydicom.uid.generate_uid()
    written = {z: write_ct(tmp_path / f"{name}.dcm", np.zeros((4, 4), np.int16), z=z, series_uid=uid)
               for name, z in (("a", 10.0), ("b", -5.0), ("c", 2.5))}
    scan = load_scan(tmp_path)
    assert [s.sop_instance_uid for s in scan.source_images] == \
        [written[z].SOPInstanceUID for z in (-5.0, 2.5, 10.0)]
    assert {s.sop_class_uid for s in scan.source_images} == {pydicom.uid.CTImageStorage}
    _enhanced(tmp_path / "enh.dcm", np.zeros((3, 4, 4), np.int16), zs=[30.0, 10.0, 20.0])
    frames = load_scan(tmp_path / "enh.dcm")
    assert [s.frame for s in frames.source_images] == [2, 3, 1]  # frames sorted by z: 10, 20, 30
    assert frames.metadata["SliceThickness"] == "1"


def test_check_modality():
    ct, mr = load_scan(real(pydicom_test_file, "CT_small.dcm")), load_scan(real(pydicom_test_file, "MR_small.dcm"))
    assert check_modality(ct, "ct").relation == "same" and check_modality(ct, "ct").message == ""
    assert check_modality(mr, "ct").relation == "different" and not check_modality(mr, "ct").ok
    assert "MR_small.dcm is an MR image but the model reconstructs CT" in check_modality(mr, "ct").message
    unknown = load_scan(real(pydicom_test_file, "CT_small.dcm"))
    unknown.modality = "unknown"
    assert check_modality(unknown, "mri").relation == "unknown"


def test_cli_refuses_an_mr_image_for_a_ct_model_unless_forced(ct_checkpoint, tmp_path, capsys):
    mr = real(pydicom_test_file, "MR_small.dcm")
    code, _, err = cli(capsys, "reconstruct", "--checkpoint", ct_checkpoint, "--input", mr, "--output",
                       tmp_path / "o.npy")
    assert code == 2 and err.count("\n") == 1 and "--force-modality" in err and "an MR image" in err
    assert not (tmp_path / "o.npy").exists()
    code, _, err = cli(capsys, "reconstruct", "--checkpoint", ct_checkpoint, "--input", mr, "--output",
                       tmp_path / "o.npy", "--force-modality")
    assert code == 0 and err.startswith("note: MR_small.dcm is an MR image")
    code, _, err = cli(capsys, "evaluate", "--checkpoint", ct_checkpoint, "--data", mr)
    assert code == 2 and err.count("\n") == 1 and "--force-modality" in err
    np.save(tmp_path / "slices.npy", phantom_batch("ellipses", 2, 40, seed=0))
    code, _, err = cli(capsys, "reconstruct", "--checkpoint", ct_checkpoint, "--input", tmp_path / "slices.npy",
                       "--output", tmp_path / "u.npy")
    assert code == 0 and err.startswith("note: slices.npy: the file does not say its modality")
    code, out, err = cli(capsys, "evaluate", "--checkpoint", ct_checkpoint, "--data", tmp_path / "slices.npy",
                         "--json")
    assert code == 0 and err == "" and any("does not say its modality" in n for n in json.loads(out)["notes"])


def test_version_is_pyprojects_and_read_from_one_place(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"equideq {engine.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert engine.__version__ == project["project"]["version"]  # tests/test_packaging.py: how it is read


# -- the operator at large sizes -------------------------------------------------------------------

def test_settled_power_iteration_agrees_with_the_fixed_count():
    assert linalg.normalisation_rtol(256 * 256) == 0.0 and linalg.normalisation_rtol(512 * 512) > 0
    physics = build_physics(PhysicsConfig(img_size=48, views=9, noise="none"))
    start = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    steps = []

    def normal(v):
        steps.append(1)
        return physics.A_adjoint(physics.A(v))

    fixed = linalg.largest_eigenvalue(normal, start, 50)
    assert len(steps) == 50
    settled = linalg.largest_eigenvalue(normal, start, 50, rtol=linalg.SETTLED_RTOL)
    assert len(steps) - 50 < 30 and settled == pytest.approx(fixed, rel=1e-6)


def test_ray_grids_are_released_and_rebuilt_identically():
    physics = SparseTomography(angles=7, img_width=20, dtype=torch.float32)
    assert physics.radon.all_grids.numel() == 0  # dropped once the matrices exist
    rebuilt = radon_matrices(physics.radon, 20, False, torch.float64, "cpu")[0].matrix  # grids made again
    fresh = dinv.physics.Tomography(angles=7, img_width=20, normalize=False, dtype=torch.float32)
    counts, cols, vals, _ = _radon_rows(fresh.radon, 20, False, torch.float64)  # deepinv's own grids
    assert torch.equal(rebuilt.col_indices().long(), cols.long()) and torch.equal(rebuilt.values(), vals)
    assert torch.equal(rebuilt.crow_indices().diff().long(), counts)
