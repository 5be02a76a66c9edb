"""Panel unit tests: synthetic events in, plotted data out (no engine, no main window)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import ExperimentConfig
from engine.events import StabilityChecked, StepFinished, ValidationFinished
from test_workbench_fakes import snapshot_event, solve_event


# -- residuals ---------------------------------------------------------------------------
def test_worst_trace_ignores_stopped_samples():
    from workbench.panels.residuals_model import worst_trace

    arr = np.array([[1.0, 2.0], [0.5, np.nan], [0.1, np.nan], [np.nan, np.nan]])
    np.testing.assert_allclose(worst_trace(arr), [2.0, 0.5, 0.1])


def test_residuals_panel_plots_traces_iterations_and_problems(qtbot):
    from workbench.panels.residuals import ResidualsPanel
    from workbench.panels.residuals_model import worst_trace

    panel = ResidualsPanel(overlay=3)
    qtbot.addWidget(panel)
    events = [solve_event(s, "forward", iters=4 + s) for s in range(1, 6)]
    events.append(solve_event(6, "forward", iters=9, reason="diverged"))
    events += [solve_event(s, "backward", iters=3) for s in range(1, 4)]
    for ev in events:
        panel.model.add(ev)
    panel.refresh()

    fwd = [c for c in panel.curves["forward"] if c.isVisible()]
    assert len(fwd) == 3  # only the last N overlaid
    x, y = fwd[-1].getData()
    expected = worst_trace(events[5].rel_residuals)
    assert len(x) == len(expected) == 9
    np.testing.assert_allclose(10 ** y if panel.plots["forward"].ctrl.logYCheck.isChecked() else y, expected,
                               rtol=1e-6)
    # newest is the diverged one: red and thick
    assert fwd[-1].opts["pen"].color().getRgb()[:3] == (214, 39, 40)
    # iterations per solve over training
    ix, iy = panel.iter_curves["forward"].getData()
    np.testing.assert_array_equal(ix, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(iy, [5, 6, 7, 8, 9, 9])
    bx, by = panel.iter_curves["backward"].getData()
    assert len(bx) == 3
    # the problem list
    assert panel.table.rowCount() == 1
    assert panel.table.item(0, 2).text() == "diverged"
    assert "diverged 1" in panel.summary.text()
    # tolerance line at log10(tol) in relative mode
    assert panel.tol_lines["forward"].isVisible()
    assert panel.tol_lines["forward"].value() == pytest.approx(-3.0)
    # absolute mode: the trace changes, the (relative) tolerance line hides
    panel.set_mode("abs")
    x2, y2 = [c for c in panel.curves["forward"] if c.isVisible()][-1].getData()
    np.testing.assert_allclose(10 ** y2, worst_trace(events[5].abs_residuals), rtol=1e-6)
    assert not panel.tol_lines["forward"].isVisible()


def test_residuals_panel_plots_the_spectral_radius_and_safeguard_actions(qtbot):
    from workbench.panels.residuals import ResidualsPanel

    panel = ResidualsPanel()
    qtbot.addWidget(panel)
    assert panel.radius_plot.titleLabel.text == "Spectral radius of dF/dx"
    radii = [(10, 0.91, "none"), (20, 1.08, "strengthened"), (30, 0.97, "none"), (40, 1.02, "rolled_back")]
    for step, rho, action in radii:
        panel.model.add_stability(StabilityChecked(step=step, spectral_radius=rho, limit=1.0, penalty_weight=0.01,
                                                   action=action))
    panel.refresh()
    x, y = panel.radius_curve.getData()
    np.testing.assert_array_equal(x, [10, 20, 30, 40])
    np.testing.assert_allclose(y, [0.91, 1.08, 0.97, 1.02])
    marked = panel.radius_acted_scatter.getData()
    np.testing.assert_array_equal(marked[0], [20, 40])  # where the safeguard acted
    assert panel.radius_limit_line.isVisible() and panel.radius_limit_line.value() == pytest.approx(1.0)
    assert "= 1.020, not contractive" in panel.radius_plot.titleLabel.text
    panel.clear()
    cleared = panel.radius_curve.getData()[0]
    assert cleared is None or len(cleared) == 0
    assert not panel.radius_limit_line.isVisible()


# -- losses ------------------------------------------------------------------------------
def test_ema_is_bias_corrected():
    from workbench.panels.losses_model import ema

    np.testing.assert_allclose(ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(ema([1.0, 3.0], 0.0), [1.0, 3.0])


def test_losses_panel_curves_match_events(qtbot):
    from workbench.panels.losses import LossesPanel

    panel = LossesPanel()
    qtbot.addWidget(panel)
    panel.logy.setChecked(False)
    for s in range(1, 6):
        panel.model.add_step(StepFinished(step=s, losses={"total": 1.0 / s, "mc": 0.5 / s, "ei": 0.5 / s}, lr=1e-3,
                                          seconds=0.1))
    panel.model.add_step(StepFinished(step=6, losses={"total": 0.1, "supervised": 0.05}, lr=1e-3, seconds=0.1))
    for s in (2, 4):
        panel.model.add_validation(ValidationFinished(step=s, psnr=20.0 + s, ssim=0.5 + s / 10))
    panel.refresh()
    assert set(panel.curves) == {"total", "mc", "ei", "supervised"}
    x, y = panel.curves["total"].getData()
    np.testing.assert_array_equal(x, [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(y, [1, 0.5, 1 / 3, 0.25, 0.2, 0.1])
    xs, ys = panel.curves["supervised"].getData()
    assert len(xs) == 6 and np.isnan(ys[:5]).all() and ys[5] == pytest.approx(0.05)
    px, py = panel.psnr_curve.getData()
    np.testing.assert_array_equal(px, [2, 4])
    np.testing.assert_allclose(py, [22.0, 24.0])
    np.testing.assert_allclose(panel.ssim_curve.getData()[1], [0.7, 0.9])
    # smoothing changes the displayed curve, not the data
    panel.set_smoothing(0.9)
    y_s = panel.curves["total"].getData()[1]
    assert y_s[0] == pytest.approx(1.0) and y_s[-1] > 0.1
    assert panel.model.losses["total"][-1] == pytest.approx(0.1)
    assert "step 4" in panel.model.readout(4.2)


# -- reconstructions ----------------------------------------------------------------------
def test_reconstruction_panel_shows_snapshot_arrays_and_slider(qtbot):
    from workbench.panels.reconstructions import ReconstructionsPanel

    panel = ReconstructionsPanel()
    qtbot.addWidget(panel)
    snaps = [snapshot_event(s) for s in (1, 2, 3)]
    for ev in snaps:
        panel.model.add_event(ev)
    panel.refresh()
    items = panel.items
    np.testing.assert_array_equal(items["reconstruction"].image, snaps[-1].reconstruction)
    np.testing.assert_array_equal(items["baseline"].image, snaps[-1].baseline)
    np.testing.assert_array_equal(items["reference"].image, snaps[-1].reference)
    np.testing.assert_array_equal(items["measurement"].image, snaps[-1].measurement)
    np.testing.assert_allclose(items["difference"].image, np.abs(snaps[-1].reconstruction - snaps[-1].reference))
    assert panel.slider.maximum() == 2 and panel.slider.value() == 2
    panel.slider.setValue(0)  # look back
    np.testing.assert_array_equal(items["reconstruction"].image, snaps[0].reconstruction)
    assert "step 1" in panel.step_label.text()
    panel.model.add_event(snapshot_event(4))  # not following: stays on the chosen snapshot
    panel.refresh()
    np.testing.assert_array_equal(items["reconstruction"].image, snaps[0].reconstruction)


def test_window_presets_and_linked_levels(qtbot):
    from workbench.panels.reconstructions import ReconstructionsPanel
    from workbench.panels.reconstructions_model import preset_levels

    windows = {"soft tissue": (-160.0, 240.0)}
    assert preset_levels("soft tissue", (-1000.0, 1500.0), windows) == pytest.approx((0.336, 0.496))
    assert preset_levels("soft tissue", None, windows) == (0.10, 0.60)
    panel = ReconstructionsPanel()
    qtbot.addWidget(panel)
    panel.model.add_event(snapshot_event(1))
    panel.refresh()
    panel.set_hu_range((-1000.0, 1500.0))
    panel.apply_preset("soft tissue")
    for view in ("baseline", "reconstruction", "reference"):
        assert tuple(panel.items[view].levels) == pytest.approx((0.336, 0.496))
    panel.hist.setLevels(0.2, 0.3)  # dragging the histogram moves all three
    assert tuple(panel.items["baseline"].levels) == pytest.approx((0.2, 0.3))
    panel.set_colormap("viridis")
    assert panel.items["baseline"].lut is not None


def test_mri_snapshot_shows_mask_overlay(qtbot):
    from workbench.panels.reconstructions import ReconstructionsPanel

    panel = ReconstructionsPanel()
    qtbot.addWidget(panel)
    ev = snapshot_event(1, modality="mri")
    ev.measurement = np.ones((16, 16), np.float32)
    ev.mask = np.zeros((16, 16), np.float32)
    ev.mask[:, ::4] = 1
    panel.model.add_event(ev)
    panel.refresh()
    assert panel.mask_item.image.shape == (16, 16, 4)
    assert "k-space" in panel.plots["measurement"].titleLabel.text


# -- equivariance, log, info, settings ----------------------------------------------------
def test_equivariance_model_coalesces_requests():
    from workbench.panels.equivariance_model import EquivarianceModel

    m = EquivarianceModel()
    assert m.want(10) == 10
    assert m.want(20) is None and m.want(30) is None  # busy: remember the newest
    assert m.done(10, {"error": 0.1}) == 30
    assert m.done(30, {"error": 0.2}) is None
    assert m.result_angle == 30


def test_equivariance_panel_shows_results(qtbot):
    from test_workbench_fakes import FakeModel
    from workbench.panels.equivariance import EquivariancePanel

    panel = EquivariancePanel()
    qtbot.addWidget(panel)
    asked = []
    panel.angleRequested.connect(asked.append)
    panel.request_angle(90)
    assert asked == [90.0]
    img = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    res = FakeModel().equivariance(img, 90)
    panel.show_result(90, res)
    np.testing.assert_array_equal(panel.items["rotated_reconstruction"].image, res.rotated_reconstruction)
    assert "0.075" in panel.error_label.text()
    panel.show_curve(*FakeModel().equivariance_curve(img, [0, 90, 180]))
    np.testing.assert_array_equal(panel.curve.getData()[0], [0, 90, 180])


def test_log_and_info_panels(qtbot):
    from workbench.panels.info import InfoPanel
    from workbench.panels.log import LogPanel

    log = LogPanel()
    qtbot.addWidget(log)
    log.add("error", "bad <file>")
    log.add("warning", "careful")
    assert log.model.counts["error"] == 1 and "bad &lt;file&gt;" not in log.view.toPlainText()
    assert "bad <file>" in log.view.toPlainText()

    class S:
        kind, modality, units, spacing, source = "image", "ct", "HU", (0.5, 0.5), "/x/ct.dcm"
        metadata = {"PatientID": "ANON", "SliceThickness": "1.0"}

        def summary(self):
            return "ct.dcm: image 1x8x8 (ct, HU)"

    info = InfoPanel()
    qtbot.addWidget(info)
    info.set_scan(S(), "/x/ct.dcm", n_slices=3, index=1)
    rows = info.rows()
    assert rows["PatientID"] == "ANON" and rows["Units"] == "HU"
    assert info.slice_box.isEnabled() and info.slice_box.value() == 1


def test_settings_refuse_invalid_values_at_the_field(qtbot):
    from workbench.dialogs.settings import SettingsPanel

    cfg = ExperimentConfig()
    panel = SettingsPanel(cfg)
    qtbot.addWidget(panel)
    changed = []
    panel.configChanged.connect(changed.append)
    panel.set_text("solver.tol", "-1")
    assert not changed
    assert "solver.tol" in panel.error_labels["solver.tol"].text()
    assert not panel.error_labels["solver.tol"].isHidden()
    assert panel.config.solver.tol == cfg.solver.tol  # previous value kept
    panel.set_text("optim.steps", "abc")
    assert "optim.steps" in panel.error_labels["optim.steps"].text()
    panel.set_text("solver.tol", "1e-5")
    assert changed and changed[-1].solver.tol == pytest.approx(1e-5)
    assert panel.error_labels["solver.tol"].isHidden()
    panel.set_text("deq.gradient", "jfb")
    assert changed[-1].deq.gradient == "jfb"
    panel.set_text("loss.ei_weight", "0.5")
    assert changed[-1].loss.ei_weight == 0.5


def test_residuals_problem_row_shows_a_fallback_and_the_cap(qtbot):
    import dataclasses

    from workbench.panels.residuals import ResidualsPanel

    panel = ResidualsPanel()
    qtbot.addWidget(panel)
    rescued = dataclasses.replace(solve_event(4, "forward", iters=51, batch=1, reason="converged"),
                                  fallback="fixed_point", max_iter=40)
    panel.model.add(rescued)
    panel.refresh()
    assert panel.table.rowCount() == 1  # converged, but only after the configured solver failed
    assert panel.table.item(0, 3).text() == "51 (max 40)"
    assert panel.table.item(0, 5).text() == "anderson \u2192 fixed_point fallback"
    assert panel.plots["forward"].titleLabel.text == "Forward solves (51 it, fixed_point fallback)"


# -- a single point or a constant series (auto-range must not collapse, a lone point needs a symbol) --------
def test_fitted_span_widens_a_single_value_and_keeps_a_spread():
    from workbench.panels.axis_ranges import (curve_symbol, fitted_bounds, fitted_span, integer_tick_levels,
                                             isolated_points)

    assert fitted_span(0, 0, integer=True) == [0.0, 2.0]  # step 0: clipped at 0, not -0.5..0.5
    assert fitted_span(1, 1, integer=True) == [0.0, 2.0]
    assert fitted_span(7, 7, integer=True) == [6.0, 8.0]
    assert fitted_span(3, 40, integer=True) == [3.0, 40.0]
    assert fitted_span(-0.02, 1.02, integer=True) == pytest.approx([-0.02, 1.98])  # steps 0, 1 + symbol margin
    assert fitted_span(22.0, 22.0) == pytest.approx([20.9, 23.1])  # +-5 %
    assert fitted_span(0.0, 0.0) == [-0.5, 0.5]
    assert fitted_span(-0.3, -0.3, log=True) == pytest.approx([-0.8, 0.2])  # one decade around log10(0.5)
    assert fitted_span(0.61, 0.62) == [0.61, 0.62]
    assert fitted_bounds([None, [1.0, 1.0]], integer=(True, True)) == [None, [0.0, 2.0]]
    assert integer_tick_levels([(0.5, 0), (0.1, 0)]) == [(1.0, 0.0)]
    assert integer_tick_levels([(10.0, 0), (2.0, 0), (0.5, 0)]) == [(10.0, 0), (2.0, 0)]
    np.testing.assert_array_equal(isolated_points([1.0, np.nan, 2.0, 3.0, np.nan, 4.0]),
                                  [True, False, False, False, False, True])
    assert curve_symbol([0.5]) == "o" and curve_symbol([0.5, 0.4]) is None and curve_symbol([]) is None


def _shown(qtbot, panel):
    panel.resize(900, 600)
    panel.show()
    qtbot.waitExposed(panel)


def _view(plot):
    """The plot's view range once pending auto-ranges have run."""
    from PySide6.QtWidgets import QApplication

    QApplication.processEvents()
    plot.vb.prepareForPaint()
    return plot.vb.viewRange()


