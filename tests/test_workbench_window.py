"""Main-window tests with a fake trainer and a fake model (fast; no torch work)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from engine.config import ExperimentConfig
from engine.errors import CheckpointError
from test_workbench_fakes import FakeModel, FakeTrainer, open_window, shut_down, wait_idle


@pytest.fixture
def fake_engine(monkeypatch):
    from workbench import backend

    monkeypatch.setattr(backend, "model_from_config", lambda cfg: FakeModel(cfg))

    def load_model(path):
        if open(path, "rb").read(4) != b"fake":
            raise CheckpointError(f"{os.path.basename(path)}: not a checkpoint (corrupt or truncated)")
        return FakeModel(ExperimentConfig().replace(**{"physics.img_size": 16, "run.name": "from_ckpt"}))

    monkeypatch.setattr(backend, "load_model", load_model)
    monkeypatch.setattr(backend, "image_metrics", lambda a, b: (30.0, 0.9))
    FakeTrainer.instances.clear()
    FakeTrainer.step_seconds = 0.02
    return FakeTrainer


@pytest.fixture
def tiny_config():
    return ExperimentConfig().replace(**{"physics.img_size": 16, "optim.steps": 6, "run.validate_every": 2,
                                         "run.name": "tiny"})


@pytest.fixture
def window(qtbot, wb_settings, tmp_path, fake_engine, tiny_config):
    w = open_window(qtbot, config=tiny_config, settings=wb_settings, trainer_factory=fake_engine,
                    run_root=str(tmp_path / "runs"))
    yield w
    shut_down(qtbot, w)
    assert not w.training.thread.isRunning()


def test_window_opens_on_the_default(qtbot, wb_settings):
    from workbench.main_window import MainWindow

    w = MainWindow(settings=wb_settings, error_dialog=lambda t, m: None)
    qtbot.addWidget(w)
    w.show()
    assert w.state.config.run.name == "ct_phantom_quick"
    assert w.act_train.isEnabled() and not w.act_stop.isEnabled()
    assert set(w.docks) == {"settings", "info", "reconstructions", "residuals", "losses", "equivariance", "log"}
    assert "Press Train" in w.log.model.messages()[0]
    w.close()
    assert w.shut_down_done


def test_training_run_fills_every_panel(qtbot, window):
    w = window
    w.train()
    wait_idle(qtbot, w)
    trainer = FakeTrainer.instances[-1]
    assert w.training.last_result == "completed"
    steps = [e for e in trainer.events if type(e).__name__ == "StepFinished"]
    x, y = w.losses.curves["total"].getData()
    np.testing.assert_array_equal(x, [e.step for e in steps])
    np.testing.assert_allclose(10 ** y, [e.losses["total"] for e in steps])
    vals = [e for e in trainer.events if type(e).__name__ == "ValidationFinished"]
    np.testing.assert_allclose(w.losses.psnr_curve.getData()[1], [v.psnr for v in vals])
    fwd = [e for e in trainer.events if type(e).__name__ == "SolveFinished" and e.direction == "forward"]
    np.testing.assert_array_equal(w.residuals.iter_curves["forward"].getData()[1], [int(e.iterations.max()) for e in fwd])
    snaps = [e for e in trainer.events if type(e).__name__ == "Snapshot"]
    np.testing.assert_array_equal(w.reconstructions.items["reconstruction"].image, snaps[-1].reconstruction)
    assert w.reconstructions.slider.maximum() == len(snaps) - 1
    assert any("fake training" in m for m in w.log.model.messages())
    assert w.progress.value() == 6
    assert w.relay.emitted < len(trainer.events)  # events are batched across the thread boundary
    # metrics per view (engine.metrics, patched) arrive asynchronously
    qtbot.waitUntil(lambda: "PSNR 30.00" in w.reconstructions.plots["reconstruction"].titleLabel.text, timeout=5000)
    # equivariance for the trained model (fake) via the background pool
    w.equivariance.request_angle(90)
    w.equivariance.request_curve()
    qtbot.waitUntil(lambda: w.equivariance.model.curve is not None and w.equivariance.model.result_angle == 90,
                    timeout=5000)
    assert w.equivariance.items["difference"].image is not None
    assert not w.dialogs


def test_pause_resume_stop_mid_run(qtbot, window, fake_engine):
    w = window
    fake_engine.step_seconds = 0.05
    w.state.config = w.state.config.replace(**{"optim.steps": 500})
    w.train()
    qtbot.waitUntil(lambda: bool(w.losses.model.steps) and w.losses.model.steps[-1] >= 2, timeout=5000)
    w.run.toggle_pause()
    assert w.act_pause.text() == "Resume"
    w.run.toggle_pause()
    w.run.keep_current_iterate()
    w.run.stop()
    wait_idle(qtbot, w, timeout=3000)
    assert w.training.last_result == "stopped"
    assert w.losses.model.steps[-1] < 500
    assert w.act_train.isEnabled()
    assert "stopped" in w.status_label.text().lower()


def test_a_running_trainer_is_reached_only_by_commands_its_thread_runs(qtbot, window, fake_engine, tmp_path):
    w = window
    fake_engine.step_seconds = 0.05
    w.state.config = w.state.config.replace(**{"optim.steps": 500})
    w.train()
    qtbot.waitUntil(lambda: bool(w.losses.model.steps) and w.training.commands is not None, timeout=5000)
    trainer = FakeTrainer.instances[-1]
    w.analysis.reconstruct()
    ckpt = tmp_path / "during_the_run.pt"
    w.files.save_checkpoint(str(ckpt))
    qtbot.waitUntil(lambda: ckpt.exists() and w.tasks.pending == 0, timeout=5000)
    assert w.training.running  # the run went on
    # the weights for Reconstruct (and the equivariance probe after it) and the checkpoint's state:
    # all captured by the training thread
    assert len(trainer.command_threads) >= 2 and set(trainer.command_threads) == {trainer.thread}
    assert ckpt.read_bytes() == b"fake checkpoint"
    assert "Reconstruct: phantom" in [snap["label"] for snap in w.reconstructions.model.snapshots]
    assert not hasattr(w.training.worker, "trainer")  # the GUI side holds commands, not the trainer
    w.run.stop()
    wait_idle(qtbot, w)
    assert not w.dialogs


def test_close_while_running_stops_cleanly(qtbot, window, fake_engine, qtlog):
    w = window
    fake_engine.step_seconds = 0.05
    w.state.config = w.state.config.replace(**{"optim.steps": 500})
    asked = []
    w.confirm = lambda t, q: asked.append(q) or True
    w.train()
    qtbot.waitUntil(lambda: bool(w.losses.model.steps), timeout=5000)
    w.close()
    qtbot.waitUntil(lambda: w.shut_down_done, timeout=5000)
    assert asked and not w.isVisible()
    assert not w.training.thread.isRunning()
    assert not any("Destroyed while thread" in r.message for r in qtlog.records)


def test_close_refused_keeps_running(qtbot, window, fake_engine):
    w = window
    w.state.config = w.state.config.replace(**{"optim.steps": 500})
    w.confirm = lambda t, q: False
    w.train()
    qtbot.waitUntil(lambda: bool(w.losses.model.steps), timeout=5000)
    w.close()
    assert w.training.running and w.isVisible()
    w.run.stop()
    wait_idle(qtbot, w)


def test_open_scan_and_checkpoint_via_menu(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w = window
    scan = tmp_path / "slices.npy"
    np.save(scan, np.random.default_rng(0).random((3, 24, 24)).astype(np.float32))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(scan), "")))
    w.act_open_scan.trigger()
    qtbot.waitUntil(lambda: w.state.scan is not None and w.tasks.pending == 0, timeout=10000)
    w.refresh_images()
    assert w.state.slices.shape == (3, 24, 24)  # shown at its own resolution
    np.testing.assert_array_equal(w.reconstructions.scan_item.image, w.state.slices[1])
    assert w.asked_modality == ["slices.npy"] and w.state.scan_modality == "ct"  # a .npy does not say: asked
    assert w.info.rows()["Kind"] == "image"
    assert w.reconstructions.model.snapshots == []  # reconstructed on demand
    w.act_reconstruct.trigger()  # at the model's 16 px
    qtbot.waitUntil(lambda: bool(w.reconstructions.model.snapshots) and w.tasks.pending == 0, timeout=10000)
    w.refresh_images()
    from workbench import backend
    at_model_size = backend.prepare_slices(w.state.scan, 16)[1]
    np.testing.assert_allclose(w.reconstructions.items["reconstruction"].image, at_model_size * 0.9, rtol=1e-5,
                               atol=1e-6)
    assert w.state.config.data.source == "phantom"  # until the user ticks "use as training data"
    w.reconstructions.controls.training_data.setChecked(True)
    assert w.state.config.data.source == "files" and list(w.state.config.data.paths) == [str(scan)]
    assert w.state.recent[0].path == str(scan)
    assert "slices.npy" in w.windowTitle()

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"fake model")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(ckpt), "")))
    w.act_open_ckpt.trigger()
    qtbot.waitUntil(lambda: w.state.checkpoint_path == str(ckpt) and w.tasks.pending == 0, timeout=10000)
    assert w.state.model_source == "checkpoint"
    assert w.settings_panel.fields["run.validate_every"] is not None
    assert len(w.reconstructions.model.snapshots) == 2
    assert w.act_save_ckpt.isEnabled()
    assert [r.kind for r in w.state.recent] == ["checkpoint", "scan"]
    assert len(w.recent_menu.actions()) == 2
    assert not w.dialogs


def test_corrupt_files_report_and_keep_state(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w = window
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(1).random((2, 20, 20)).astype(np.float32))
    w.files.open_scan(str(good))
    qtbot.waitUntil(lambda: w.state.scan is not None and w.tasks.pending == 0, timeout=10000)
    before_scan, before_snaps = w.state.scan, len(w.reconstructions.model.snapshots)

    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(bad), "")))
    w.act_open_scan.trigger()
    qtbot.waitUntil(lambda: len(w.dialogs) == 1, timeout=10000)
    assert w.dialogs[0][0] == "Cannot open scan" and "broken.npy" in w.dialogs[0][1]
    assert w.state.scan is before_scan and len(w.reconstructions.model.snapshots) == before_snaps
    assert any("broken.npy" in m for m in w.log.model.messages("error"))

    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    w.files.open_checkpoint(str(bad_ckpt))
    qtbot.waitUntil(lambda: len(w.dialogs) == 2, timeout=10000)
    assert "corrupt" in w.dialogs[1][1] and w.state.checkpoint_path is None

    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[solver]\ntol = -3\n")
    w.files.open_config(str(bad_cfg))
    qtbot.waitUntil(lambda: len(w.dialogs) == 3, timeout=10000)
    assert "solver.tol" in w.dialogs[2][1]
    # still usable: a run completes afterwards
    w.train()
    wait_idle(qtbot, w)
    assert w.training.last_result == "completed"


def test_diverged_solve_is_reported_once(qtbot, window, fake_engine):
    from engine.events import RunFinished
    from test_workbench_fakes import solve_event

    w = window
    w.relay.push(solve_event(3, "forward", iters=8, reason="diverged"))
    w.relay.push(solve_event(4, "forward", iters=8, reason="diverged"))
    w.relay.push(RunFinished(reason="completed", step=4))
    qtbot.waitUntil(lambda: len(w.residuals.model.problems) == 2, timeout=3000)
    assert len(w.dialogs) == 1 and "diverged" in w.dialogs[0][1]
    assert sum("diverged" in m for m in w.log.model.messages("error")) >= 2


def test_config_file_round_trip_and_export(qtbot, window, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w = window
    w.settings_panel.set_text("solver.max_iter", "17")
    assert w.state.config.solver.max_iter == 17
    out = tmp_path / "saved.toml"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(out), "")))
    w.act_save_config.trigger()
    qtbot.waitUntil(lambda: out.exists() and w.tasks.pending == 0, timeout=5000)
    w.config_editor.reset()
    assert w.state.config.solver.max_iter != 17
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(out), "")))
    w.act_open_config.trigger()
    qtbot.waitUntil(lambda: w.state.config.solver.max_iter == 17, timeout=5000)
    assert w.settings_panel.fields["solver.max_iter"].text() == "17"

    # export needs a reconstruction; engine.export writes the file
    w.analysis.reconstruct()
    qtbot.waitUntil(lambda: w.reconstructions.current_image() is not None and w.tasks.pending == 0, timeout=5000)
    png = tmp_path / "rec.png"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(png), "")))
    w.act_export.trigger()
    qtbot.waitUntil(lambda: png.exists() and w.tasks.pending == 0, timeout=5000)
    npy = tmp_path / "rec.npy"
    w.files.export_reconstruction(str(npy))
    qtbot.waitUntil(lambda: npy.exists(), timeout=5000)
    np.testing.assert_allclose(np.load(npy), w.reconstructions.current_image())


def test_settings_and_layout_persist(qtbot, wb_settings, fake_engine, tmp_path):
    from workbench.main_window import MainWindow

    w = MainWindow(settings=wb_settings, trainer_factory=fake_engine, error_dialog=lambda t, m: None)
    qtbot.addWidget(w)
    w.show()
    w.settings_panel.set_text("optim.steps", "7")
    w.state.add_recent("scan", str(tmp_path / "a.npy"))
    w.docks["log"].setFloating(True)
    w.close()
    w2 = MainWindow(settings=wb_settings, trainer_factory=fake_engine, error_dialog=lambda t, m: None)
    qtbot.addWidget(w2)
    assert w2.state.config.optim.steps == 7
    assert w2.state.recent[0].path == str(tmp_path / "a.npy")
    assert w2.docks["log"].isFloating()
    w2.close()


def test_drop_dispatches_by_file_kind(qtbot, window, tmp_path, monkeypatch):
    w = window
    opened = []
    monkeypatch.setattr(w.files, "open_checkpoint", lambda p: opened.append(("checkpoint", p)))
    monkeypatch.setattr(w.files, "open_scan", lambda p: opened.append(("scan", p)))
    monkeypatch.setattr(w.files, "open_config", lambda p: opened.append(("config", p)))
    for name in ("m.pt", "s.dcm", "c.toml"):
        w.files.open_path(str(tmp_path / name))
    assert [k for k, _ in opened] == ["checkpoint", "scan", "config"]


def test_the_window_is_every_presenter_view(window):
    import inspect
    import re

    from workbench.presenters import analysis, config, events, files, run, scan

    for module, protocol in ((run, run.RunView), (events, events.EventView), (config, config.ConfigView),
                             (files, files.FilesView), (analysis, analysis.AnalysisView), (scan, scan.ScanView)):
        declared = {name for name in vars(protocol) if not name.startswith("_")}
        called = set(re.findall(r"self\.view\.(\w+)", inspect.getsource(module)))
        assert called <= declared, (module.__name__, called - declared)
        assert all(callable(getattr(window, name, None)) for name in declared), protocol.__name__


# -- settings the user changed: applied or visibly refused; one message per failure, stale panels ---------
def test_an_invalid_field_blocks_train_with_the_field_named_and_highlighted(qtbot, window, fake_engine):
    w = window
    w.docks["info"].raise_()  # the settings dock behind another tab: the refusal brings it forward
    w.settings_panel.set_text("deq.stepsize", "50")
    assert w.state.config.deq.stepsize == 1.9 and "deq.stepsize" in w.state.invalid_settings
    field = w.settings_panel.fields["deq.stepsize"]
    assert "#c62828" in field.styleSheet()
    assert "Allowed: a number from 1e-06 to 10" in w.settings_panel.error_labels["deq.stepsize"].text()
    assert not w.train() and not w.training.running and fake_engine.instances == []
    title, message = w.dialogs[-1]
    assert title == "Train refused" and message.startswith("deq.stepsize = 50 is refused: must be <= 10.0")
    assert "Train refused" in w.status_label.text() and "deq.stepsize" in w.status_label.text()
    assert not w.docks["settings"].visibleRegion().isEmpty()  # raised over the info tab
    w.analysis.reconstruct()
    assert w.dialogs[-1][0] == "Reconstruct refused"
    qtbot.waitUntil(lambda: w.tasks.pending == 0, timeout=5000)
    assert w.reconstructions.model.snapshots == []  # nothing reconstructed with the previous value
    w.settings_panel.set_text("deq.stepsize", "1.5")  # corrected: Train uses it
    assert w.state.invalid_settings == {} and field.styleSheet() == ""
    assert w.train()
    wait_idle(qtbot, w)
    assert fake_engine.instances[-1].config.deq.stepsize == 1.5


def test_a_checkpoint_reconstructs_with_the_docks_solver_settings(qtbot, window, tmp_path, monkeypatch):
    w = window
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"fake model")
    w.files.open_checkpoint(str(ckpt))
    qtbot.waitUntil(lambda: w.state.checkpoint_path == str(ckpt) and w.tasks.pending == 0, timeout=10000)
    assert "no settings overridden" in w.info.reconstruction_label.text()
    w.settings_panel.set_text("solver.tol", "1e-06")
    w.settings_panel.set_text("deq.relaxation", "0.5")
    w.settings_panel.set_text("physics.views", "12")
    w.analysis.reconstruct()
    qtbot.waitUntil(lambda: len(w.reconstructions.model.snapshots) == 2 and w.tasks.pending == 0, timeout=10000)
    network = w.state.model.model
    assert network.forward_solver.tol == 1e-6 and network.operator.relaxation == 0.5
    assert w.state.model.config.physics.views == 30  # the checkpoint's own: fixed by its weights
    text = w.info.reconstruction_label.text()
    assert "tol 1e-06" in text and "relaxation 0.5" in text and f"model: checkpoint {ckpt}" in text
    assert "overridden from the settings: deq.relaxation 1 \u2192 0.5, solver.tol 0.0001 \u2192 1e-06" in text
    assert "physics.views 12 (kept 30)" in text
    assert any("physics.views = 12 is not applied to checkpoint model.pt" in m
               for m in w.log.model.messages("warning"))
    assert "2 settings overridden; 1 not applied" in w.status_label.text()


class FailingTrainer(FakeTrainer):
    """Three diverged steps, each reported in its own batch, then the run fails as the engine's does."""

    def _run(self) -> str:
        from engine.events import RunFailed, RunFinished, RunStarted
        from test_workbench_fakes import solve_event

        self.emit(RunStarted(run_dir=self.run_dir, config=self.config.to_dict(), device="cpu", total_steps=6))
        for step in (1, 2, 3):
            time.sleep(0.15)  # the GUI takes each step's events as a batch of their own
            self.emit(solve_event(step, "forward", iters=6, reason="diverged"))
        time.sleep(0.15)
        self.emit(RunFailed(message="stopped after 3 failed steps in a row: forward solve diverged", step=0))
        self.emit(RunFinished(reason="failed", step=0))
        return "failed"


