"""Denoiser pre-training: its image sources (training splits only), phases, noise levels, penalty, CLI."""

import math

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, builtin_config
from engine.data import colin27_t1_path, invesalius_head_ct_path, load_scan, prepare_slices
from engine.data.datasets import split_indices
from engine.denoisers import load_denoiser_weights, build_denoiser
from engine.errors import ConfigError
from engine.pretrain import (PRETRAIN_SOURCES, PatchSampler, PretrainSettings, denoising_psnr_on, denoising_table,
                             pretrain_denoiser, source_slices, with_smooth_phase)

SMALL = ModelConfig(channels=4, depth=1, norm="group", spectral_norm=False, lipschitz=1.0)


def test_patch_sampler_shapes_ranges_and_determinism():
    a = PatchSampler(("phantoms",), image_size=32, patch=16, channels=1, seed=3)
    b = PatchSampler(("phantoms",), image_size=32, patch=16, channels=1, seed=3)
    x = a.batch(6)
    assert x.shape == (6, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    assert torch.equal(x, b.batch(6))  # same seed, same patches
    assert not torch.equal(a.batch(6), x)  # and new ones next time


def test_sources_are_validated():
    with pytest.raises(ConfigError, match="pre-training sources"):
        PatchSampler(("phantoms", "bsd500"), image_size=32, patch=16)
    with pytest.raises(ConfigError, match="patch size"):
        PatchSampler(("phantoms",), image_size=32, patch=64)
    assert set(PRETRAIN_SOURCES) == {"phantoms", "head_ct", "colin27", "natural"}


def test_smooth_phase_keeps_magnitude_and_varies_smoothly():
    magnitude = torch.rand(64, 1, 32, 32)
    x = with_smooth_phase(magnitude, np.random.default_rng(0))
    assert x.shape == (64, 2, 32, 32)
    assert torch.allclose(torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2), magnitude[:, 0], atol=1e-6)
    phase = torch.atan2(x[:, 1], x[:, 0])
    real = (x[:, 1].abs().flatten(1).max(1).values == 0)
    assert 0 < int(real.sum()) < 64  # some patches keep zero phase, as simulated magnitude MRI has
    # smooth: neighbouring pixels differ by little (on the circle)
    step = torch.remainder(phase[:, :, 1:] - phase[:, :, :-1] + math.pi, 2 * math.pi) - math.pi
    assert float(step.abs().max()) < 0.5


def test_natural_images_come_from_scikit_image_in_unit_range():
    pytest.importorskip("skimage")
    from engine.data.natural import NATURAL_IMAGES, natural_images

    images = natural_images(["camera", "astronaut"])
    assert [im.ndim for im in images] == [2, 2]
    assert all(im.min() == 0.0 and im.max() == 1.0 for im in images)
    assert "public domain" in NATURAL_IMAGES["astronaut"] and "CC0" in NATURAL_IMAGES["camera"]
    with pytest.raises(ConfigError, match="unknown natural image"):
        natural_images(["lena"])
    sampler = PatchSampler(("natural",), image_size=32, patch=16, seed=0)
    assert len(sampler.pools["natural"]) == len(NATURAL_IMAGES)
    assert min(min(im.shape) for im in sampler.pools["natural"]) >= 32


def test_real_sources_read_only_the_training_split():
    path = invesalius_head_ct_path()
    if path is None:
        pytest.skip("invesalius-examples (Cranium.inv3) is not installed")
    cfg = builtin_config("ct_head")
    every = prepare_slices(load_scan(path), 32, window=list(cfg.data.window))
    train_idx, test_idx = split_indices(every.shape[0], cfg.data)
    train = source_slices("head_ct", 32)
    test = source_slices("head_ct", 32, which="test")
    assert np.array_equal(train, every[train_idx]) and np.array_equal(test, every[test_idx])
    assert not set(train_idx) & set(test_idx)
    sampler = PatchSampler(("head_ct",), image_size=32, patch=32, seed=0)
    pool = sampler.pools["head_ct"]
    # every pooled image is a training slice (patch = image: only flips and quarter turns happen)
    patches = sampler.magnitudes(8)
    for patch in patches:
        variants = [np.rot90(p, k) for p in (patch, patch[:, ::-1]) for k in range(4)]
        assert any(np.array_equal(v, im) for v in variants for im in pool)
        assert not any(np.array_equal(v, im) for v in variants for im in test)


