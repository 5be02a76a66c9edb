"""The one evaluation path: the same scores whoever asks (trainer, CLI, GUI, benchmarks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.data.phantoms import phantom_batch
from engine.evaluation import Problem, Scores, baseline_method, evaluate, reconstruct, score, solve
from engine.inference import model_from_config
from engine.metrics import psnr, ssim
from engine.physics import baseline
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def loaded():
    return model_from_config(tiny_config(**{"model.weights": ""}), device="cpu")


@pytest.fixture(scope="module")
def images():
    return phantom_batch("shepp_logan", 3, 32, seed=5)


def test_image_domain_scores_are_the_metrics_against_the_reference(loaded, images):
    problem = loaded.problem(images, seed=0)
    assert problem.domain == "image" and len(problem) == 3
    x_hat = solve(loaded.model, problem)
    s = score(problem, x_hat)
    assert np.allclose(s.psnr, psnr(x_hat, problem.reference).numpy(), atol=1e-5)
    assert np.allclose(s.ssim, ssim(x_hat, problem.reference).numpy(), atol=1e-5)
    expected_residual = ((loaded.physics.A(x_hat) - problem.y).flatten(1).norm(dim=1)
                         / problem.y.flatten(1).norm(dim=1))
    assert np.allclose(s.residual, expected_residual.numpy(), rtol=1e-4)


def test_without_a_reference_scores_are_measurement_domain(loaded, images):
    with_ref = loaded.problem(images, seed=0)
    blind = Problem(with_ref.y, with_ref.physics, with_ref.modality)
    x_base = baseline(blind.physics, blind.y)
    s = score(blind, x_base)
    assert blind.domain == "measurement"
    assert np.isnan(s.ssim).all()
    # the PSNR of A x against y: a data-consistency number, not the image PSNR
    assert not np.allclose(s.psnr, score(with_ref, x_base).psnr)
    assert np.allclose(s.residual, score(with_ref, x_base).residual)


def test_chunked_solve_equals_one_call(loaded, images):
    problem = loaded.problem(images, seed=0)
    torch.testing.assert_close(solve(loaded.model, problem, chunk=1), solve(loaded.model, problem, chunk=None),
                               atol=1e-4, rtol=1e-4)


def test_reconstruct_returns_typed_display_arrays_and_the_scores(loaded, images):
    result = loaded.reconstruct(images)
    assert result.reconstruction.shape == result.baseline.shape == result.reference.shape == (3, 32, 32)
    assert result.measurement.ndim == 2 and result.modality == "ct" and result.domain == "image"
    problem = loaded.problem(images, seed=0)
    assert np.allclose(result.psnr, score(problem, solve(loaded.model, problem)).psnr, atol=1e-4)
    assert result.forward_stats is not None
    # a subset reconstructs just those samples, with their own scores
    sub = reconstruct(loaded.model, problem.subset([2]))
    assert sub.reconstruction.shape == (1, 32, 32)
    assert sub.baseline_psnr[0] == pytest.approx(result.baseline_psnr[2], abs=1e-4)


def test_evaluation_json_keeps_its_keys_and_means(loaded, images):
    ev = loaded.evaluate(images, angles=[37.0], equivariance_images=1)
    d = ev.to_dict()
    assert set(d) == {"domain", "model", "baseline", "equivariance_error", "operator_equivariance_error", "angles",
                      "images", "source"}
    assert set(d["model"]) == {"psnr", "ssim", "psnr_per_image", "ssim_per_image", "residual"}
    assert d["baseline"]["method"] == baseline_method("ct") == "FBP"
    assert d["model"]["psnr"] == pytest.approx(float(np.mean(d["model"]["psnr_per_image"])))
    assert d["images"] == 3 and d["angles"] == [37.0]
    assert math.isfinite(d["equivariance_error"]) and d["equivariance_error"] > 0
    assert isinstance(ev.model, Scores)


def test_evaluate_without_reference_probes_equivariance_on_its_own_reconstructions(loaded, images):
    problem = loaded.problem(images, seed=0)
    blind = Problem(problem.y, problem.physics, problem.modality)
    ev = evaluate(loaded.model, blind, [90.0], data="file.h5", reference=None, notes=["a", "a", "b"])
    d = ev.to_dict()
    assert d["domain"] == "measurement" and math.isnan(d["model"]["ssim"])
    assert d["data"] == "file.h5" and d["notes"] == ["a", "b"]
    assert math.isfinite(d["equivariance_error"])