def test_a_failed_run_is_one_message_and_leaves_its_panels_marked_stale(qtbot, wb_settings, tmp_path, fake_engine,
                                                                         tiny_config):
    from workbench.dialogs.errors import ErrorDialogs

    trainers = [FailingTrainer, fake_engine]
    w = open_window(qtbot, config=tiny_config, settings=wb_settings, run_root=str(tmp_path / "runs"),
                    trainer_factory=lambda *a, **k: trainers.pop(0)(*a, **k))
    w.error_dialog = ErrorDialogs(w)  # the real, non-modal message boxes
    try:
        w.train()
        wait_idle(qtbot, w)
        assert w.training.last_result == "failed"
        assert [title for title, _ in w.errors] == ["Diverged solve", "Training failed"]
        assert list(w.error_dialog.open_boxes) == ["Training failed"]  # "training continues" was taken back
        assert "3 failed steps" in w.error_dialog.open_boxes["Training failed"].text()
        for key in ("reconstructions", "residuals", "losses", "equivariance"):
            assert w.docks[key].windowTitle().endswith("(stale: run failed at step 0)"), key
        assert w.docks["log"].windowTitle() == "Log"
        w.analysis.reconstruct()
        qtbot.waitUntil(lambda: w.tasks.pending == 0 and w.docks["reconstructions"].windowTitle() == "Reconstructions",
                        timeout=5000)
        assert w.docks["residuals"].windowTitle() == "Solver residuals"
        assert w.docks["losses"].windowTitle() == "Loss curves (stale: run failed at step 0)"
        w.train()  # the next run clears the mark
        wait_idle(qtbot, w)
        assert w.training.last_result == "completed" and w.docks["losses"].windowTitle() == "Loss curves"
    finally:
        shut_down(qtbot, w)


def test_speed_options_are_settings(window):
    # the execution and warm-start options reach the config from the settings dock, validated there
    w = window
    w.settings_panel.fields["run.autocast"].setCurrentText("bf16")
    w.settings_panel.fields["loss.reuse_fixed_points"].setCurrentText("true")
    w.settings_panel.fields["run.memory_format"].setCurrentText("contiguous")
    config = w.state.config
    assert (config.run.autocast, config.loss.reuse_fixed_points, config.run.memory_format) == (
        "bf16", True, "contiguous")
    assert [w.settings_panel.fields["run.compile"].itemText(i) for i in range(2)] == ["true", "false"]