def test_colin27_source_reads_its_training_split():
    if colin27_t1_path() is None:
        pytest.skip("mricron-data (ch2.nii.gz) is not installed")
    train = source_slices("colin27", 32)
    test = source_slices("colin27", 32, which="test")
    assert train.shape[0] == 70 and test.shape[0] == 20


def test_missing_real_source_names_its_debian_package(monkeypatch):
    monkeypatch.setattr("engine.pretrain.invesalius_head_ct_path", lambda: None)
    with pytest.raises(ConfigError, match="apt-get install invesalius-examples"):
        PatchSampler(("head_ct",), image_size=32, patch=16)


def test_pretraining_learns_to_denoise_and_the_penalty_bounds_the_jacobian():
    settings = PretrainSettings(sources=("phantoms",), steps=40, image_size=32, patch=32, batch=8, sigma_max=0.2,
                                lr=3e-3, seed=0)
    plain = pretrain_denoiser(SMALL, 1, settings)
    clean = torch.from_numpy(PatchSampler(("phantoms",), 32, 32, seed=99).magnitudes(8))[:, None]
    noisy_db, denoised_db = denoising_psnr_on(plain, clean, 0.1)
    assert denoised_db > noisy_db + 2  # it learned something in 40 steps
    penalised = pretrain_denoiser(SMALL, 1, PretrainSettings(**{**settings.__dict__, "jacobian_weight": 10.0,
                                                                "jacobian_target": 0.5}))
    from engine.linalg import jacobian_spectral_norm

    noisy = clean + 0.1 * torch.randn_like(clean)
    norm_plain = jacobian_spectral_norm(plain, noisy, iters=30)
    norm_penalised = jacobian_spectral_norm(penalised, noisy, iters=30)
    assert norm_penalised < norm_plain and norm_penalised < 0.75


def test_noise_level_conditioned_denoiser_uses_sigma():
    cfg = ModelConfig(channels=4, depth=1, norm="group", spectral_norm=False, lipschitz=1.0, noise_level=True)
    net = build_denoiser(cfg, 2)
    assert net.head.in_channels == 3  # real, imaginary, noise-level map
    x = torch.rand(2, 2, 16, 16)
    assert not torch.allclose(net(x, 0.01), net(x, 0.2))
    assert torch.allclose(net(x, torch.tensor([0.01, 0.2]))[:1], net(x[:1], 0.01), atol=1e-6)
    with pytest.raises(ValueError, match="noise level"):
        net(x)
    with pytest.raises(ConfigError, match="resunet"):
        build_denoiser(ModelConfig(denoiser="dncnn", noise_level=True), 1)


def test_pretrain_cli_writes_weights_and_reports_psnr(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "w.pt"
    code = main(["pretrain", "--config", "ct_phantom_quick", "--set", "model.channels=4", "--set", "model.depth=1",
                 "--output", str(out), "--steps", "3", "--size", "16", "--image-size", "32", "--batch", "2",
                 "--jacobian-weight", "0.1"])
    assert code == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "sigma 0.05: noisy" in text and "||J||" in text
    cfg = builtin_config("ct_phantom_quick").replace(**{"model.channels": 4, "model.depth": 1})
    load_denoiser_weights(build_denoiser(cfg.model, 1), out)  # the file fits the config's denoiser
    table = denoising_table(build_denoiser(cfg.model, 1), 1, size=32)
    assert set(table["sigma"]) == {0.02, 0.05, 0.1}
