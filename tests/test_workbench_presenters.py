"""The workbench's presenters without Qt: run life cycle, event routing, file rules,
settings, and the model Reconstruct uses. Fake views record what they were told;
tasks run at once in the test's thread."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import pytest

from engine.config import ExperimentConfig
from engine.errors import ScanError
from engine.events import (CheckpointSaved, LogMessage, RunFailed, RunFinished, RunStarted, StabilityChecked,
                           StepFinished, ValidationFinished)
from test_workbench_fakes import FakeModel, assert_imports_no_qt, snapshot_event, solve_event
from workbench import backend
from workbench.jobs import JobCancelled
from workbench.panels.losses_model import LossesModel
from workbench.panels.reconstructions_model import ReconstructionsModel, snapshot_from_result
from workbench.panels.residuals_model import ResidualsModel
from workbench.presenters.analysis import AnalysisPresenter, ReconstructionSettings, solve_outcome
from workbench.presenters.config import ConfigPresenter, allowed_values, refusal_message
from workbench.presenters.events import MAX_PROBLEM_LOGS, EventRouter, PanelModels
from workbench.presenters.files import FilesPresenter, export_path, kind_of_path
from workbench.presenters.run import (CLOSE_GRACE_MS, RECONSTRUCTION_PANELS, RUN_PANELS, TRANSITIONS, RunLifecycle,
                                      RunPhase, RunPresenter)
from workbench.presenters.scan import ScanPresenter
from workbench.presenters.settings import SettingsPresenter, WindowLayout
from workbench.state import WorkbenchState


# -- fakes ------------------------------------------------------------------------------------
class RecordingView:
    """A presenter view that records every call; ``answers`` gives what a call returns
    (a value, or a function of the call's arguments)."""

    def __init__(self, **answers) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.answers = answers

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            answer = self.answers.get(name)
            return answer(*args, **kwargs) if callable(answer) else answer

        return method

    def called(self, name: str) -> list[tuple]:
        return [args for n, args, _ in self.calls if n == name]

    def names(self) -> list[str]:
        return [n for n, _, _ in self.calls]

    def logged(self, level: Optional[str] = None) -> list[str]:
        return [message for lv, message in self.called("log_message") if level is None or lv == level]


class FakeController:
    """The TrainingController's interface: records starts and orders."""

    def __init__(self) -> None:
        self.started: list[dict] = []
        self.orders: list[str] = []
        self.commands = None

    def start(self, config, run_dir=None, resume_from=None) -> bool:
        self.started.append({"config": config, "run_dir": run_dir, "resume_from": resume_from})
        return True

    def pause(self) -> None:
        self.orders.append("pause")

    def resume(self) -> None:
        self.orders.append("resume")

    def stop(self) -> None:
        self.orders.append("stop")

    def keep_current_iterate(self) -> None:
        self.orders.append("keep")


class ImmediateTasks:
    """TaskRunner.submit, run at once in the caller's thread; ``jobs`` are the Jobs submitted."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.jobs: list = []

    def submit(self, fn, on_done, on_error=None, name="", supersede=False, job=None, on_cancel=None) -> None:
        self.names.append(name)
        self.jobs.append(job)
        try:
            result = fn()
        except JobCancelled:
            if on_cancel is not None:
                on_cancel()
            return
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            return
        if job is not None and job.cancelled:
            if on_cancel is not None:
                on_cancel()
            return
        on_done(result)


class FakeRunCommands:
    """backend.TrainerCommands of a run: records what was asked of the training thread."""

    def __init__(self, config, gain: float = 0.5) -> None:
        self.config, self.gain = config, gain
        self.asked: list[Any] = []

    def weights(self) -> dict:
        self.asked.append("weights")
        return {"gain": self.gain}

    def save_checkpoint(self, path: str) -> str:
        self.asked.append(("save", path))
        with open(path, "wb") as fh:
            fh.write(b"fake checkpoint of the run")
        return path


class DictStore:
    """QSettings' value / setValue / sync over a dict."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.synced = 0

    def value(self, key, defaultValue=None):
        return self.values.get(key, defaultValue)

    def setValue(self, key, value) -> None:
        self.values[key] = value

    def sync(self) -> None:
        self.synced += 1


def tiny_config(**changes) -> ExperimentConfig:
    return ExperimentConfig().replace(**{"physics.img_size": 16, "optim.steps": 6, "run.name": "tiny", **changes})


@pytest.fixture
def run_setup(tmp_path):
    later: list[tuple[int, Any]] = []
    view = RecordingView(confirm=True, call_later=lambda ms, fn: later.append((ms, fn)))
    controller = FakeController()
    state = WorkbenchState(config=tiny_config())
    run = RunPresenter(view, controller, state, run_root=str(tmp_path / "runs"), clock=lambda: 100.0)
    return run, view, controller, state, later


# -- the run life cycle -----------------------------------------------------------------------
def test_a_run_moves_through_its_phases_and_the_actions_follow(run_setup, tmp_path):
    run, view, controller, state, _later = run_setup
    assert run.phase is RunPhase.IDLE and run.actions().train and not run.actions().stop
    assert run.train()
    assert run.phase is RunPhase.STARTING
    assert controller.started[0]["resume_from"] is None
    assert controller.started[0]["run_dir"].startswith(str(tmp_path / "runs"))
    assert "clear_panels" in view.names() and view.called("set_settings_editable")[-1] == (False,)
    assert state.use_training_weights
    actions = view.called("show_actions")[-1][0]
    assert not actions.train and actions.stop and actions.pause and not actions.edit_config

    run.run_started(total_steps=6, start_step=0)
    assert run.phase is RunPhase.RUNNING
    run.toggle_pause()
    assert run.phase is RunPhase.PAUSED and controller.orders == ["pause"]
    assert run.actions().pause_text == "Resume"
    run.toggle_pause()
    assert run.phase is RunPhase.RUNNING and controller.orders == ["pause", "resume"]
    run.keep_current_iterate()
    run.stop()
    assert run.phase is RunPhase.STOPPING and controller.orders[-2:] == ["keep", "stop"]
    actions = run.actions()
    assert not actions.stop and not actions.pause and actions.keep_iterate and not actions.train

    ended = []
    run.on_run_ended.append(ended.append)
    run.run_ended("stopped")
    assert run.phase is RunPhase.FINISHED and ended == ["stopped"]
    assert view.called("set_status")[-1] == ("Training stopped",)
    assert view.called("set_settings_editable")[-1] == (True,)
    assert run.actions().train and run.actions().edit_config


def test_a_failed_run_ends_in_failed_and_train_starts_again(run_setup):
    run, view, controller, state, _later = run_setup
    run.train()
    run.run_ended("failed")  # the trainer could not even be built: no RunStarted
    assert run.phase is RunPhase.FAILED
    assert view.called("set_status")[-1] == ("Training failed",)
    assert run.train() and run.phase is RunPhase.STARTING and len(controller.started) == 2


def test_a_run_resumes_the_opened_checkpoint(run_setup):
    run, _view, controller, state, _later = run_setup
    state.set_model(FakeModel(), "checkpoint", "/models/model.pt")
    run.train()
    assert controller.started[0]["resume_from"] == "/models/model.pt"


@pytest.mark.parametrize("phase", list(RunPhase))
def test_only_the_listed_transitions_are_taken(phase):
    for target in RunPhase:
        lifecycle = RunLifecycle()
        lifecycle.phase = phase
        taken = lifecycle.advance(target)
        assert taken == (target in TRANSITIONS[phase])
        assert lifecycle.phase is (target if taken else phase)


def test_commands_that_do_not_fit_the_phase_are_refused(run_setup):
    run, _view, controller, _state, _later = run_setup
    run.toggle_pause()
    run.stop()
    run.keep_current_iterate()
    assert controller.orders == [] and run.phase is RunPhase.IDLE
    run.train()
    assert not run.train() and len(controller.started) == 1  # one run at a time
    run.stop()
    run.toggle_pause()  # a pause after a stop would hold the trainer for good
    assert controller.orders == ["stop"] and run.phase is RunPhase.STOPPING
    run.run_ended("stopped")
    run.stop()
    assert controller.orders == ["stop"]


def test_closing_during_a_run_asks_stops_and_closes_when_the_run_ends(run_setup):
    run, view, controller, _state, later = run_setup
    run.train()
    run.run_started(6, 0)
    view.answers["confirm"] = False
    assert not run.request_close() and run.phase is RunPhase.RUNNING  # the user said no
    assert "save_settings" not in view.names() and controller.orders == []
    view.answers["confirm"] = True
    assert not run.request_close()  # wait for the run to stop
    assert run.phase is RunPhase.CLOSING and run.closing
    assert controller.orders == ["stop"] and view.names().count("save_settings") == 1
    assert later[-1][0] == CLOSE_GRACE_MS
    assert not run.request_close() and not run.train()
    assert not run.actions().train and not run.actions().pause
    run.run_ended("stopped")
    assert later[-1][0] == 0 and "shut_down" not in view.names()
    later[-1][1]()
    assert run.phase is RunPhase.CLOSED
    assert view.names().count("shut_down") == 1 and view.names().count("close_window") == 1
    assert run.request_close()  # the window may go now
    later[0][1]()  # the grace timer fires after all: nothing more happens
    assert view.names().count("shut_down") == 1 and view.names().count("save_settings") == 1


def test_closing_gives_up_waiting_after_the_grace_time(run_setup):
    run, view, controller, _state, later = run_setup
    run.train()
    assert not run.request_close(ask=False)  # SIGTERM: no question
    assert "confirm" not in view.names() and run.phase is RunPhase.CLOSING
    grace_ms, give_up = later[-1]
    assert grace_ms == CLOSE_GRACE_MS
    give_up()
    assert run.phase is RunPhase.CLOSED and "close_window" in view.names()


def test_closing_when_idle_saves_and_shuts_down_at_once(run_setup):
    run, view, _controller, _state, _later = run_setup
    assert run.request_close()
    assert run.phase is RunPhase.CLOSED
    assert view.names()[-2:] == ["save_settings", "shut_down"] and "confirm" not in view.names()


# -- event routing ----------------------------------------------------------------------------
def panel_models() -> PanelModels:
    return PanelModels(ResidualsModel(), LossesModel(), ReconstructionsModel())


@pytest.fixture
def router_setup(run_setup):
    run, view, controller, state, _later = run_setup
    panels = panel_models()
    return EventRouter(view, state, run, panels), run, view, state, panels


def test_each_event_kind_reaches_its_panel_or_view_method(router_setup):
    router, run, view, state, panels = router_setup
    run.train()
    started = RunStarted(run_dir="/runs/r1", config={}, device="cpu", total_steps=6)
    solve = solve_event(1)
    step = StepFinished(step=3, losses={"total": 0.25, "mc": 0.2}, lr=1e-3, seconds=0.5)
    validation = ValidationFinished(step=3, psnr=21.0, ssim=0.6)
    stability = StabilityChecked(step=3, spectral_radius=0.9, limit=1.0, penalty_weight=0.1, action="none")
    snapshot = snapshot_event(3)
    router.route_batch([started, solve, step, validation, stability, snapshot,
                        LogMessage("warning", "careful"), CheckpointSaved(step=3, path="/runs/r1/c.pt"),
                        RunFailed(message="out of memory"), RunFinished(reason="failed", step=3), object()])
    assert run.phase is RunPhase.RUNNING and run.total_steps == 6 and state.run_dir == "/runs/r1"
    assert view.called("show_run") == [("/runs/r1", "")]
    assert ("training in progress",) in view.called("show_model_info")
    assert view.called("show_device") == [("device: CPU",)]
    assert panels.residuals.counts == {"forward": 1, "backward": 0}
    assert panels.residuals.iter_y["forward"] == [int(solve.iterations.max())]
    assert panels.losses.steps == [3] and panels.losses.losses["total"] == [0.25] and run.last_step == 3
    assert ("Training: step 3/6  loss 0.25  (0.50 s/step)",) in view.called("set_status")
    assert (3,) in [call[:1] for call in view.called("set_progress")]
    assert panels.losses.val_steps == [3] and panels.losses.psnr == [21.0]
    assert panels.residuals.radius_y == [0.9]
    np.testing.assert_array_equal(panels.reconstructions.current_image(), snapshot.reconstruction)
    assert panels.reconstructions.current()["step"] == 3
    assert ("warning", "careful") in view.called("log_message")
    assert state.checkpoint_path == "/runs/r1/c.pt"
    assert view.called("report_error") == [("Training failed", "out of memory")]
    assert any(m.startswith("run failed at step 3") for m in view.logged("info"))
    assert not view.logged("error")  # the unknown object was ignored, nothing failed


def test_a_failing_handler_is_logged_and_the_batch_goes_on(router_setup):
    router, _run, view, _state, panels = router_setup
    view.answers["show_run"] = lambda run_dir, note: 1 / 0
    step = StepFinished(step=1, losses={"total": 1.0}, lr=1e-3, seconds=0.1)
    router.route_batch([RunStarted(run_dir=None, config={}, device="", total_steps=2), step])
    assert view.logged("error") == ["display error for RunStarted: division by zero"]
    assert panels.losses.steps == [1]


def test_problem_solves_are_logged_up_to_a_limit_and_divergence_reported_once(router_setup):
    router, _run, view, _state, panels = router_setup
    router.route_batch([solve_event(s, reason="diverged") for s in range(1, MAX_PROBLEM_LOGS + 6)])
    assert len(panels.residuals.problems) == MAX_PROBLEM_LOGS + 5
    assert len([m for m in view.logged("error") if "diverged" in m]) == MAX_PROBLEM_LOGS
    assert view.logged("warning") == ["further problem solves are listed in the residuals panel only"]
    reports = view.called("report_error")
    assert len(reports) == 1 and reports[0][0] == "Diverged solve"
    router.route(RunStarted(run_dir=None, config={}, device="cpu", total_steps=3))  # a new run: counted anew
    router.route(solve_event(1, reason="max_iterations"))
    assert view.logged("warning")[-1].startswith("step 1: forward solve (anderson) ended with max_iterations")


def test_a_checkpoint_saved_by_the_run_does_not_replace_the_opened_one(router_setup):
    router, _run, _view, state, _panels = router_setup
    state.set_model(FakeModel(), "checkpoint", "/models/opened.pt")
    router.route(CheckpointSaved(step=5, path="/runs/r/checkpoint_000005.pt"))
    assert state.checkpoint_path == "/models/opened.pt"


def test_the_device_probe_names_the_gpu(router_setup):
    router, _run, view, _state, _panels = router_setup
    router.device_found("CUDA: NVIDIA H200")
    router.route(RunStarted(run_dir=None, config={}, device="cuda:0", total_steps=3))
    assert view.called("show_device") == [("device: CUDA: NVIDIA H200",), ("device: CUDA: NVIDIA H200",)]
    router.device_unknown()
    assert view.called("show_device")[-1] == ("CPU",)


# -- files --------------------------------------------------------------------------------------
class Scan:
    kind, modality, units = "image", "ct", "HU"
    slice_shape, n_slices, reference = (20, 20), 3, None

    def summary(self) -> str:
        return "scan.npy: image 3x20x20"


@pytest.fixture
def files_setup(run_setup, monkeypatch, tmp_path):
    run, view, controller, state, _later = run_setup
    store = DictStore()
    settings = SettingsPresenter(store, state, working_dir=lambda: str(tmp_path))
    config = ConfigPresenter(view, state)
    reconstructed: list = []
    displayed = ReconstructionsModel()
    scans = ScanPresenter(view, state, config, run, PanelModels(ResidualsModel(), LossesModel(), displayed),
                          lambda: reconstructed.append("scan presenter"))
    files = FilesPresenter(view, state, ImmediateTasks(), settings, config, run, reconstructed.append, displayed,
                           scans)
    monkeypatch.setattr(backend, "load_scan", lambda path: Scan())
    monkeypatch.setattr(backend, "prepare_slices",
                        lambda scan, size, window=None: np.ones((3, size, size), dtype=np.float64))
    return files, view, state, run, controller, store, reconstructed


@pytest.mark.parametrize("name, kind", [("m.pt", "checkpoint"), ("m.PTH", "checkpoint"), ("w.safetensors", "checkpoint"),
                                        ("e.toml", "config"), ("e.yml", "config"), ("s.dcm", "scan"),
                                        ("v.nii.gz", "scan"), ("slices.npy", "scan")])
def test_paths_are_opened_as_what_their_suffix_says(name, kind, tmp_path):
    assert kind_of_path(str(tmp_path / name)) == kind


def test_a_folder_is_a_dicom_series_whatever_its_name(tmp_path):
    folder = tmp_path / "series.pt"
    folder.mkdir()
    assert kind_of_path(str(folder)) == "scan"


def test_export_adds_the_suffix_of_the_chosen_filter():
    assert export_path("/x/out", "NumPy array (*.npy)") == "/x/out.npy"
    assert export_path("/x/out", "DICOM (*.dcm)") == "/x/out.dcm"
    assert export_path("/x/out", "") == "/x/out.png"
    assert export_path("/x/out.h5", "PNG image") == "/x/out.h5"


def test_opening_a_scan_shows_it_at_once_and_neither_trains_on_it_nor_reconstructs(files_setup, tmp_path):
    files, view, state, _run, _controller, store, reconstructed = files_setup
    path = str(tmp_path / "scan.npy")
    files.open_scan(path)
    # shown at its own resolution (20 px), on the middle slice
    assert isinstance(state.scan, Scan) and state.slices.dtype == np.float32 and state.slices.shape == (3, 20, 20)
    assert state.slice_index == 1
    assert view.called("show_scan") == [(state.scan, path, 3, 1)]
    assert view.called("show_scan_slice")[-1] == (1, 3)
    assert files.displayed.page == "scan" and files.displayed.viewing == (path, 1)
    np.testing.assert_array_equal(files.displayed.scan["image"], state.slices[1])
    assert state.recent[0].kind == "scan" and state.recent[0].path == path
    assert view.called("show_recent")[-1] == (state.recent,)
    assert store.values["paths/last_dir"] == str(tmp_path)
    assert view.called("raise_panel") == [("info",)] and "scan.npy" in view.called("show_title")[-1][0]
    # training data is an explicit choice: untouched, and the log says what it is
    assert state.config.data.source == "phantom" and not state.scan_is_training_data()
    assert view.called("show_scan_choices")[-1][0].training_data is False
    assert any("Training data: built-in phantom CT images" in m for m in view.logged("info"))
    assert reconstructed == [] and "clear_equivariance" in view.names()  # reconstructed on demand only
    assert files.tasks.jobs[-1].title == "Opening scan.npy"


def test_a_scan_opened_during_a_run_leaves_the_training_data_alone(files_setup, tmp_path):
    files, _view, state, run, _controller, _store, reconstructed = files_setup
    run.train()
    files.open_scan(str(tmp_path / "scan.npy"))
    assert state.scan is not None and state.config.data.source == "phantom" and reconstructed == []
    files.scans.use_as_training_data(True)  # refused during a run
    assert state.config.data.source == "phantom"


def test_a_scan_that_cannot_be_read_changes_nothing(files_setup, monkeypatch, tmp_path):
    files, view, state, _run, _controller, _store, reconstructed = files_setup

    def unreadable(path):
        raise ScanError(f"{os.path.basename(path)}: not a scan")

    monkeypatch.setattr(backend, "load_scan", unreadable)
    files.open_scan(str(tmp_path / "broken.npy"))
    assert state.scan is None and state.recent == [] and reconstructed == []
    title, error = view.called("report_error")[0]
    assert title == "Cannot open scan" and "broken.npy" in str(error)


def test_opening_a_checkpoint_uses_its_model_and_config(files_setup, monkeypatch, tmp_path):
    files, view, state, run, _controller, _store, reconstructed = files_setup
    files.open_scan(str(tmp_path / "scan.npy"))
    files.scans.use_as_training_data(True)  # training data: files
    run.train()
    run.run_ended("completed")
    assert state.use_training_weights
    model = FakeModel(tiny_config(**{"physics.views": 24, "run.name": "ckpt"}))
    monkeypatch.setattr(backend, "load_model", lambda path: model)
    path = str(tmp_path / "model.pt")
    files.open_checkpoint(path)
    assert state.model is model and state.model_source == "checkpoint" and state.checkpoint_path == path
    assert not state.use_training_weights
    assert state.config.physics.views == 24 and state.config.data.source == "files"  # the scan stays the data
    assert "clear_equivariance" in view.names() and reconstructed == [None]  # the checkpoint's reconstruction
    assert [r.kind for r in state.recent] == ["checkpoint", "scan"]


def test_a_config_is_not_opened_during_a_run(files_setup, tmp_path):
    files, view, state, run, _controller, _store, _reconstructed = files_setup
    run.train()
    before = state.config
    files.open_path(str(tmp_path / "other.toml"))
    assert view.called("report_error") == [("Cannot open config",
                                             "stop the training run before loading another config")]
    assert state.config is before


def test_saving_a_checkpoint_asks_the_run_or_copies_the_opened_one(files_setup, tmp_path):
    files, view, state, run, controller, _store, _reconstructed = files_setup
    files.save_checkpoint(str(tmp_path / "nothing.pt"))
    assert "nothing to save yet" in str(view.called("report_error")[-1][1])

    run.train()
    controller.commands = FakeRunCommands(state.config)
    target = tmp_path / "run.pt"
    files.save_checkpoint(str(target))
    assert controller.commands.asked == [("save", str(target))] and target.exists()

    opened = tmp_path / "opened.pt"
    opened.write_bytes(b"opened")
    state.set_model(FakeModel(), "checkpoint", str(opened))
    state.use_training_weights = False
    copy = tmp_path / "copy.pt"
    files.save_checkpoint(str(copy))
    assert copy.read_bytes() == b"opened" and len(controller.commands.asked) == 1
    assert state.recent[0].path == str(copy)


def test_nothing_to_export_without_a_reconstruction(files_setup, tmp_path):
    files, view, _state, _run, _controller, _store, _reconstructed = files_setup
    files.export_dialog()
    assert view.called("report_error")[0][0] == "Nothing to export" and "ask_save_file" not in view.names()


# -- settings -------------------------------------------------------------------------------------
def test_settings_round_trip(tmp_path):
    data = tmp_path / "slices.npy"
    data.write_bytes(b"")
    state = WorkbenchState(config=tiny_config(**{"solver.max_iter": 17, "data.source": "files",
                                                 "data.paths": [str(data)]}))
    state.add_recent("scan", str(data))
    state.add_recent("config", str(tmp_path / "e.toml"))
    store = DictStore()
    saved = SettingsPresenter(store, state)
    saved.save(WindowLayout(geometry=b"geometry", docks=b"docks"))
    saved.remember_dir(str(data))
    assert store.synced == 1

    restored_state = WorkbenchState()
    restored = SettingsPresenter(store, restored_state)
    config = restored.restore()
    assert config == state.config
    assert [(r.kind, r.path) for r in restored_state.recent] == [(r.kind, r.path) for r in state.recent]
    assert restored.window_layout() == WindowLayout(b"geometry", b"docks")
    assert restored.last_dir() == str(tmp_path)
    assert restored.restore(restore_config=False) is None  # a config given on start-up wins


def test_restored_config_without_its_data_files_falls_back_to_phantoms(tmp_path):
    store = DictStore()
    gone = tiny_config(**{"data.source": "files", "data.paths": [str(tmp_path / "gone.npy")]})
    SettingsPresenter(store, WorkbenchState(config=gone)).save(WindowLayout())
    config = SettingsPresenter(store, WorkbenchState()).restore()
    assert config.data.source == "phantom" and list(config.data.paths) == []
    assert config.solver == gone.solver


def test_unreadable_settings_keep_the_defaults(tmp_path):
    store = DictStore()
    store.values.update({"recent": "not json", "config/last": '{"solver": {"tol": -3}}'})
    state = WorkbenchState()
    assert SettingsPresenter(store, state, working_dir=lambda: str(tmp_path)).restore() is None
    assert state.recent == []
    assert SettingsPresenter(store, state, working_dir=lambda: str(tmp_path)).last_dir() == str(tmp_path)


# -- the model Reconstruct uses ----------------------------------------------------------------------
@pytest.fixture
def analysis_setup(run_setup, monkeypatch):
    run, view, controller, state, _later = run_setup
    built: list = []

    def model_from_config(config):
        built.append(config)
        return FakeModel(config)

    monkeypatch.setattr(backend, "model_from_config", model_from_config)
    state.set_scan("/data/scan.npy", Scan(), np.stack([np.full((16, 16), v, np.float32) for v in (0.2, 0.4, 0.6)]))
    panels = panel_models()
    return AnalysisPresenter(view, state, ImmediateTasks(), run, panels), run, view, controller, state, built, panels


def test_after_train_reconstruct_uses_weights_copied_by_the_run(analysis_setup):
    analysis, run, view, controller, state, built, panels = analysis_setup
    run.train()
    controller.commands = FakeRunCommands(state.config, gain=0.5)
    analysis.reconstruct()
    analysis.reconstruct()
    assert controller.commands.asked == ["weights", "weights"]  # a fresh copy for every request
    assert len(built) == 1  # the model that takes the copies is built once per run
    snapshot = panels.reconstructions.current()
    np.testing.assert_allclose(snapshot["reconstruction"], np.full((16, 16), 0.4 * 0.5))
    assert snapshot["label"] == "Reconstruct: slice 1 of scan.npy" and len(panels.reconstructions.snapshots) == 2
    assert view.names().count("refresh_images") == 2
    assert state.model is None  # nothing kept: the run's weights are the ones in use
    assert view.called("request_equivariance") == [(), ()]


def test_without_a_model_one_is_built_from_the_config_and_kept(analysis_setup):
    analysis, _run, view, _controller, state, built, _panels = analysis_setup
    analysis.reconstruct()
    assert state.model_source == "config" and len(built) == 1
    analysis.equivariance(90.0)
    angle, probe = view.called("show_equivariance")[0]
    assert angle == 90.0 and probe.error == pytest.approx(0.075)
    assert len(built) == 1  # the kept model answered
    state.config = state.config.replace(**{"solver.max_iter": 7})
    ConfigPresenter(view, state).edited(state.config)  # the config changed: that model is dropped
    assert state.model is None


def test_failed_probes_free_the_panel_and_report(analysis_setup):
    analysis, _run, view, _controller, state, _built, _panels = analysis_setup
    state.set_model(FakeModel(), "checkpoint", "/m.pt")
    state.model.equivariance = lambda image, angle: 1 / 0
    analysis.equivariance_curve()
    assert "equivariance_failed" in view.names()
    assert view.called("report_error")[0][0] == "Equivariance failed"


def test_snapshot_from_result_reads_the_engine_reconstruction():
    from engine.evaluation import Reconstruction

    images = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    result = Reconstruction(measurement=images[0, :4], baseline=images * 0.5, reconstruction=images * 0.9,
                            reference=images, mask=None, modality="ct", domain="image", psnr=np.array([30.0]),
                            baseline_psnr=np.array([20.0]), residual=np.array([0.1]),
                            baseline_residual=np.array([0.2]), forward_stats="stats")
    snap, stats = snapshot_from_result(result, "r")
    assert stats == "stats" and snap["label"] == "r" and snap["modality"] == "ct"
    np.testing.assert_array_equal(snap["reconstruction"], images[0] * 0.9)
    np.testing.assert_array_equal(snap["reference"], images[0])
    assert snap["reconstruction"].shape == (8, 8) and snap["mask"] is None


# -- settings the user changed: applied or visibly refused -----------------------------------------
def test_refusals_name_the_key_the_reason_and_what_is_allowed():
    assert allowed_values("deq.stepsize") == "a number from 1e-06 to 10"
    assert allowed_values("solver.name") == "one of 'fixed_point', 'anderson', 'broyden'"
    assert allowed_values("optim.steps") == "a whole number from 1 to 10000000"
    assert allowed_values("solver.divergence_factor") == "a number >= 2"
    assert allowed_values("loss.ei_weight") == ""  # its own rule: the config's error says it
    assert refusal_message("deq.stepsize", " 50 ", "deq.stepsize must be <= 10.0, got 50.0") == (
        "deq.stepsize = 50 is refused: must be <= 10.0, got 50.0. Allowed: a number from 1e-06 to 10.")


def test_an_invalid_field_blocks_train_and_reconstruct_with_the_field_named(analysis_setup):
    analysis, run, view, controller, state, built, _panels = analysis_setup
    config = ConfigPresenter(view, state)
    message = refusal_message("deq.stepsize", "50", "deq.stepsize must be <= 10.0, got 50.0")
    config.field_rejected("deq.stepsize", message)
    assert not run.train() and controller.started == [] and run.phase is RunPhase.IDLE
    title, text = view.called("report_error")[-1]
    assert title == "Train refused"
    assert "deq.stepsize = 50 is refused" in text and "from 1e-06 to 10" in text
    assert "previous value (1.9) is not used" in text  # no silent use of the old value
    assert view.called("show_invalid_setting")[-1] == ("deq.stepsize",)
    assert "deq.stepsize" in view.called("set_status")[-1][0]
    analysis.reconstruct()
    assert view.called("report_error")[-1][0] == "Reconstruct refused" and built == []
    assert analysis.tasks.names == []
    analysis.equivariance(30.0)
    assert view.called("report_error")[-1][0] == "Equivariance refused" and "equivariance_failed" in view.names()
    config.field_accepted("deq.stepsize")  # corrected (or typed back to a valid value)
    assert run.train() and controller.started[0]["config"].deq.stepsize == 1.9


def test_a_new_config_clears_the_refused_fields(analysis_setup):
    _analysis, run, view, controller, state, _built, _panels = analysis_setup
    config = ConfigPresenter(view, state)
    config.field_rejected("solver.tol", "solver.tol = -1 is refused: must be >= 0.0, got -1.0.")
    config.set_config(tiny_config(**{"solver.tol": 1e-5}))
    assert state.invalid_settings == {} and run.train()
    assert controller.started[0]["config"].solver.tol == 1e-5


def test_a_checkpoint_takes_the_docks_solver_settings_and_refuses_its_fixed_ones(analysis_setup):
    analysis, _run, view, _controller, state, built, panels = analysis_setup
    checkpoint = FakeModel(tiny_config(**{"run.name": "ckpt"}))
    state.set_model(checkpoint, "checkpoint", "/models/m.pt")
    state.config = checkpoint.config
    config = ConfigPresenter(view, state)
    config.edited(state.config.replace(**{"solver.tol": 1e-6, "solver.max_iter": 7, "deq.stepsize": 0.5,
                                          "physics.views": 24, "optim.lr": 1e-3}))
    assert "solver.tol = 1e-06 overrides checkpoint m.pt's 0.0001 at the next Reconstruct" in view.logged("info")
    refused = [m for m in view.logged("warning") if m.startswith("physics.views = 24 is not applied")]
    assert len(refused) == 1 and "Reconstruct keeps 30" in refused[0] and "next Train" in refused[0]
    assert not any("optim.lr" in m for m in view.logged())  # a training setting: nothing to say for Reconstruct

    analysis.reconstruct()
    network = checkpoint.model  # the model Reconstruct used: the checkpoint's, with the dock's solve settings
    assert network.forward_solver.tol == 1e-6 and network.forward_solver.max_iter == 7
    assert network.operator.stepsize == 0.5 and built == []
    text = view.called("show_reconstruction_settings")[-1][0]
    assert "solver anderson, tol 1e-06, max iter 7, memory 5, damping 1, stepsize 0.5, relaxation 1" in text
    assert "model: checkpoint /models/m.pt" in text
    assert ("overridden from the settings: deq.stepsize 1.9 \u2192 0.5, solver.tol 0.0001 \u2192 1e-06, "
            "solver.max_iter 60 \u2192 7") in text
    assert "physics.views 24 (kept 30)" in text
    assert "3 settings overridden; 1 not applied" in view.called("set_status")[-1][0]

    state.config = checkpoint.config  # every edit set back: the model's own values again
    analysis.reconstruct()
    assert network.forward_solver.tol == 1e-4 and network.operator.stepsize == 1.9
    assert "no settings overridden" in view.called("show_reconstruction_settings")[-1][0]


def test_after_train_reconstruct_applies_the_docks_settings_to_the_runs_model(analysis_setup):
    analysis, run, view, controller, state, built, _panels = analysis_setup
    run.train()
    controller.commands = FakeRunCommands(state.config, gain=0.5)
    run.run_ended("completed")
    ConfigPresenter(view, state).edited(state.config.replace(**{"solver.name": "broyden"}))
    assert "solver.name = broyden overrides this session's training run's anderson at the next Reconstruct" \
        in view.logged("info")
    analysis.reconstruct()
    assert analysis.training_model._loaded.model.forward_solver.name == "broyden"
    text = view.called("show_reconstruction_settings")[-1][0]
    assert text.startswith("solver broyden,") and "model: this session's training run" in text


def test_a_fallback_is_shown_with_the_iterations_and_the_cap():
    import dataclasses

    panels = panel_models()
    event = dataclasses.replace(solve_event(2, iters=51, batch=1, reason="converged"), fallback="fixed_point",
                                max_iter=40)
    record = panels.residuals.add(event)
    assert record.problem and panels.residuals.problems == [record]  # the configured solver failed
    assert record.solver_label() == "anderson \u2192 fixed_point fallback"
    assert record.iterations_label() == "51 (max 40)"
    assert solve_outcome(record) == "anderson \u2192 fixed_point fallback, 51 iterations (max 40), converged"
    plain = panels.residuals.add(solve_event(3, iters=6, batch=1))
    assert not plain.problem and plain.solver_label() == "anderson" and plain.iterations_label() == "6"
    settings = ReconstructionSettings({"solver.name": "anderson", "solver.tol": 1e-3, "solver.max_iter": 40,
                                       "solver.memory": 5, "solver.damping": 1.0, "deq.stepsize": 5.0,
                                       "deq.relaxation": 1.0}, "config 'tiny'")
    assert settings.describe(solve_outcome(record)).splitlines() == [
        "solver anderson, tol 0.001, max iter 40, memory 5, damping 1, stepsize 5, relaxation 1",
        "model: config 'tiny'", "no settings overridden",
        "solve: anderson \u2192 fixed_point fallback, 51 iterations (max 40), converged"]


def test_overrides_reach_the_engines_solve(monkeypatch):
    """The real engine: a max_iter override caps the reconstruction's solve, and its event says so."""
    from engine.inference import model_from_config

    state = WorkbenchState(config=tiny_config(**{"physics.img_size": 32, "model.channels": 8}))
    loaded = model_from_config(state.config, "cpu")
    state.set_model(loaded, "checkpoint", "/models/real.pt")
    state.config = state.config.replace(**{"solver.max_iter": 2, "solver.tol": 1e-9, "solver.fallback": ""})
    view = RecordingView()
    panels = panel_models()
    AnalysisPresenter(view, state, ImmediateTasks(), RunPresenter(view, FakeController(), state), panels).reconstruct()
    assert not view.called("report_error"), view.called("report_error")
    record = panels.residuals.recent["forward"][-1]
    assert record.iterations == 2 and record.max_iter == 2 and record.reason == "max_iterations"
    assert loaded.model.forward_solver.max_iter == 2
    assert "solve: anderson, 2 iterations (max 2), max iterations" in view.called("show_reconstruction_settings")[-1][0]


# -- one message per failure; stale panels -----------------------------------------------------------
def test_a_failure_is_one_message(router_setup):
    router, run, view, _state, _panels = router_setup
    run.train()
    router.route_batch([RunStarted(run_dir=None, config={}, device="cpu", total_steps=6),
                        solve_event(1, reason="diverged"), RunFailed(message="3 failed steps", step=0),
                        RunFinished(reason="failed", step=0)])
    assert view.called("report_error") == [("Training failed", "3 failed steps")]

    router.route_batch([RunStarted(run_dir=None, config={}, device="cpu", total_steps=6)])
    router.route_batch([solve_event(1, reason="diverged")])  # training continues: said once
    assert view.called("report_error")[-1][0] == "Diverged solve"
    router.route_batch([RunFailed(message="3 failed steps", step=0), RunFinished(reason="failed", step=0)])
    dialogs = [name for name in view.names() if name in ("report_error", "close_error")]
    assert dialogs[-2:] == ["close_error", "report_error"]  # the earlier dialog goes before the failure's comes
    assert view.called("close_error")[-1] == ("Diverged solve",)  # its "training continues" no longer holds
    assert view.called("report_error")[-1] == ("Training failed", "3 failed steps")


def test_a_failed_run_marks_the_panels_stale_until_the_next_run_or_reconstruction(analysis_setup):
    analysis, run, view, _controller, _state, _built, _panels = analysis_setup
    run.train()
    assert view.called("mark_stale") == [(RUN_PANELS, "")]
    run.run_started(6, 0)
    run.step_finished(3)
    run.run_ended("failed")
    assert view.called("mark_stale")[-1] == (RUN_PANELS, "stale: run failed at step 3")
    analysis.reconstruct()
    assert view.called("mark_stale")[-1] == (RECONSTRUCTION_PANELS, "")
    assert "losses" not in RECONSTRUCTION_PANELS  # the failed run's loss curves stay marked
    run.train()
    assert view.called("mark_stale")[-1] == (RUN_PANELS, "")
    run.run_ended("completed")
    assert view.called("mark_stale")[-1] == (RUN_PANELS, "")  # a finished run is not stale


# -- no Qt ---------------------------------------------------------------------------------------------
def test_presenters_and_panel_models_import_no_qt():
    modules = ["workbench.presenters", "workbench.presenters.run", "workbench.presenters.events",
               "workbench.presenters.config", "workbench.presenters.files", "workbench.presenters.settings",
               "workbench.presenters.analysis", "workbench.panels", "workbench.panels.residuals_model",
               "workbench.panels.losses_model", "workbench.panels.reconstructions_model",
               "workbench.panels.equivariance_model", "workbench.state", "workbench.backend",
               "workbench.presenters.scan", "workbench.panels.viewer_model", "workbench.jobs", "workbench.startup",
               "workbench.presenters.run_record"]
    assert_imports_no_qt(modules)


# -- the scan in the viewer: slices, modality, training data, size; long work --------------------------
@pytest.fixture
def scan_setup(run_setup, monkeypatch):
    run, view, controller, state, _later = run_setup
    view.answers["ask_modality"] = None
    panels = panel_models()
    reconstructed: list = []
    analysis_notes = {"note": ""}
    scans = ScanPresenter(view, state, ConfigPresenter(view, state), run, panels, lambda: reconstructed.append(1),
                          lambda: analysis_notes["note"])
    return scans, view, state, run, panels, reconstructed


class UnknownScan(Scan):
    modality, units = "unknown", "arbitrary"


def stack(n: int = 4, size: int = 20) -> np.ndarray:
    return np.stack([np.full((size, size), i / n, np.float32) for i in range(n)])


def test_a_new_slice_is_shown_at_once_and_marks_a_reconstruction_of_another_stale(scan_setup):
    scans, view, state, _run, panels, reconstructed = scan_setup
    scans.opened("/data/a.npy", Scan(), stack())
    assert panels.reconstructions.viewing == ("/data/a.npy", 2) and panels.reconstructions.page == "scan"
    panels.reconstructions.add({"label": "r", "source": ("/data/a.npy", 2), "reconstruction": stack()[2]})
    assert panels.reconstructions.page == "comparison"
    assert panels.reconstructions.stale_note(panels.reconstructions.current()) == ""
    scans.step_slice(-1)
    assert state.slice_index == 1 and reconstructed == []  # browsing never reconstructs
    np.testing.assert_array_equal(panels.reconstructions.scan["image"], stack()[1])
    assert panels.reconstructions.page == "scan" and view.called("show_scan_slice")[-1] == (1, 4)
    assert panels.reconstructions.stale_note(panels.reconstructions.current()) == \
        "stale: reconstructed from slice 2, viewing slice 1"
    scans.choose_slice(99)  # clamped to the last
    assert state.slice_index == 3
    scans.opened("/data/b.npy", Scan(), stack(2))  # another scan: its reconstructions go
    assert panels.reconstructions.snapshots == [] and "clear_equivariance" in view.names()


def test_an_unknown_modality_is_asked_and_a_declined_question_is_said(scan_setup):
    scans, view, state, _run, _panels, _reconstructed = scan_setup
    view.answers["ask_modality"] = "mri"
    scans.opened("/data/brain.nii.gz", UnknownScan(), stack())
    assert view.called("ask_modality") == [("brain.nii.gz",)]
    assert state.scan_modality == "mri" and state.modality_source == "your choice"
    assert state.config.physics.modality == "mri" and view.called("show_config")[-1][0].physics.modality == "mri"
    assert view.called("show_scan_modality")[-1] == ("MRI (your choice; the file says unknown)",)
    assert "physics.modality = mri: the scan is MRI, so Reconstruct simulates k-space from it" in view.logged("info")

    view.answers["ask_modality"] = None  # declined: kept open, and the log says what Reconstruct does
    scans.opened("/data/other.nii.gz", UnknownScan(), stack())
    assert state.scan_modality == "unknown" and state.config.physics.modality == "mri"
    assert any("unknown: Reconstruct simulates k-space" in m for m in view.logged("warning"))

    scans.opened("/data/ct.dcm", Scan(), stack())  # the file says CT: not asked
    assert len(view.called("ask_modality")) == 2 and state.config.physics.modality == "ct"


def test_switching_the_modality_reconstructs_again_only_a_reconstructed_scan(scan_setup):
    scans, view, state, _run, panels, reconstructed = scan_setup
    scans.opened("/data/a.npy", Scan(), stack())
    scans.choose_modality("mri")
    assert state.config.physics.modality == "mri" and reconstructed == []  # nothing was reconstructed yet
    panels.reconstructions.add({"label": "r", "source": ("/data/a.npy", 2)})
    scans.choose_modality("ct")
    assert state.config.physics.modality == "ct" and reconstructed == [1]
    scans.config_changed(state.config.replace(**{"physics.modality": "mri"}))  # the settings dock
    assert state.scan_modality == "mri" and state.modality_source == "the settings" and reconstructed == [1, 1]


def test_a_trained_model_of_the_other_modality_is_not_used_and_the_log_says_so(scan_setup):
    scans, view, state, _run, _panels, _reconstructed = scan_setup
    state.set_model(FakeModel(tiny_config()), "checkpoint", "/models/ct.pt")
    view.answers["ask_modality"] = "mri"
    scans.opened("/data/brain.npy", UnknownScan(), stack())
    assert state.model is None and state.checkpoint_path is None and state.config.physics.modality == "mri"
    assert any(m.startswith("checkpoint ct.pt reconstructs CT: for this MRI scan Reconstruct uses a model built")
               for m in view.logged("warning"))


def test_training_data_is_an_explicit_choice_that_can_be_taken_back(scan_setup):
    scans, view, state, run, _panels, _reconstructed = scan_setup
    scans.opened("/data/a.npy", Scan(), stack())
    choices = view.called("show_scan_choices")[-1][0]
    assert not choices.training_data and choices.training_data_allowed and state.config.data.source == "phantom"
    scans.use_as_training_data(True)
    assert state.config.data.source == "files" and list(state.config.data.paths) == ["/data/a.npy"]
    assert view.called("show_scan_choices")[-1][0].training_data
    assert view.logged("info")[-1] == "training data: a.npy (simulated CT measurements, 16 px)"
    scans.use_as_training_data(False)
    assert state.config.data.source == "phantom" and list(state.config.data.paths) == []
    run.train()
    scans.use_as_training_data(True)  # not during a run
    assert state.config.data.source == "phantom"
    assert not view.called("show_scan_choices")[-1][0].training_data_allowed


def test_the_size_choice_is_kept_and_said(scan_setup):
    scans, view, state, _run, _panels, _reconstructed = scan_setup
    scans.opened("/data/a.npy", Scan(), stack())
    scans.choose_size("native")
    assert state.reconstruct_size == "native"
    assert view.called("set_status")[-1] == ("Reconstruct runs at the scan's own size (20 px): press Reconstruct (F6)",)
    assert view.called("show_scan_choices")[-1][0].native_size == 20
    scans.choose_size("1024")  # not offered
    assert state.reconstruct_size == "native"


def test_cancelling_the_curve_between_angles_drops_it_and_frees_the_panel(analysis_setup):
    analysis, _run, view, _controller, state, _built, _panels = analysis_setup
    model = FakeModel()
    probed = []

    def equivariance(image, angle):
        probed.append(angle)
        if len(probed) == 3:
            analysis.tasks.jobs[-1].cancel()  # the user presses Cancel while the third angle is computed
        return FakeModel.equivariance(model, image, angle)

    model.equivariance = equivariance
    state.set_model(model, "checkpoint", "/m.pt")
    analysis.equivariance_curve()
    job = analysis.tasks.jobs[-1]
    assert job.cancelled and probed == [0.0, 15.0, 30.0] and job.progress()[:2] == (3, 25)
    assert "show_equivariance_curve" not in view.names() and "equivariance_failed" in view.names()
    assert view.called("set_status")[-1] == ("Error vs angle cancelled",)
    assert view.called("show_busy")[-1] == (job,)


def test_restored_settings_are_announced_by_name():
    from workbench.state import default_config

    store = DictStore()
    changed = default_config().replace(**{"solver.tol": 1e-9, "optim.steps": 7, "physics.views": 12,
                                          "run.name": "mine", "loss.mode": "mc"})
    state = WorkbenchState(config=changed)
    state.reconstruct_size = "native"
    SettingsPresenter(store, state).save(WindowLayout())
    restored = SettingsPresenter(store, WorkbenchState())
    assert restored.restore() == changed and restored.state.reconstruct_size == "native"
    assert restored.restored == ["physics.views = 12", "solver.tol = 1e-09", "loss.mode = mc", "optim.steps = 7",
                                 "run.name = mine", "Reconstruct size = native"]
    assert restored.announcement() == ("restored 6 settings from the last session: physics.views = 12, "
                                       "solver.tol = 1e-09, loss.mode = mc, optim.steps = 7 and 2 more")
    empty = SettingsPresenter(DictStore(), WorkbenchState())
    empty.restore()
    assert empty.announcement() == ""
    assert not empty.welcome_dismissed()
    empty.dismiss_welcome()
    assert empty.welcome_dismissed()


def test_a_job_reports_progress_and_runs_its_cancel_callbacks_once():
    from workbench.jobs import Job

    clock = iter([0.0, 2.5])
    job = Job("Working", clock=lambda: next(clock))
    stopped = []
    forget = job.when_cancelled(lambda: stopped.append("solve"))
    job.advance(3, 10, "45\u00b0")
    assert job.describe() == "Working\u2026 3/10 (45\u00b0)" and job.seconds() == 2.5
    job.check()
    job.cancel()
    job.cancel()
    assert stopped == ["solve"] and job.cancelled
    with pytest.raises(JobCancelled):
        job.check()
    forget()
    job.when_cancelled(lambda: stopped.append("late"))  # registered after: runs at once
    assert stopped == ["solve", "late"]
    fixed = Job("Loading", cancellable=False)
    fixed.cancel()
    assert not fixed.cancelled
