"""The workbench on the real engine: a tiny training run (img 32, 16 views, 3 steps,
8 channels) fills every panel; Stop and closing work mid-run; a real checkpoint
opens through the menu; a corrupt checkpoint is refused with the state kept."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import builtin_config
from engine.events import Snapshot, SolveFinished, StepFinished, ValidationFinished
from test_workbench_fakes import open_window, shut_down, wait_idle
from workbench import backend

TINY = {"physics.img_size": 32, "physics.views": 16, "optim.steps": 3, "model.channels": 8,
        "run.validate_every": 1, "data.n_train": 8, "data.n_val": 2, "optim.batch_size": 2,
        "run.checkpoint_every": 0}


@pytest.fixture
def recorded():
    return []


@pytest.fixture
def window(qtbot, wb_settings, tmp_path, recorded):
    def factory(config, run_dir=None, observers=None, control=None, resume_from=None):
        observers.add(recorded.append)  # see exactly what the window saw
        return backend.make_trainer(config, run_dir=run_dir, observers=observers, control=control,
                                    resume_from=resume_from)

    w = open_window(qtbot, config=builtin_config("ct_phantom_quick").replace(**TINY), settings=wb_settings,
                    trainer_factory=factory, run_root=str(tmp_path / "runs"))
    yield w
    shut_down(qtbot, w, timeout=30000)


def test_real_training_fills_every_panel_then_checkpoint_round_trip(qtbot, window, recorded, tmp_path,
                                                                     monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w = window
    w.train()
    wait_idle(qtbot, w, timeout=60000)
    assert w.training.last_result == "completed", w.dialogs
    steps = [e for e in recorded if isinstance(e, StepFinished)]
    assert [e.step for e in steps] == [1, 2, 3]
    # losses: every key of the events, values as emitted
    for name in steps[0].losses:
        x, y = w.losses.curves[name].getData()
        np.testing.assert_array_equal(x, [1, 2, 3])
        vals = np.array([e.losses[name] for e in steps], dtype=float)
        shown = 10 ** y
        ok = vals > 0
        np.testing.assert_allclose(shown[ok], vals[ok], rtol=1e-6)
    vals = [e for e in recorded if isinstance(e, ValidationFinished)]
    np.testing.assert_allclose(w.losses.psnr_curve.getData()[1], [v.psnr for v in vals])
    np.testing.assert_allclose(w.losses.ssim_curve.getData()[1], [v.ssim for v in vals])
    # residuals: one point per solve, iterations as reported
    for d in ("forward", "backward"):
        solves = [e for e in recorded if isinstance(e, SolveFinished) and e.direction == d]
        assert solves, d
        np.testing.assert_array_equal(w.residuals.iter_curves[d].getData()[1],
                                      [int(np.max(e.iterations)) for e in solves])
    # reconstructions: the image items hold the last snapshot's arrays
    snaps = [e for e in recorded if isinstance(e, Snapshot)]
    assert len(snaps) == len(vals)
    for view in ("measurement", "baseline", "reconstruction", "reference"):
        np.testing.assert_array_equal(w.reconstructions.items[view].image, getattr(snaps[-1], view))
    assert w.reconstructions.slider.maximum() == len(snaps) - 1
    qtbot.waitUntil(lambda: "PSNR" in w.reconstructions.plots["reconstruction"].titleLabel.text, timeout=20000)
    assert "run started" in " ".join(w.log.model.messages())
    # equivariance of the trained model (background pool)
    w.equivariance.request_angle(45)
    w.equivariance.request_curve()
    qtbot.waitUntil(lambda: w.equivariance.model.curve is not None and w.equivariance.model.result is not None,
                    timeout=60000)
    assert w.equivariance.items["rotated_reconstruction"].image.shape == (32, 32)
    assert np.isfinite(w.equivariance.model.curve[1]).all()

    # save the trained state, then open it through the menu
    ckpt = tmp_path / "saved.pt"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(ckpt), "")))
    w.act_save_ckpt.trigger()
    qtbot.waitUntil(lambda: ckpt.exists() and w.tasks.pending == 0, timeout=30000)
    n_before = len(w.reconstructions.model.snapshots)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(ckpt), "")))
    w.act_open_ckpt.trigger()
    qtbot.waitUntil(lambda: w.state.model_source == "checkpoint" and w.tasks.pending == 0, timeout=60000)
    w.refresh_images()
    assert len(w.reconstructions.model.snapshots) == n_before + 1
    assert w.reconstructions.items["reconstruction"].image.shape == (32, 32)
    assert w.state.config.physics.views == 16
    assert not w.dialogs, w.dialogs

    # a corrupt checkpoint: readable error, model and views unchanged
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(ckpt.read_bytes()[:200])
    model_before = w.state.model
    w.files.open_checkpoint(str(bad))
    qtbot.waitUntil(lambda: len(w.dialogs) == 1, timeout=30000)
    assert "corrupt.pt" in w.dialogs[0][1]
    assert w.state.model is model_before and w.state.checkpoint_path == str(ckpt)
    assert len(w.reconstructions.model.snapshots) == n_before + 1


def test_real_stop_mid_run_then_close_while_running(qtbot, window, recorded, qtlog):
    import time

    w = window
    w.state.config = w.state.config.replace(**{"optim.steps": 500, "run.validate_every": 100})
    w.train()
    qtbot.waitUntil(lambda: any(isinstance(e, StepFinished) for e in recorded), timeout=60000)
    t0 = time.monotonic()
    w.run.stop()
    wait_idle(qtbot, w, timeout=10000)
    assert time.monotonic() - t0 < 5.0
    assert w.training.last_result == "stopped"
    last = max(e.step for e in recorded if isinstance(e, StepFinished))
    assert last < 500 and w.losses.model.steps[-1] == last
    # start again and close the window while it runs: asks, stops, exits cleanly
    recorded.clear()
    w.train()
    qtbot.waitUntil(lambda: any(isinstance(e, SolveFinished) for e in recorded), timeout=60000)
    w.close()
    qtbot.waitUntil(lambda: w.shut_down_done, timeout=20000)
    assert not w.training.thread.isRunning()
    assert not any("Destroyed while thread" in r.message for r in qtlog.records)
