"""The Solver Inspector and the divergence alarm.

Qt-free: the inspector presenter and model on synthetic recordings (frame scrubbing,
the worst sample by default, remedies, replay bookkeeping, stale results dropped),
the divergence presenter (the persisted pause setting, the alarm, the demonstration).

With Qt and the real engine: the built-in divergence demonstration on a tiny config
raises the alarm, pauses the run and opens the inspector on the failed solve with
real content; its remedy changes the config, a damped replay adds a trace, and a
diverged Reconstruct's row opens its own recording.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.config import ExperimentConfig, builtin_config
from engine.diagnostics import MAKE_IT_DIVERGE, Diagnosis, Remedy, SolveRecording
from engine.events import SolveAlarm
from engine.solver_names import SOLVER_NAMES
from test_workbench_fakes import assert_imports_no_qt
from test_workbench_presenters import DictStore, FakeController, ImmediateTasks, RecordingView
from workbench import inspection
from workbench.panels.inspector_model import REPLAY_SOLVERS, ReplaySettings, SolveSource
from workbench.panels.residuals_model import ResidualsModel
from workbench.presenters.config import ConfigPresenter
from workbench.presenters.divergence import PAUSE_ON_DIVERGENCE_KEY, DivergencePresenter
from workbench.presenters.inspector import InspectorPresenter
from workbench.presenters.run import RunPhase, RunPresenter
from workbench.state import WorkbenchState


# -- synthetic recordings ----------------------------------------------------------------------
def recording(reasons=("diverged", "converged"), direction="forward", tag="call 0", seed=0) -> SolveRecording:
    """A 2-sample solve: one sample's residual grows over 8 iterations, the other converges in 5;
    frames at iterations 1, 3, 5, 7, 8 (iterates 6x6)."""
    rng = np.random.default_rng(seed)
    batch, k = len(reasons), 8
    rel = np.full((k, batch), np.nan)
    iterations = []
    for b, reason in enumerate(reasons):
        n = k if reason != "converged" else 5
        rel[:n, b] = 10.0 ** (np.linspace(-2, 2, n) if reason != "converged" else -np.linspace(1, 4, n))
        iterations.append(n)
    frames = np.array([1, 3, 5, 7, 8])
    return SolveRecording(direction=direction, solver="fixed_point",
                          options={"name": "fixed_point", "tol": 1e-3, "stop_mode": "rel", "max_iter": 40,
                                   "memory": 5, "damping": 1.0},
                          dtype="float32", trace_abs=rel * 3, trace_rel=rel, step_cosine=np.full((k, batch), np.nan),
                          conditioning=np.full((k, batch), np.nan), frames=frames,
                          iterates=rng.random((len(frames), batch, 1, 6, 6)).astype(np.float32),
                          residual_maps=rng.random((len(frames), batch, 6, 6)).astype(np.float32),
                          iterations=np.array(iterations), stop_reasons=list(reasons), step=3, tag=tag)


def demo_config() -> ExperimentConfig:
    return ExperimentConfig().replace(**{"physics.img_size": 16, "run.name": "tiny", "deq.stepsize": 5.0})


class FakeCommands:
    """TrainerCommands' recording queries over a dict of step -> recordings."""

    def __init__(self, config, steps: dict) -> None:
        self.config, self.steps = config, steps
        self.weights = {"w": 1}
        self.asked: list = []

    def recorded_steps(self) -> list:
        return sorted(self.steps)

    def recordings(self, step=None):
        self.asked.append(step)
        step = max(self.steps) if step is None else step
        if step not in self.steps:
            return None
        return SimpleNamespace(step=step, recordings=self.steps[step], weights=self.weights, failed=True,
                               message="forward solve diverged")


