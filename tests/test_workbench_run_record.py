"""File > Open Run / Follow Run: the Qt-free presenter (fake view, tasks run at once) and, in a window,
a recorded run in the panels a live run fills, and records appended while it is followed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.errors import EquiDEQError
from engine.run_record import NotARunDirectory, RunRecordReader
from test_run_record import RecordedRun
from test_workbench_fakes import FakeTrainer, open_window, shut_down, wait_idle
from test_workbench_presenters import FakeController, ImmediateTasks, RecordingView
from workbench.panels.losses_model import LossesModel
from workbench.panels.reconstructions_model import ReconstructionsModel
from workbench.panels.residuals_model import ResidualsModel
from workbench.presenters.events import PanelModels
from workbench.presenters.files import kind_of_path
from workbench.presenters.run import RunPhase, RunPresenter
from workbench.presenters.run_record import FOLLOW_INTERVAL_MS, RunRecordPresenter
from workbench.presenters.settings import SettingsPresenter
from workbench.state import WorkbenchState


class Setup:
    """A presenter on a recording view; ``later`` holds the (ms, callback) the view was asked to call."""

    def __init__(self, tmp_path, reader_factory=RunRecordReader) -> None:
        self.later: list = []
        self.panels = PanelModels(ResidualsModel(), LossesModel(), ReconstructionsModel())
        panels = (self.panels.residuals, self.panels.losses, self.panels.reconstructions)
        self.view = RecordingView(call_later=lambda ms, fn: self.later.append((ms, fn)),
                                  clear_panels=lambda: [model.clear() for model in panels])  # as the window's panels do
        self.state = WorkbenchState()
        self.run = RunPresenter(self.view, FakeController(), self.state)
        self.remembered: list = []
        self.presenter = RunRecordPresenter(self.view, self.state, ImmediateTasks(), self.run, self.panels,
                                            SettingsPresenter({}, self.state, working_dir=lambda: str(tmp_path)),
                                            lambda kind, path: self.remembered.append((kind, path)),
                                            reader_factory=reader_factory)

    def tick(self) -> None:
        """What the view was asked to call later, now (one round)."""
        due, self.later[:] = list(self.later), []
        for _ms, fn in due:
            fn()


@pytest.fixture
def setup(tmp_path):
    return Setup(tmp_path)


def test_open_run_shows_a_finished_run_in_the_panels(setup, tmp_path):
    run = RecordedRun(tmp_path / "run").run(4)
    run.finish("completed", 4)
    assert kind_of_path(str(run.folder)) == "run" and kind_of_path(str(tmp_path)) == "scan"
    assert setup.presenter.open_run(str(run.folder))
    losses, snapshots = setup.panels.losses, setup.panels.reconstructions.snapshots
    assert losses.steps == [1, 2, 3, 4] and losses.losses["total"] == [1.0, 0.5, 1 / 3, 0.25]
    assert losses.val_steps == [2, 4] and losses.psnr == [22.0, 24.0]
    assert [s["step"] for s in snapshots] == [2, 4] and snapshots[-1]["reconstruction"].shape == (16, 16)
    assert setup.panels.residuals.iter_x["forward"] == [1, 2, 3, 4]
    assert setup.remembered == [("run", str(run.folder))]
    assert not setup.presenter.following and setup.later == []
    assert setup.view.called("set_status")[-1] == (f"Run {run.folder}: completed at step 4",)
    assert setup.view.called("show_run")[-1] == (str(run.folder), "(recorded)")
    assert setup.state.run_dir is None and setup.state.checkpoint_path is None  # not this session's run
    assert "report_error" not in setup.view.names()


def test_follow_run_reads_what_is_added_until_the_run_finishes(setup, tmp_path):
    run = RecordedRun(tmp_path / "run").run(2)
    setup.presenter.follow_run(str(run.folder))
    assert setup.presenter.following and setup.view.called("show_following")[-1] == (True,)
    assert setup.view.called("set_status")[-1] == (f"Following {run.folder} — step 2",)
    assert [ms for ms, _ in setup.later] == [FOLLOW_INTERVAL_MS]
    setup.tick()  # nothing new: it reads again later
    assert setup.panels.losses.steps == [1, 2] and len(setup.later) == 1
    run.step(3)
    run.validate(3)
    setup.tick()
    assert setup.panels.losses.steps == [1, 2, 3] and [s["step"] for s in setup.panels.reconstructions.snapshots] == [2, 3]
    assert setup.view.called("set_status")[-1] == (f"Following {run.folder} — step 3",)
    run.finish("stopped", 3)
    setup.tick()
    assert not setup.presenter.following and setup.later == []
    assert setup.view.called("show_following")[-1] == (False,)
    assert setup.view.called("set_status")[-1] == (f"Run {run.folder}: stopped at step 3",)


def test_stop_following_drops_the_read_in_flight_and_a_rewrite_is_shown_afresh(setup, tmp_path):
    run = RecordedRun(tmp_path / "run").run(2)
    setup.presenter.follow_run(str(run.folder))
    (run.folder / "metrics.jsonl").write_text("")  # the run was replaced (--overwrite)
    run.step(1)
    cleared = setup.view.names().count("clear_panels")
    setup.tick()
    assert setup.view.names().count("clear_panels") == cleared + 1 and setup.panels.losses.steps == [1]
    setup.presenter.stop_following()
    run.step(2)
    setup.tick()  # the read scheduled before the stop
    assert setup.panels.losses.steps == [1] and setup.later == [] and not setup.presenter.following
    assert setup.view.called("set_status")[-1] == (f"Stopped following {run.folder}",)


def test_opening_a_run_is_refused_during_training_and_bad_folders_leave_the_panels(setup, tmp_path):
    shown = RecordedRun(tmp_path / "shown").run(2)
    setup.presenter.follow_run(str(shown.folder))
    setup.run.lifecycle.phase = RunPhase.RUNNING
    assert not setup.presenter.open_run(str(shown.folder))
    title, message = setup.view.called("report_error")[-1]
    assert title == "Cannot open run" and "training run is in progress" in message
    setup.run.lifecycle.phase = RunPhase.FINISHED
    (tmp_path / "empty").mkdir()
    for folder, why in ((tmp_path / "empty", "neither config.toml nor metrics.jsonl"),
                        (tmp_path / "nowhere", "does not exist")):
        setup.presenter.open_run(str(folder))
        title, error = setup.view.called("report_error")[-1]
        assert title == "Cannot open run" and isinstance(error, NotARunDirectory) and why in str(error)
    assert setup.panels.losses.steps == [1, 2]  # what was shown stays, followed as before
    assert setup.presenter.following and setup.presenter.path == str(shown.folder)


def test_a_failing_follow_read_is_said_once_and_tried_again(tmp_path):
    class FlakyReader(RunRecordReader):
        failures = 0

        def poll(self):
            if FlakyReader.failures:
                FlakyReader.failures -= 1
                raise EquiDEQError("cannot read metrics.jsonl: Stale file handle")
            return super().poll()

    setup = Setup(tmp_path, reader_factory=FlakyReader)
    run = RecordedRun(tmp_path / "run").run(1)
    setup.presenter.follow_run(str(run.folder))
    FlakyReader.failures = 2
    setup.tick()
    setup.tick()
    assert setup.view.logged("warning") == [f"following {run.folder}: cannot read metrics.jsonl: Stale file handle; "
                                            "trying again"]
    run.step(2)
    setup.tick()
    assert setup.panels.losses.steps == [1, 2] and setup.presenter.following


# -- in the window ---------------------------------------------------------------------------------
@pytest.fixture
def window(qtbot, wb_settings, tmp_path):
    FakeTrainer.instances.clear()
    w = open_window(qtbot, settings=wb_settings, trainer_factory=FakeTrainer, run_root=str(tmp_path / "runs"))
    yield w
    shut_down(qtbot, w)


def test_open_run_and_follow_in_the_window(qtbot, window, tmp_path):
    w = window
    finished = RecordedRun(tmp_path / "finished").run(4)
    finished.finish("completed", 4)
    w.files.open_path(str(finished.folder))  # as a recent file or a drop opens it
    wait_idle(qtbot, w)
    x, y = w.losses.curves["total"].getData()
    np.testing.assert_array_equal(x, [1, 2, 3, 4])
    np.testing.assert_allclose(10 ** y, [1.0, 0.5, 1 / 3, 0.25])
    np.testing.assert_allclose(w.losses.psnr_curve.getData()[1], [22.0, 24.0])
    with np.load(finished.folder / "snapshots" / "step_000004.npz") as data:
        np.testing.assert_array_equal(w.reconstructions.items["reconstruction"].image, data["reconstruction"])
    assert w.reconstructions.slider.maximum() == 1  # two snapshots
    assert w.residuals.iter_curves["forward"].getData()[0].tolist() == [1, 2, 3, 4]
    assert w.state.recent[0].kind == "run" and w.state.recent[0].path == str(finished.folder)
    assert not w.act_stop_following.isEnabled() and not w.dialogs

    live = RecordedRun(tmp_path / "live").run(1, validate_every=1)
    w.run_record.interval_ms = 50
    w.run_record.follow_run(str(live.folder))
    qtbot.waitUntil(lambda: w.losses.model.steps == [1], timeout=5000)
    assert w.act_stop_following.isEnabled() and w.status_label.text() == f"Following {live.folder} — step 1"
    live.step(2)
    live.validate(2)
    # a poll may fall between the step record and the validation written after it: wait for both
    qtbot.waitUntil(lambda: w.status_label.text().endswith("step 2")
                    and len(w.reconstructions.model.snapshots) == 2, timeout=5000)
    w.refresh()
    assert w.losses.curves["total"].getData()[0].tolist() == [1, 2]
    assert w.reconstructions.slider.maximum() == 1
    live.finish("completed", 2)
    qtbot.waitUntil(lambda: not w.run_record.following, timeout=5000)
    assert not w.act_stop_following.isEnabled() and w.status_label.text() == f"Run {live.folder}: completed at step 2"

    going = RecordedRun(tmp_path / "going").run(3)
    w.run_record.follow_run(str(going.folder))
    qtbot.waitUntil(lambda: w.losses.model.steps == [1, 2, 3], timeout=5000)
    w.train()  # training stops following: its panels are the run's now
    assert not w.run_record.following and w.status_label.text() == "Starting training…"
    w.run_record.open_run(str(finished.folder))
    assert w.dialogs[-1][0] == "Cannot open run" and "training run is in progress" in w.dialogs[-1][1]
    wait_idle(qtbot, w)
    assert FakeTrainer.instances and w.losses.model.steps == list(range(1, w.state.config.optim.steps + 1))