def _assert_range_holds(rng, value, min_width):
    lo, hi = rng
    assert lo < value < hi and hi - lo >= min_width, (rng, value)


def test_losses_panel_shows_a_single_step_and_validation(qtbot):
    from workbench.panels.losses import LossesPanel

    panel = LossesPanel()
    qtbot.addWidget(panel)
    _shown(qtbot, panel)
    assert panel.logy.isChecked()
    panel.model.add_step(StepFinished(step=0, losses={"total": 0.5}, lr=1e-3, seconds=0.1))
    panel.model.add_validation(ValidationFinished(step=0, psnr=22.0, ssim=0.6, baseline_psnr=18.0,
                                                  baseline_ssim=0.4))
    panel.refresh()
    total = panel.curves["total"]
    x, y = total.getData()
    np.testing.assert_array_equal(x, [0])
    np.testing.assert_allclose(y, [np.log10(0.5)])  # log y: the item holds log10
    for item in (total, panel.psnr_curve, panel.ssim_curve, panel.psnr_base):
        assert item.opts["symbol"] == "o" and item.scatter.isVisible() and len(item.scatter.data) == 1
    np.testing.assert_allclose(panel.psnr_curve.getData()[1], [22.0])
    for plot, value, min_width in ((panel.loss_plot, np.log10(0.5), 0.9), (panel.psnr_plot, 22.0, 1.0),
                                   (panel.ssim_plot, 0.6, 0.02)):
        xr, yr = _view(plot)
        assert -0.25 < xr[0] < 0 and xr[1] > 2  # [0, 2] padded: not -0.5..0.5 ("-400..400, x0.001")
        _assert_range_holds(yr, value, min_width)
        axis = plot.getAxis("bottom")
        assert axis.autoSIPrefixScale == 1.0 and "x0.001" not in axis.labelString()
        assert all(spacing >= 1 for spacing, _ in axis.tickSpacing(xr[0], xr[1], 400))  # integer steps
    panel.logy.setChecked(False)  # linear y: the constant is padded, not collapsed
    _assert_range_holds(_view(panel.loss_plot)[1], 0.5, 0.04)
    panel.logy.setChecked(True)

    panel.model.add_step(StepFinished(step=1, losses={"total": 0.25}, lr=1e-3, seconds=0.1))
    panel.model.add_validation(ValidationFinished(step=1, psnr=23.0, ssim=0.65))
    panel.refresh()
    assert total.opts["symbol"] is None and not total.curve.getPath().isEmpty()  # two points: a line
    assert panel.psnr_curve.opts["symbol"] == "o" and not panel.psnr_curve.curve.getPath().isEmpty()
    xr, yr = _view(panel.loss_plot)
    assert xr[0] < 0 and xr[1] > 1
    assert yr[0] < np.log10(0.25) and yr[1] > np.log10(0.5)


