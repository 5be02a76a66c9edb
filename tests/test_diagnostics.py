"""Solver diagnostics: recordings, the diagnoses and their evidence, spectral radius, replay, ``equideq diagnose``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.config import builtin_config
from engine.diagnostics import MAKE_IT_DIVERGE, SolveRecorder, diagnose
from engine.diagnostics.diagnosis import Settings
from engine.diagnostics.inspect import apply_settings, inspect, measure, record_forward, replay
from engine.inference import model_from_config
from engine.config import SolverConfig
from engine.solvers import solve
from tests.test_trainer import tiny_config


def run(f, x0, **options):
    """Solve ``x = f(x)`` with a recorder; the recording."""
    opts = SolverConfig(**{"fallback": "", **options})
    recorder = SolveRecorder("forward")
    _, stats = solve(f, x0, opts, recorder=recorder)
    return recorder.finish(stats, opts)


def kinds(found):
    return [d.kind for d in found]


def test_recording_keeps_bounded_frames_covering_the_whole_solve():
    torch.manual_seed(0)
    x0 = torch.randn(2, 1, 6, 6)
    rec = run(lambda x: 0.97 * x, x0, name="fixed_point", tol=1e-12, max_iter=200)
    assert rec.trace_abs.shape == (200, 2)
    assert 2 <= len(rec.frames) <= 48 and rec.frames[0] == 1 and rec.frames[-1] >= 150
    assert rec.iterates.shape == (len(rec.frames), 2, 1, 6, 6)
    assert rec.residual_maps.shape == (len(rec.frames), 2, 6, 6)
    k = rec.frame_at(101)
    # the stored iterate is x_k itself: 0.97^(k-1) x0
    torch.testing.assert_close(torch.from_numpy(rec.iterates[k]), x0 * 0.97 ** (rec.frames[k] - 1), rtol=1e-4,
                               atol=1e-6)
    # and the residual map |x_k - x_{k-1}| = 0.03 * 0.97^(k-2) |x0|
    expected = (0.03 * 0.97 ** (rec.frames[k] - 2) * x0.abs())[:, 0]
    torch.testing.assert_close(torch.from_numpy(rec.residual_maps[k]), expected, rtol=1e-3, atol=1e-7)


def test_period_two_oscillation_is_recognised():
    x0 = torch.ones(1, 1, 4, 4)
    rec = run(lambda x: -1.05 * x + 0.1, x0, name="fixed_point", max_iter=40, divergence_factor=1e12)
    found = diagnose(rec)
    assert "oscillation" in kinds(found)
    osc = found[kinds(found).index("oscillation")]
    assert osc.evidence["median_step_cosine"] < -0.99
    assert osc.remedy.changes == {"solver.damping": 0.5}
    # the remedy works: damped, the same map converges
    fixed = run(lambda x: -1.05 * x + 0.1, x0, name="fixed_point", max_iter=200, damping=0.5)
    assert fixed.stop_reasons == ["converged"] and diagnose(fixed) == []


def test_stagnation_above_tolerance_is_recognised_with_a_solver_remedy():
    x0 = torch.ones(1, 1, 4, 4)
    # a contraction so weak (rate 0.9995) that plain iteration barely moves
    rec = run(lambda x: 0.9995 * x + 0.0005, x0 * 3, name="fixed_point", max_iter=60, tol=1e-5)
    found = diagnose(rec)
    assert kinds(found) == ["stagnation"]
    assert found[0].remedy.changes == {"solver.name": "anderson"}
    assert found[0].evidence["reduction"] > 0.5


def test_slow_but_steady_convergence_asks_for_more_iterations():
    x0 = torch.ones(1, 1, 4, 4)
    rec = run(lambda x: 0.8 * x, x0, name="fixed_point", max_iter=20, tol=1e-8, stop_mode="abs")
    found = diagnose(rec)
    assert kinds(found) == ["slow_convergence"]
    new_cap = found[0].remedy.changes["solver.max_iter"]
    fixed = run(lambda x: 0.8 * x, x0, name="fixed_point", max_iter=new_cap, tol=1e-8, stop_mode="abs")
    assert fixed.stop_reasons == ["converged"]


def test_tolerance_below_float32_precision_is_recognised():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))  # a dense contraction: rounding never settles
    b = torch.randn(1, 1, 8, 8, dtype=torch.float64)

    def linear(dtype):
        m, c = (0.5 * q).to(dtype), b.to(dtype)
        return lambda x: (x.flatten(1) @ m.T).view_as(x) + c

    rec = run(linear(torch.float32), torch.zeros(1, 1, 8, 8), name="fixed_point", max_iter=80, tol=1e-10)
    assert rec.stop_reasons == ["max_iterations"] and rec.dtype == "float32"
    found = diagnose(rec)
    assert kinds(found) == ["tolerance_below_precision"]
    assert 1e-10 < found[0].evidence["best_relative_residual"] < 1e-5
    # in float64 the same tolerance is reachable: no diagnosis
    rec64 = run(linear(torch.float64), torch.zeros(1, 1, 8, 8, dtype=torch.float64), name="fixed_point",
                max_iter=80, tol=1e-10)
    assert rec64.stop_reasons == ["converged"] and diagnose(rec64) == []


def test_non_finite_values_are_located():
    calls = [0]

    def f(x):
        calls[0] += 1
        out = 0.5 * x
        if calls[0] == 5:
            out = out.clone()
            out[1, 0, 2, 3] = float("nan")
        return out

    rec = run(f, torch.ones(2, 1, 6, 6), name="fixed_point", max_iter=30, tol=1e-9)
    nf = rec.non_finite
    assert (nf.iteration, nf.sample, nf.row, nf.col, nf.where) == (5, 1, 2, 3, "map")
    found = diagnose(rec, 1)
    assert kinds(found)[0] == "non_finite"
    assert found[0].evidence["iteration"] == 5 and "row 2, col 3" in found[0].explanation
    assert rec.worst_sample() == 1


def test_anderson_ill_conditioning_is_measured():
    # a linear map whose residual history collapses onto one direction
    torch.manual_seed(0)
    x0 = torch.randn(1, 1, 6, 6)
    rec = run(lambda x: 0.999 * x + 1e-3, x0, name="anderson", memory=6, regularization=0.0, max_iter=30, tol=1e-12)
    cond = rec.conditioning[np.isfinite(rec.conditioning)]
    assert cond.size > 0 and cond.max() > 1e6
    assert "anderson_ill_conditioned" in kinds(diagnose(rec))


def test_fallback_is_explained():
    x0 = torch.ones(1, 1, 4, 4)
    opts = SolverConfig(name="anderson", max_iter=10, fallback="fixed_point", divergence_factor=2.0,
                         max_restarts=0, restart_factor=1e9, tol=1e-6)
    recorder = SolveRecorder("forward")
    _, stats = solve(lambda x: -1.5 * x + 1.0, x0, opts, recorder=recorder)
    rec = recorder.finish(stats, opts)
    assert rec.fallback == "fixed_point" and rec.fallback_from is not None
    found = diagnose(rec)
    fb = found[kinds(found).index("fallback")]
    assert fb.evidence["iterations"] > rec.fallback_from - 1


@pytest.fixture(scope="module")
def tiny_model():
    """The shipped CT denoiser (the quick config's) on a 16x16 problem: small enough for a dense Jacobian."""
    config = builtin_config("ct_phantom_quick").replace(**{"physics.img_size": 16, "physics.views": 8,
                                                            "run.threads": 1})
    return model_from_config(config, device="cpu")


def dense_radius(model, y, physics, x):
    f = model.fixed_point_map(y, physics)
    jac = torch.autograd.functional.jacobian(lambda v: f(v.view_as(x)).flatten(), x.flatten())
    return float(torch.linalg.eigvals(jac.double()).abs().max())


def test_contractive_map_radius_below_one_matches_dense_jacobian(tiny_model):
    loaded = tiny_model
    from engine.data.phantoms import phantom_batch

    problem = loaded.problem(phantom_batch("shepp_logan", 1, 16, seed=3))
    rec = record_forward(loaded.model, problem.y, problem.physics)
    radius, lip = measure(loaded.model, problem.physics, rec, 0)
    dense = dense_radius(loaded.model, problem.y, problem.physics, rec.replay["x_final"])
    assert dense < 1 and radius < 1
    assert radius == pytest.approx(dense, rel=0.05)
    assert lip > 0


def test_expansive_map_is_diagnosed_not_contractive(tiny_model):
    loaded = model_from_config(tiny_model.config, device="cpu")
    loaded.model.load_state_dict(tiny_model.model.state_dict())
    assert apply_settings(loaded.model, MAKE_IT_DIVERGE) == ["jacobian.penalty", "jacobian.safeguard"]
    problem = loaded.problem(np.full((1, 16, 16), 0.4, np.float32))
    rec = record_forward(loaded.model, problem.y, problem.physics)
    assert rec.stop_reasons[0] in ("diverged", "non_finite", "max_iterations")
    result = inspect(loaded.model, problem.physics, rec, 0, config=loaded.config.replace(**MAKE_IT_DIVERGE))
    assert result.spectral_radius is not None and result.spectral_radius > 1
    found = kinds(result.diagnoses)
    assert "not_contractive" in found and "data_step_too_large" in found
    step = result.diagnoses[found.index("data_step_too_large")]
    assert step.remedy.changes == {"deq.stepsize": 1.0}


def test_replay_reproduces_the_trace_exactly_and_compares_other_settings(tiny_model):
    loaded = tiny_model
    problem = loaded.problem(np.full((2, 16, 16), 0.3, np.float32))
    rec = record_forward(loaded.model, problem.y, problem.physics)
    again = replay(loaded.model, problem.physics, rec)
    np.testing.assert_array_equal(again.trace_abs, rec.trace_abs)
    np.testing.assert_array_equal(again.iterates, rec.iterates)
    plain = replay(loaded.model, problem.physics, rec, {"solver.name": "fixed_point"})
    assert plain.solver == "fixed_point" and plain.trace_abs[0, 0] == rec.trace_abs[0, 0]
    assert not np.array_equal(plain.trace_abs[:5], rec.trace_abs[:5])


def test_diagnose_cli_json_keys_and_the_divergence_demonstration(capsys):
    args = ["diagnose", "--config", "ct_phantom_quick", "--set", "physics.img_size=32", "--json"]
    assert main(args) == 0
    calm = json.loads(capsys.readouterr().out)
    assert calm["stop_reason"] == "converged" and calm["spectral_radius"] < 1 and calm["diagnoses"] == []
    assert main(args + ["--make-it-diverge"]) == 0
    wild = json.loads(capsys.readouterr().out)
    assert isinstance(wild["spectral_radius"], float) and wild["spectral_radius"] > 1
    assert wild["stop_reason"] != "converged"
    assert {"kind", "explanation", "remedy"} <= set(wild["diagnoses"][0])
    assert "data_step_too_large" in [d["kind"] for d in wild["diagnoses"]]


def test_settings_from_config_name_training_remedies():
    cfg = tiny_config(**{"jacobian.penalty": 0.01, "optim.lr": 1e-3})
    s = Settings.from_config(cfg, training=True)
    assert (s.stepsize, s.jacobian_penalty, s.lr, s.training) == (cfg.deq.stepsize, 0.01, 1e-3, True)


def test_training_keeps_recordings_and_a_failed_solve_raises_the_alarm_and_pauses():
    import threading

    from engine.events import Observers, RunControl, SolveAlarm
    from engine.trainer import Trainer

    events, observers, control = [], Observers(), RunControl()
    observers.add(events.append)
    control.pause_on_divergence = True
    alarmed = threading.Event()
    observers.add(lambda e: alarmed.set() if isinstance(e, SolveAlarm) else None)
    cfg = tiny_config(**{**MAKE_IT_DIVERGE, "optim.steps": 5, "inspect.keep_steps": 2})
    trainer = Trainer(cfg, observers=observers, control=control)
    thread = threading.Thread(target=trainer.run)
    thread.start()
    try:
        assert alarmed.wait(120), "no alarm"
        alarm = next(e for e in events if isinstance(e, SolveAlarm))
        assert alarm.paused and alarm.direction == "forward" and alarm.stop_reason in ("diverged", "non_finite")
        assert control.paused
        # the paused trainer serves commands: the failed step's recordings, with the weights they ran with
        kept = control.submit(lambda: trainer.recordings_of(alarm.step)).result(timeout=60)
        assert kept.failed and kept.step == alarm.step
        rec = next(r for r in kept.recordings if r.tag == alarm.tag)
        assert rec.direction == "forward" and rec.stop_reasons[alarm.sample] == alarm.stop_reason
        assert rec.iterates.shape[1:] == (2, 1, 32, 32) and len(rec.frames) <= cfg.inspect.frames
        # a replay on a model holding those weights reproduces the recorded trace
        loaded = model_from_config(cfg, device="cpu")
        loaded.model.load_state_dict(kept.weights)
        apply_settings(loaded.model, MAKE_IT_DIVERGE)
        again = replay(loaded.model, trainer.physics, rec)
        np.testing.assert_allclose(again.trace_abs, rec.trace_abs, rtol=1e-5)
        # and the diagnosis names the data step
        found = kinds(inspect(loaded.model, trainer.physics, rec, alarm.sample, config=cfg, training=True).diagnoses)
        assert "data_step_too_large" in found
    finally:
        control.stop()
        thread.join(120)
    assert not thread.is_alive()
    assert control.submit(trainer.recorded_steps).result(timeout=5) == sorted(trainer.recorded_steps())
    assert len(trainer.recorded_steps()) <= 2
