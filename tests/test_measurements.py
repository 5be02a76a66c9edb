"""Measurement-domain data: k-space and sinogram files -> deepinv y, training and reconstruction from them."""

import json

import h5py
import numpy as np
import pytest
import torch

from engine.cli import main
from engine.config import ExperimentConfig, PhysicsConfig, save_config
from engine.data import load_scan, phantom_batch
from engine.data.measurements import fft2c, ifft2c, is_measurement_file, kspace_from_y, sinogram_from_y
from engine.measured import load_measurement_data, load_measurements, measurement_metrics, measurement_physics
from engine.errors import ConfigError, ScanError
from engine.events import Observers, ValidationFinished
from engine.physics import build_physics, detector_count
from engine.trainer import GroundTruthLocked, Trainer

SIZE = 32


def mri_cfg(**kw) -> PhysicsConfig:
    return PhysicsConfig(modality="mri", img_size=SIZE, noise="none", **kw)


def ct_cfg(**kw) -> PhysicsConfig:
    return PhysicsConfig(modality="ct", img_size=SIZE, views=12, noise="none", **kw)


def complex_phantoms(n=3, seed=1) -> torch.Tensor:
    x = torch.from_numpy(phantom_batch("ellipses", n, SIZE, seed=seed))[:, None]
    return torch.cat([x, 0.3 * x.flip(-1)], 1)  # a non-trivial imaginary part


def tiny_experiment(modality: str, paths, **changes) -> ExperimentConfig:
    base = {
        "physics.modality": modality, "physics.img_size": SIZE, "physics.views": 12,
        "data.source": "files", "data.paths": [str(p) for p in paths],
        "model.channels": 8, "model.depth": 1, "solver.tol": 1e-3, "solver.max_iter": 20,
        "backward_solver.tol": 1e-3, "backward_solver.max_iter": 20, "optim.steps": 2, "optim.batch_size": 2,
        "run.validate_every": 1, "run.checkpoint_every": 0, "run.threads": 1,
    }
    base.update(changes)
    return ExperimentConfig().replace(**base)


def write_fastmri(path, kspace, mask=None, **extra):
    with h5py.File(path, "w") as f:
        f["kspace"] = np.asarray(kspace, np.complex64)
        if mask is not None:
            f["mask"] = np.asarray(mask, np.float32)
        for key, value in extra.items():
            f[key] = value
        f.attrs["acquisition"] = "CORPD_FBK"
    return path


# -- conventions: round trips ----------------------------------------------------------------