def test_residuals_panel_shows_a_single_solve_and_spectral_radius(qtbot):
    from workbench.panels.residuals import ResidualsPanel

    panel = ResidualsPanel()
    qtbot.addWidget(panel)
    _shown(qtbot, panel)
    panel.model.add(solve_event(3, "forward", iters=1, batch=1))
    panel.model.add_stability(StabilityChecked(step=3, spectral_radius=0.9, limit=0.9, penalty_weight=0.01,
                                               action="none"))
    panel.refresh()
    ix, iy = panel.iter_curves["forward"].getData()
    np.testing.assert_array_equal(ix, [3])
    np.testing.assert_array_equal(iy, [1])
    xr, yr = _view(panel.iter_plot)
    assert xr[0] < 2 and xr[1] > 4  # [2, 4]: step 3 +- 1
    _assert_range_holds(yr, 1, 2)
    assert all(spacing >= 1 for spacing, _ in panel.iter_plot.getAxis("left").tickSpacing(yr[0], yr[1], 300))
    xr, yr = _view(panel.radius_plot)
    _assert_range_holds(xr, 3, 2)
    _assert_range_holds(yr, 0.9, 0.05)  # radius on its limit: a constant, padded
    trace = [c for c in panel.curves["forward"] if c.isVisible()][-1]
    assert len(trace.getData()[0]) == 1 and trace.opts["symbol"] == "o" and trace.scatter.isVisible()
    xr, yr = _view(panel.plots["forward"])
    _assert_range_holds(xr, 1, 2)
    _assert_range_holds(yr, trace.getData()[1][0], 0.9)

    panel.model.add(solve_event(4, "forward", iters=5, batch=1))
    panel.refresh()
    newest = [c for c in panel.curves["forward"] if c.isVisible()][-1]
    assert newest.opts["symbol"] is None and not newest.curve.getPath().isEmpty()
    assert not panel.iter_curves["forward"].curve.getPath().isEmpty()