class HeldTasks(ImmediateTasks):
    """Tasks that run only when released, superseding as the TaskRunner does."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def submit(self, fn, on_done, on_error=None, name="", supersede=False) -> None:
        self.names.append(name)
        if supersede:
            self.held = [t for t in self.held if t[3] != name]
        self.held.append((fn, on_done, on_error, name))

    def release(self) -> None:
        held, self.held = self.held, []
        for fn, on_done, on_error, _name in held:
            ImmediateTasks.submit(self, fn, on_done, on_error)


@pytest.fixture
def measured(monkeypatch):
    """inspection.measure / replay without a model: a fixed radius, and a replay that 'converges'."""
    calls = {"measure": [], "replay": []}

    def measure(models, source, rec, sample):
        calls["measure"].append((rec, sample))
        found = inspection.diagnoses(source, rec, sample)
        return SimpleNamespace(diagnoses=found, spectral_radius=1.7, denoiser_lipschitz=0.6)

    def replay(models, source, rec, changes):
        calls["replay"].append(changes)
        out = recording(("converged", "converged"), rec.direction, rec.tag)
        out.options = {**rec.options, **changes}
        return out

    monkeypatch.setattr(inspection, "measure", measure)
    monkeypatch.setattr(inspection, "replay", replay)
    return calls


def inspector_setup(tasks=None, steps=None, config=None):
    view = RecordingView()
    state = WorkbenchState(config=config or demo_config())
    controller = FakeController()
    controller.running = False
    controller.commands = FakeCommands(state.config, steps if steps is not None else
                                       {2: [recording()], 3: [recording(), recording(("converged",) * 2,
                                                                                    "backward", "call 1")]})
    residuals = ResidualsModel()
    presenter = InspectorPresenter(view, state, tasks or ImmediateTasks(), controller, ConfigPresenter(view, state),
                                   residuals)
    return presenter, view, state, controller


# -- the inspector presenter -------------------------------------------------------------------
def test_opens_the_newest_step_on_its_worst_solve_and_worst_sample(measured):
    presenter, view, _state, controller = inspector_setup()
    presenter.open()
    m = presenter.model
    assert "show_inspector" in view.names()
    assert m.steps == [2, 3] and m.source.step == 3 and presenter.sources() == ["step 2", "step 3"]
    assert m.index == 0 and m.recording.direction == "forward" and m.sample == 0 and m.stop_reason() == "diverged"
    assert m.frame == 4 and m.iteration == 8  # where it ended
    assert m.measured and m.spectral_radius == 1.7 and "NOT contractive" in m.readout()
    assert "data_step_too_large" in [d.kind for d in m.diagnoses]  # stepsize 5 in the run's config
    assert m.working == 0
    # a named solve of a named step, and a sample given
    presenter.open(3, "backward", "call 1", sample=1)
    assert m.recording.direction == "backward" and m.sample == 1 and controller.commands.asked[-1] == 3


def test_the_worst_sample_is_the_default_and_a_chosen_one_is_rediagnosed(measured):
    presenter, _view, _state, _controller = inspector_setup(steps={1: [recording(("converged", "diverged"))]})
    presenter.open()
    m = presenter.model
    assert m.sample == 1 and m.sample_labels()[1].endswith("(worst)")
    before = len(measured["measure"])
    presenter.choose_sample(0)
    assert m.sample == 0 and m.stop_reason() == "converged"
    assert len(measured["measure"]) == before + 1 and measured["measure"][-1][1] == 0
    assert not presenter.model.choose_sample(5)  # out of range: refused


def test_frame_scrubbing_follows_the_stored_iterations(measured):
    presenter, _view, _state, _controller = inspector_setup()
    presenter.open()
    m = presenter.model
    rec = m.recording
    for frame, iteration in enumerate([1, 3, 5, 7, 8]):
        presenter.set_frame(frame)
        assert m.iteration == iteration
        np.testing.assert_array_equal(m.iterate_image(), rec.iterates[frame, m.sample, 0])
        np.testing.assert_array_equal(m.residual_map(), rec.residual_maps[frame, m.sample])
    presenter.set_frame(99)
    assert m.frame == 4 and "iteration 8 of 8" in m.frame_text()
    presenter.set_frame(-3)
    assert m.frame == 0 and m.frame_text().startswith("iteration 1 of 8 (stored frame 1 of 5)")


def test_a_remedy_changes_the_workbench_config_and_says_what_changed(measured):
    presenter, view, state, _controller = inspector_setup()
    presenter.open()
    kinds = [d.kind for d in presenter.model.diagnoses]
    assert presenter.apply_remedy(kinds.index("data_step_too_large"))
    assert state.config.deq.stepsize == 1.0
    assert any("deq.stepsize 5.0 -> 1.0" in line and "next Train" in line for line in view.logged("info"))
    assert view.called("show_config")[-1][0] is state.config
    assert not presenter.apply_remedy(99)
    # a value the config refuses is reported and the config kept
    presenter.model.diagnoses = [Diagnosis("x", "y", Remedy("bad", "bad", {"deq.stepsize": -1.0}))]
    assert not presenter.apply_remedy(0)
    assert state.config.deq.stepsize == 1.0 and view.called("report_error")


def test_replays_are_kept_side_by_side_for_the_open_solve(measured):
    presenter, view, _state, _controller = inspector_setup()
    presenter.open()
    m = presenter.model
    defaults = presenter.replay_defaults()
    assert defaults == ReplaySettings("fixed_point", 5, 1.0, 1e-3, 40)
    presenter.replay(ReplaySettings("fixed_point", 5, 0.5, 1e-3, 40))
    presenter.replay(ReplaySettings("anderson", 8, 1.0, 1e-4, 60))
    assert [r.number for r in m.replays] == [1, 2]
    assert measured["replay"][0] == {"name": "fixed_point", "memory": 5, "damping": 0.5, "tol": 1e-3, "max_iter": 40}
    assert m.replays[1].label(m.sample).startswith("replay 2: anderson m8 damping 1 tol 0.0001 max 60 (converged")
    assert len(m.replay_trace(m.replays[0])) == 5
    presenter.clear_replays()
    assert m.replays == []
    presenter.replay(ReplaySettings())
    presenter.choose_solve(1)  # another solve: its replays start afresh
    assert m.replays == [] and m.index == 1


def test_results_for_a_solve_no_longer_open_are_dropped(measured):
    tasks = HeldTasks()
    presenter, _view, _state, _controller = inspector_setup(tasks=tasks)
    presenter.open()
    tasks.release()  # the step's recordings arrive; diagnose + measure are queued
    m = presenter.model
    assert m.working == 2 and not m.measured
    presenter.replay(ReplaySettings(damping=0.5))
    presenter.choose_solve(1)  # before anything came back
    tasks.release()
    assert m.index == 1 and m.replays == [] and m.working == 0
    assert m.measured and measured["measure"][-1][0] is m.recording  # only the new solve's measurement counted


def test_a_reconstruction_row_opens_its_own_recording(measured):
    presenter, view, _state, controller = inspector_setup()
    controller.commands = None
    source = SolveSource("Reconstruct: phantom", [recording(tag="reconstruct")], {"w": 2}, demo_config())
    event = inspection.RecordedSolveFinished(
        direction="forward", solver="fixed_point", abs_residuals=source.recordings[0].trace_abs,
        rel_residuals=source.recordings[0].trace_rel, iterations=np.array([8, 5]),
        stop_reasons=["diverged", "converged"], f_evals=8, seconds=0.1, tolerance=1e-3, tolerance_mode="rel",
        tag="reconstruct", source=source)
    record = presenter.residuals.add(event)
    assert record.source is source and list(presenter.residuals.recorded) == [record]
    presenter.open_record(record)
    assert presenter.model.source is source and presenter.sources() == ["Reconstruct: phantom"]
    assert presenter.current_source_index() == 0
    # without a run, the menu entry opens the latest recorded reconstruction
    presenter.model.show_nothing("")
    presenter.open()
    assert presenter.model.source is source
    # nothing recorded at all
    presenter.residuals.clear()
    presenter.open()
    assert presenter.model.source is None and "No recorded solve" in presenter.model.note


# -- alarm, pause on divergence, demonstration -------------------------------------------------------
def divergence_setup(tmp_path, store=None):
    view = RecordingView(confirm=True)
    state = WorkbenchState(config=ExperimentConfig().replace(**{"physics.img_size": 16, "run.name": "tiny"}))
    controller = FakeController()
    controller.pause_on_divergence = None
    controller.set_pause_on_divergence = lambda on: setattr(controller, "pause_on_divergence", on)
    run = RunPresenter(view, controller, state, run_root=str(tmp_path / "runs"))
    residuals = ResidualsModel()
    config_editor = ConfigPresenter(view, state)
    inspector = InspectorPresenter(view, state, ImmediateTasks(), controller, config_editor, residuals)
    store = store if store is not None else DictStore()
    divergence = DivergencePresenter(view, store, state, ImmediateTasks(), run, config_editor, inspector)
    return divergence, view, state, controller, run, store


def test_pause_on_divergence_is_on_by_default_persisted_and_given_to_the_runs(tmp_path):
    divergence, view, _state, controller, _run, store = divergence_setup(tmp_path)
    divergence.restore()
    assert divergence.pause_on_divergence and controller.pause_on_divergence is True
    assert view.called("show_pause_on_divergence")[-1] == (True,)
    divergence.set_pause_on_divergence(False)
    assert controller.pause_on_divergence is False and store.values[PAUSE_ON_DIVERGENCE_KEY] is False
    store.values[PAUSE_ON_DIVERGENCE_KEY] = "false"  # as QSettings' INI reads it back
    again, *_ = divergence_setup(tmp_path, store)
    again.restore()
    assert again.pause_on_divergence is False


def test_an_alarm_opens_the_inspector_on_the_failed_solve(tmp_path, monkeypatch):
    divergence, view, _state, _controller, _run, _store = divergence_setup(tmp_path)
    opened = []
    monkeypatch.setattr(divergence.inspector, "open", lambda *a: opened.append(a))
    alarm = SolveAlarm(step=4, direction="forward", tag="call 0", sample=1, stop_reason="diverged", message="m",
                       paused=False)
    note = divergence.inspector.residuals.set_alarm(alarm)
    assert "Step 4: the forward solve (call 0) diverged" in note.text()
    divergence.alarm(alarm)  # the first alarm of a run opens the inspector even without a pause
    divergence.inspector.residuals.set_alarm(alarm)
    divergence.alarm(alarm)  # later ones only when they paused the run
    assert opened == [(4, "forward", "call 0", 1)]
    paused = SolveAlarm(5, "backward", "call 2", 0, "non_finite", "m", paused=True)
    divergence.inspector.residuals.set_alarm(paused)
    divergence.alarm(paused)
    divergence.inspect_alarm()  # the banner's Inspect
    assert opened[1:] == [(5, "backward", "call 2", 0)] * 2
    assert "3 failed steps this run" in divergence.inspector.residuals.alarm.text()


def test_the_demonstration_applies_make_it_diverge_and_trains(tmp_path):
    divergence, view, state, controller, run, _store = divergence_setup(tmp_path)
    divergence.demonstrate()
    for key, value in MAKE_IT_DIVERGE.items():
        section, name = key.split(".")
        assert getattr(getattr(state.config, section), name) == value
    assert run.phase is RunPhase.STARTING and controller.started[-1]["config"] is state.config
    assert any("Divergence demonstration" in line and "Reset Config to Default" in line
               for line in view.logged("warning"))
    divergence.demonstrate()  # a run is in progress: refused
    assert len(controller.started) == 1 and "Stop it first" in view.logged("warning")[-1]


def test_the_replay_solvers_are_the_engines():
    assert tuple(REPLAY_SOLVERS) == tuple(SOLVER_NAMES)


def test_inspector_presenters_and_model_import_no_qt():
    modules = ["workbench.presenters.inspector", "workbench.presenters.divergence",
               "workbench.panels.inspector_model", "workbench.inspection"]
    assert_imports_no_qt(modules)


# -- the real thing, in the window ---------------------------------------------------------------------
TINY = {"physics.img_size": 32, "physics.views": 12, "optim.steps": 3, "model.channels": 8, "data.n_train": 4,
        "data.n_val": 1, "optim.batch_size": 2, "run.checkpoint_every": 0, "run.validate_every": 5}


def test_divergence_demonstration_alarm_pause_inspector_remedy_replay(qtbot, wb_settings, tmp_path):
    from test_workbench_fakes import open_window, shut_down, wait_idle

    w = open_window(qtbot, config=builtin_config("ct_phantom_quick").replace(**TINY), settings=wb_settings,
                    run_root=str(tmp_path / "runs"))
    try:
        feature = w.inspector
        assert feature.act_pause_on_divergence.isChecked()  # on by default
        feature.act_demonstration.trigger()
        qtbot.waitUntil(lambda: w.run.phase is RunPhase.PAUSED, timeout=90000)
        assert w.training.control.paused and w.state.config.deq.stepsize == 5.0
        w.refresh()
        banner = w.residuals.alarm
        assert not banner.isHidden() and "Step 1: the forward solve (call 0) diverged" in banner.label.text()
        assert "training paused" in banner.label.text()
        assert w.act_pause.isEnabled() and w.act_pause.text() == "Resume" and w.act_stop.isEnabled()

        # the inspector opened on the failed solve and measured it
        m = feature.presenter.model
        qtbot.waitUntil(lambda: feature.dialog is not None and m.measured, timeout=90000)
        dialog = feature.dialog
        assert dialog.isVisible()
        rec = m.recording
        assert m.source.step == 1 and rec.direction == "forward" and rec.tag == "call 0"
        assert len(rec.frames) > 1 and m.frame == len(rec.frames) - 1
        assert dialog.iterate_item.image is not None and dialog.iterate_item.image.shape == (32, 32)
        assert dialog.map_item.image is not None
        x, y = dialog.trace_curve.getData()
        assert len(x) == int(rec.iterations[m.sample]) and np.isfinite(y).any()
        assert m.stop_reason() == "diverged" and "diverged" in dialog.trace_plot.legend.items[0][1].text
        assert dialog.frame_line.value() == m.iteration
        kinds = [d.kind for d in m.diagnoses]
        assert "data_step_too_large" in kinds and "not_contractive" in kinds
        assert m.spectral_radius > 1 and "NOT contractive" in dialog.readout.text()
        assert len(dialog.remedy_buttons) == len(kinds)

        # scrub back to the first frame
        dialog.slider.setValue(0)
        assert m.frame == 0 and dialog.frame_line.value() == 1

        # the remedy changes the workbench's config
        dialog.remedy_buttons[kinds.index("data_step_too_large")].click()
        assert w.state.config.deq.stepsize == 1.0
        assert any("deq.stepsize 5.0 -> 1.0" in line for line in w.log.model.messages())

        # a damped replay converges and adds a second trace
        dialog.damping_box.setValue(0.5)
        dialog.replay_button.click()
        qtbot.waitUntil(lambda: len(m.replays) == 1, timeout=60000)
        dialog.refresh()
        assert len(dialog.trace_plot.legend.items) == 2 and dialog.replay_curves[0].isVisible()
        assert len(dialog.replay_curves[0].getData()[0]) > 0
        assert m.replays[0].settings.damping == 0.5

        # Stop stays available; then a diverged Reconstruct's row opens its own recording
        w.run.stop()
        wait_idle(qtbot, w, timeout=60000)
        assert w.training.last_result == "stopped"
        # Reconstruct runs with the settings dock's values: back to the diverging data step
        w.config_editor.set_config(w.state.config.replace(**{"deq.stepsize": 5.0}), log=False)
        w.analysis.reconstruct()
        wait_idle(qtbot, w, timeout=60000)
        rows = [r for r in w.residuals.model.problems if r.tag == "reconstruct"]
        assert rows and rows[-1].source is not None
        w.residuals.refresh()
        assert w.residuals.table.item(0, 0).text() == "Reconstruct"
        w.residuals.table.cellDoubleClicked.emit(0, 0)
        qtbot.waitUntil(lambda: m.source is rows[-1].source and m.measured and w.tasks.pending == 0,
                        timeout=60000)
        assert m.recording.tag == "reconstruct" and m.spectral_radius > 1 and m.source.config.deq.stepsize == 5.0
        assert dialog.step_box.currentText().startswith("Reconstruct")
    finally:
        shut_down(qtbot, w, timeout=60000)


def test_the_menus_hold_the_inspector_and_the_pause_toggle_is_persisted(qtbot, wb_settings):
    from test_workbench_fakes import open_window, shut_down

    w = open_window(qtbot, config=ExperimentConfig().replace(**{"physics.img_size": 16, "run.name": "tiny"}),
                    settings=wb_settings)
    try:
        feature = w.inspector
        menus = {a.text().replace("&", ""): a.menu() for a in w.menuBar().actions()}
        assert feature.act_inspector in menus["Run"].actions()
        assert feature.act_pause_on_divergence in menus["Run"].actions()
        assert feature.act_demonstration in menus["Help"].actions()
        assert feature.act_inspector in w.toolbar.actions()
        assert w.training.pause_on_divergence is True
        feature.act_pause_on_divergence.setChecked(False)
        assert w.training.pause_on_divergence is False
        assert wb_settings.value(PAUSE_ON_DIVERGENCE_KEY) in (False, "false")
        feature.act_inspector.trigger()  # nothing recorded yet: the window says so
        assert feature.dialog.isVisible() and "No recorded solve" in feature.dialog.title.text()
    finally:
        shut_down(qtbot, w)
    assert not feature.dialog.isVisible()


def test_alarm_banner_stops_inviting_resume_once_the_run_has_ended():
    from engine.events import SolveAlarm
    from workbench.panels.residuals_model import ResidualsModel

    model = ResidualsModel()
    model.set_alarm(SolveAlarm(step=3, direction="forward", tag="call 0", sample=1, stop_reason="diverged",
                               message="", paused=True))
    assert "Resume or Stop" in model.alarm.text()
    version = model.version
    model.run_ended("failed")
    assert model.version > version
    text = model.alarm.text()
    assert "Resume" not in text and "run has failed" in text and text.startswith("Step 3: the forward solve")


def test_solves_are_recorded_only_inside_solves_recorded():
    from workbench import backend

    loaded = SimpleNamespace(model=SimpleNamespace(recorder_factory=None))
    with backend.solves_recorded(loaded):
        recorder = loaded.model.recorder_factory("forward")
        assert recorder.direction == "forward"
    assert loaded.model.recorder_factory is None  # probes and curves after a Reconstruct run unrecorded