def test_mri_round_trip_through_a_fastmri_file(tmp_path):
    cfg = mri_cfg()
    physics = build_physics(cfg)
    x = complex_phantoms()
    y = physics.A(x)
    # deepinv's MRI is fastMRI's fft2c: centred, orthonormal, (real, imag) channels
    xc = (x[:, 0] + 1j * x[:, 1]).numpy()
    reference = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(xc, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(kspace_from_y(y), reference * physics.mask[0, 0].numpy(), atol=1e-5)
    column_mask = physics.mask[0, 0, 0].numpy()  # deepinv samples whole columns, as fastMRI does
    assert torch.equal(physics.mask[0, 0], physics.mask[0, 0, :1].expand(SIZE, -1))
    path = write_fastmri(tmp_path / "k.h5", kspace_from_y(y), column_mask)
    assert is_measurement_file(path)
    meas = load_measurements(path, cfg, normalise=False)
    assert meas.modality == "mri" and meas.reference is None
    assert torch.equal(meas.y, y)
    assert torch.equal(meas.mask, physics.mask[0, 0])
    torch.testing.assert_close(measurement_physics(cfg, meas).A(x), y)


def test_mri_mask_inferred_from_zeros_and_normalisation(tmp_path):
    cfg = mri_cfg()
    physics = build_physics(cfg)
    y = physics.A(complex_phantoms())
    meas = load_measurements(write_fastmri(tmp_path / "k.h5", kspace_from_y(y) * 1e-5), cfg)
    assert torch.equal(meas.mask, physics.mask[0, 0])
    torch.testing.assert_close(meas.y * meas.scale, y * 1e-5, rtol=1e-5, atol=1e-12)
    zero_filled = ifft2c(torch.complex(meas.y[:, 0], meas.y[:, 1])).abs()
    assert abs(float(np.percentile(zero_filled.numpy(), 99.5)) - 1.0) < 1e-4  # robust max -> 1


def test_fully_sampled_kspace_is_undersampled_with_the_config_mask(tmp_path):
    cfg = mri_cfg()
    physics = build_physics(cfg)
    x = complex_phantoms()
    full = kspace_from_y(build_physics(cfg, mask=torch.ones(1, 2, SIZE, SIZE)).A(x))
    meas = load_measurements(write_fastmri(tmp_path / "full.h5", full), cfg, normalise=False)
    assert meas.reference_kind == "fully sampled"
    torch.testing.assert_close(meas.reference, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(meas.y, physics.A(x))
    assert any("retrospectively undersampled" in n for n in meas.notes)


def test_larger_kspace_is_centre_cropped_and_smaller_refused(tmp_path):
    cfg = mri_cfg()
    rng = np.random.default_rng(0)
    big = (rng.normal(size=(2, 48, 40)) + 1j * rng.normal(size=(2, 48, 40))).astype(np.complex64)
    mask = np.zeros(40, np.float32)
    mask[::3] = 1
    mask[16:24] = 1
    meas = load_measurements(write_fastmri(tmp_path / "big.h5", big * mask, mask), cfg, normalise=False)
    expected = big[:, 24 - 16:24 + 16, 20 - 16:20 + 16] * mask[4:36]
    np.testing.assert_allclose(kspace_from_y(meas.y), expected, atol=1e-6)
    assert any("centre-cropped" in n for n in meas.notes)
    with pytest.raises(ScanError, match=r"small.h5: k-space slices are 24 x 24, smaller than the 32 x 32"):
        load_measurements(write_fastmri(tmp_path / "small.h5", big[:, :24, :24]), cfg)


def test_multicoil_fully_sampled_combines_to_the_image(tmp_path):
    cfg = mri_cfg()
    x = complex_phantoms()
    xc = torch.complex(x[:, 0], x[:, 1])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    maps = torch.stack([torch.exp(-((yy - a) ** 2 + (xx - b) ** 2)) * torch.exp(1j * torch.tensor(p))
                        for a, b, p in [(-1, -1, 0.0), (1, 1, 1.0), (-1, 1, 2.0), (1, -1, -1.0)]])
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    coil_kspace = fft2c(maps[None] * xc[:, None]).numpy()
    meas = load_measurements(write_fastmri(tmp_path / "mc.h5", coil_kspace), cfg, normalise=False)
    ref = torch.complex(meas.reference[:, 0], meas.reference[:, 1])
    assert float((ref.abs() - xc.abs()).norm() / xc.abs().norm()) < 0.02  # the coil-combined magnitude
    torch.testing.assert_close(meas.y, build_physics(cfg).A(meas.reference))  # exact single-coil data
    assert any("4 coils combined" in n for n in meas.notes)


def test_ct_round_trip_with_the_files_angles(tmp_path):
    cfg = ct_cfg()
    physics = build_physics(cfg)
    x = complex_phantoms()[:, :1]
    y = physics.A(x)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sinogram"] = sinogram_from_y(y, float(physics.operator_norm))
        f["angles"] = np.linspace(0, 180, 12, endpoint=False)
    meas = load_measurements(tmp_path / "s.h5", cfg, normalise=False)
    assert torch.equal(meas.y, y) and meas.notes == []
    # other angles: the physics is built from the file's list
    angles = np.sort(np.random.default_rng(0).uniform(0, 180, 12))
    other = build_physics(cfg, angles=angles)
    y2 = other.A(x)
    assert not torch.allclose(y2, y)
    with h5py.File(tmp_path / "s2.h5", "w") as f:
        f["sinogram"] = sinogram_from_y(y2, float(other.operator_norm))
        f["angles"] = np.deg2rad(angles)
        f["angles"].attrs["units"] = "rad"
        f["images"] = 3.0 * x[:, 0].numpy()
    meas = load_measurements(tmp_path / "s2.h5", cfg, normalise=False)
    torch.testing.assert_close(meas.y, y2)
    torch.testing.assert_close(measurement_physics(cfg, meas).A(x), y2)
    torch.testing.assert_close(meas.reference, x, atol=1e-4, rtol=1e-4)  # scale fitted to the data
    assert any("not the 12 equispaced" in n for n in meas.notes)


def test_ct_geometry_mismatches_name_both_numbers(tmp_path):
    cfg = ct_cfg()
    with h5py.File(tmp_path / "det.h5", "w") as f:
        f["sinogram"] = np.ones((1, 12, 40), np.float32)
    with pytest.raises(ScanError, match=rf"det.h5: the sinogram has 40 detector cells, .* has {detector_count(32)}"):
        load_measurements(tmp_path / "det.h5", cfg)
    with h5py.File(tmp_path / "views.h5", "w") as f:
        f["sinogram"] = np.ones((1, 30, detector_count(32)), np.float32)
    with pytest.raises(ScanError, match=r"views.h5: the sinogram has 30 projection angles, but the config is for "
                                        r"12-view"):
        load_measurements(tmp_path / "views.h5", cfg)
    with pytest.raises(ScanError, match="holds a CT sinogram, but the config is for"):
        load_measurements(tmp_path / "views.h5", mri_cfg())


def test_measurement_metrics():
    cfg = ct_cfg()
    physics = build_physics(cfg)
    x = complex_phantoms(2)[:, :1]
    y = physics.A(x)
    psnr, residual = measurement_metrics(physics, x, y)
    assert (residual < 1e-6).all() and (psnr > 100).all()
    psnr, residual = measurement_metrics(physics, 0.9 * x, y)
    torch.testing.assert_close(residual, torch.full((2,), 0.1), atol=1e-4, rtol=0)
    assert (psnr < 60).all()


# -- training and reconstruction from measured data ------------------------------------------


@pytest.fixture(scope="module")
def single_coil_file(tmp_path_factory):
    """A synthetic single-coil fastMRI file: noisy k-space of phantoms under the physics' mask, no reference."""
    folder = tmp_path_factory.mktemp("fastmri")
    cfg = tiny_experiment("mri", [])
    physics = build_physics(cfg.physics, rng=torch.Generator().manual_seed(0))
    x = torch.from_numpy(phantom_batch("ellipses", 6, SIZE, seed=3))[:, None]
    y = physics(torch.cat([x, torch.zeros_like(x)], 1))
    return write_fastmri(folder / "knee_singlecoil.h5", kspace_from_y(y), physics.mask[0, 0, 0].numpy())


def test_cli_trains_on_kspace_and_reconstructs_from_it(single_coil_file, tmp_path, capsys):
    cfg = tiny_experiment("mri", [single_coil_file])
    save_config(cfg, tmp_path / "mri.toml")
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "mri.toml"), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "completed at step 2" in out and "measurement-domain PSNR" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r["validation"] for r in records if "validation" in r]
    assert len(validation) == 3 and validation[-1]["domain"] == "measurement"
    assert 0 < validation[-1]["residual"] < 1 and np.isnan(validation[-1]["ssim"])

    output = tmp_path / "recon.npy"
    assert main(["reconstruct", "--checkpoint", str(run / "last.pt"), "--input", str(single_coil_file),
                 "--output", str(output), "--slice", "1"]) == 0
    assert "slice 1 (measured)" in capsys.readouterr().out
    image = np.load(output)
    assert image.shape == (SIZE, SIZE) and np.isfinite(image).all() and image.max() > 0

    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(single_coil_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["domain"] == "measurement" and result["images"] == 6
    for key in ("model", "baseline"):
        assert set(result[key]) >= {"psnr", "ssim", "residual"} and np.isnan(result[key]["ssim"])
    assert result["model"]["psnr"] > 10 and result["baseline"]["residual"] < 1e-5  # zero-filled is consistent


def test_reconstruct_refuses_measurements_of_another_physics(single_coil_file, tmp_path, capsys):
    cfg = tiny_experiment("ct", [], **{"data.source": "phantom", "data.n_train": 2, "data.n_val": 1,
                                       "optim.steps": 1, "run.validate_every": 5})
    save_config(cfg, tmp_path / "ct.toml")
    assert main(["train", "--config", str(tmp_path / "ct.toml"), "--out", str(tmp_path / "ct"), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["reconstruct", "--checkpoint", str(tmp_path / "ct" / "last.pt"), "--input", str(single_coil_file),
                 "--output", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: knee_singlecoil.h5: holds MRI k-space, but checkpoint last.pt is for 12-view")


def test_supervised_training_needs_references(single_coil_file, tmp_path, capsys):
    cfg = tiny_experiment("mri", [single_coil_file], **{"loss.mode": "supervised"})
    save_config(cfg, tmp_path / "sup.toml")
    assert main(["train", "--config", str(tmp_path / "sup.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss.mode = 'supervised' needs reference images" in err
    with pytest.raises(ConfigError, match="supervised"):
        Trainer(cfg)


def test_multicoil_file_loads_and_trains_one_step(tmp_path):
    cfg = tiny_experiment("mri", [tmp_path / "brain_multicoil.h5"], **{
        "optim.steps": 1, "physics.acceleration": 2.0, "physics.center_fraction": 0.25})
    physics = build_physics(cfg.physics)
    x = complex_phantoms(4, seed=5)
    xc = torch.complex(x[:, 0], x[:, 1])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    maps = torch.stack([1 + 0.5 * yy, 1 - 0.5 * yy, (1 + 0.5 * xx) * 1j]).to(torch.complex64)
    coil_kspace = fft2c(maps[None] * xc[:, None]) * physics.mask[0, 0]
    write_fastmri(tmp_path / "brain_multicoil.h5", coil_kspace.numpy(), physics.mask[0, 0, 0].numpy())
    assert load_scan(tmp_path / "brain_multicoil.h5").kspace.shape == (4, 3, SIZE, SIZE)
    events = []
    observers = Observers()
    observers.add(events.append)
    trainer = Trainer(cfg, observers=observers)
    with pytest.raises(GroundTruthLocked):
        trainer.train_set.ground_truth
    assert trainer.train_set.measurements.shape == (3, 2, SIZE, SIZE) and trainer.val_x is None
    assert trainer.run() == "completed" and trainer.step == 1
    validation = [e for e in events if isinstance(e, ValidationFinished)]
    assert validation and all(e.domain == "measurement" and np.isfinite(e.psnr) for e in validation)
    assert any("3 coils combined" in getattr(e, "message", "") for e in events)


def test_ct_sinogram_with_reference_validates_in_image_domain(tmp_path):
    cfg = tiny_experiment("ct", [tmp_path / "sino.h5"], **{"optim.steps": 1, "physics.noise_sigma": 0.0})
    physics = build_physics(cfg.physics)
    x = torch.from_numpy(phantom_batch("ellipses", 4, SIZE, seed=7))[:, None]
    with h5py.File(tmp_path / "sino.h5", "w") as f:
        f["sinogram"] = sinogram_from_y(physics.A(x), float(physics.operator_norm)) * 250.0
        f["angles"] = np.linspace(0, 180, 12, endpoint=False)
        f["images"] = x[:, 0].numpy()
    train, val = load_measurement_data(cfg.data, cfg.physics)
    assert len(train) == 3 and len(val) == 1 and val.reference is not None
    trainer = Trainer(cfg)
    assert trainer.run() == "completed"
    v = trainer.last_validation
    # the reference is on the measurements' scale: FBP of the data matches it (the 1-step model does not yet)
    assert v["domain"] == "image" and v["baseline_psnr"] > 14 and np.isfinite(v["psnr"]) and v["ssim"] > 0


def test_mixed_image_and_measurement_files_refused(single_coil_file, tmp_path):
    np.save(tmp_path / "img.npy", np.random.default_rng(0).random((32, 32)))
    cfg = tiny_experiment("mri", [tmp_path / "img.npy", single_coil_file])
    with pytest.raises(ConfigError, match=r"mixes image files \(img.npy\) and raw measurement files"):
        load_measurement_data(cfg.data, cfg.physics)
    assert not is_measurement_file(tmp_path / "img.npy") and not is_measurement_file(tmp_path / "missing.h5")


def test_validation_event_domain_defaults_to_image():
    assert ValidationFinished(step=0, psnr=1.0, ssim=0.5).domain == "image"
