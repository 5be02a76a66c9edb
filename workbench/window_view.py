"""The presenters' view, as the main window implements it: small ``show_*`` / ``set_*`` /
``ask_*`` methods that draw, ask or forward and do nothing else. A mixin of
:class:`~workbench.main_window.MainWindow`, which builds the widgets these use."""

from __future__ import annotations

from typing import Callable, Optional

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QFileDialog, QInputDialog

from engine.config import ExperimentConfig
from workbench.jobs import Job
from workbench.presenters.run import ActionStates
from workbench.worker import user_message

MODALITY_QUESTION = ("{name} does not say whether it is a CT or an MRI scan.\n\nCT: Reconstruct simulates a "
                     "sparse-view sinogram from it; MRI: undersampled k-space. Which is it?")
MODALITY_ANSWERS = {"CT": "ct", "MRI": "mri"}


class PresenterView:
    # -- messages ---------------------------------------------------------------------------
    def log_message(self, level: str, message: str) -> None:
        self.log.add(level, message)

    def report_error(self, title: str, message, log: bool = True) -> None:
        """A dialog (not while closing) and, unless ``log`` is False (logged already), a log line."""
        msg = user_message(message) if isinstance(message, BaseException) else str(message)
        self.errors.append((title, msg))
        if log:
            self.log.add("error", f"{title}: {msg}")
        if not self.run.closing:  # no dialogs while the window goes away
            try:
                self.error_dialog(title, msg)
            except Exception:
                pass

    def close_error(self, title: str) -> None:
        getattr(self.error_dialog, "dismiss", lambda _title: None)(title)  # a test's recorder has none

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def show_busy(self, job: Job) -> None:
        self.jobs.watch(job)

    # -- settings, actions, run ---------------------------------------------------------------
    def show_invalid_setting(self, key: str) -> None:
        self.docks["settings"].raise_()
        self.settings_panel.show_field(key)

    def mark_stale(self, panels: tuple, note: str) -> None:
        for key in panels:
            self.docks[key].setWindowTitle(self.dock_titles[key] + (f" ({note})" if note else ""))

    def set_progress(self, value: int, maximum: Optional[int] = None) -> None:
        if maximum is not None:
            self.progress.setRange(0, maximum)
        self.progress.setValue(value)

    def show_actions(self, actions: ActionStates) -> None:
        self.act_train.setEnabled(actions.train)
        self.act_pause.setEnabled(actions.pause)
        self.act_pause.setText(actions.pause_text)
        self.act_stop.setEnabled(actions.stop)
        self.act_keep.setEnabled(actions.keep_iterate)
        self.act_open_config.setEnabled(actions.edit_config)
        self.act_reset_config.setEnabled(actions.edit_config)
        self.act_save_ckpt.setEnabled(actions.save_checkpoint)
        if hasattr(self, "scans"):  # "use as training data" follows the run
            self.scans.show_choices()

    def set_settings_editable(self, editable: bool) -> None:
        self.settings_panel.setEnabled(editable)

    def show_config(self, config: ExperimentConfig) -> None:
        self.settings_panel.set_config(config)

    def show_run(self, run_dir: Optional[str], note: str) -> None:
        self.info.set_run(run_dir, note)

    def show_following(self, following: bool) -> None:
        self.act_stop_following.setEnabled(following)

    def show_model_info(self, text: str) -> None:
        self.info.set_model(text)

    def show_reconstruction_settings(self, text: str) -> None:
        self.info.set_reconstruction(text)

    def show_device(self, text: str) -> None:
        self.device_label.setText(text)

    def show_title(self, title: str) -> None:
        self.setWindowTitle(title)

    def raise_panel(self, key: str) -> None:
        self.docks[key].raise_()

    # -- panels ----------------------------------------------------------------------------------
    def clear_panels(self) -> None:
        for panel in (self.residuals, self.losses, self.reconstructions, self.equivariance):
            panel.clear()

    def clear_equivariance(self) -> None:
        self.equivariance.clear()

    def set_hu_range(self, hu_range) -> None:
        self.reconstructions.set_hu_range(hu_range)

    def displayed_levels(self) -> tuple[float, float]:
        return self.reconstructions.levels

    def request_equivariance(self) -> None:
        self.equivariance.request_angle(self.equivariance.slider.value())

    def show_equivariance(self, angle: float, result) -> None:
        self.equivariance.show_result(angle, result)

    def show_equivariance_curve(self, angles, errors) -> None:
        self.equivariance.show_curve(angles, errors)

    def equivariance_failed(self) -> None:
        self.equivariance.request_failed()

    # -- the scan ---------------------------------------------------------------------------------
    def show_scan(self, scan, path: str, n_slices: int, index: int) -> None:
        self.info.set_scan(scan, path, n_slices, index)

    def show_scan_slice(self, index: int, n_slices: int) -> None:
        self.reconstructions.controls.show_slice(index, n_slices)
        self.info.show_slice(index, n_slices)

    def show_scan_choices(self, choices) -> None:
        self.reconstructions.controls.show_choices(choices)

    def show_scan_modality(self, text: str) -> None:
        self.info.set_row("Modality", text)

    def show_levels(self, levels: tuple[float, float]) -> None:
        self.reconstructions.show_custom_levels(levels)

    def ask_modality(self, name: str) -> Optional[str]:
        """CT or MRI for a scan whose file does not say; None when the user cancels."""
        answer, ok = QInputDialog.getItem(self, "Which modality?", MODALITY_QUESTION.format(name=name),
                                          list(MODALITY_ANSWERS), 0, False)
        return MODALITY_ANSWERS.get(answer) if ok else None

    # -- files ----------------------------------------------------------------------------------
    def show_recent(self, recent: list) -> None:
        self.recent_menu.clear()
        for item in recent:
            act = self.recent_menu.addAction(item.label())
            act.setToolTip(item.path)
            act.triggered.connect(lambda _c=False, p=item.path: self.files.open_path(p))
        self.recent_menu.setEnabled(bool(recent))

    def ask_open_file(self, title: str, file_filter: str, start: str) -> str:
        return QFileDialog.getOpenFileName(self, title, start, file_filter)[0]

    def ask_folder(self, title: str, start: str) -> str:
        return QFileDialog.getExistingDirectory(self, title, start)

    def ask_save_file(self, title: str, file_filter: str, start: str) -> tuple[str, str]:
        path, chosen = QFileDialog.getSaveFileName(self, title, start, file_filter)
        return path, chosen

    # -- the window ------------------------------------------------------------------------------
    def call_later(self, ms: int, fn: Callable[[], None]) -> None:
        QTimer.singleShot(ms, fn)

    def close_window(self) -> None:
        self.close()
