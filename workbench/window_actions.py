"""The main window's actions, menus and tool bar (File, Run, View, Help), connected to its presenters."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QToolBar


def make_action(parent, text: str, slot, shortcut=None, tip: str = "") -> QAction:
    act = QAction(text, parent)
    if shortcut:
        act.setShortcut(QKeySequence(shortcut))
    if tip:
        act.setToolTip(tip)
        act.setStatusTip(tip)
    if slot is not None:
        act.triggered.connect(lambda _checked=False: slot())
    return act


def build_actions(window) -> None:
    """Give ``window`` its ``act_*`` actions, its menus (``run_menu``, ``help_menu``, ...) and ``toolbar``."""
    w, files, run = window, window.files, window.run

    def a(*args, **kwargs) -> QAction:
        return make_action(w, *args, **kwargs)

    w.act_open_scan = a("Open &Scan…", files.open_scan_dialog, "Ctrl+O",
                        "Open a scan file (DICOM, HDF5, NumPy, PNG/TIFF, NIfTI): shown at once, reconstructed on demand")
    w.act_open_folder = a("Open DICOM &Folder…", files.open_folder_dialog, None, "Open a DICOM series folder")
    w.act_open_ckpt = a("Open &Checkpoint…", files.open_checkpoint_dialog, "Ctrl+Shift+O")
    w.act_open_run = a("Open &Run…", w.run_record.open_run_dialog, None,
                       "Show a run directory (equideq train --out, or a workbench run): its loss curves, "
                       "validation, solver residuals and snapshots")
    w.act_follow_run = a("&Follow Run…", w.run_record.follow_run_dialog, None,
                         "Show a run directory and keep showing what its run adds (a local, mounted or synced folder)")
    w.act_stop_following = a("Stop Following", w.run_record.stop_following, None,
                             "Stop reading the run followed; its panels stay")
    w.act_stop_following.setEnabled(False)
    w.act_save_ckpt = a("Save Checkpoint &As…", files.save_checkpoint_dialog, "Ctrl+Shift+S")
    w.act_export = a("&Export Reconstruction…", files.export_dialog, "Ctrl+E",
                     "Export the displayed DEQ reconstruction (PNG with the current window, NumPy, DICOM, HDF5)")
    w.act_open_config = a("Open Co&nfig…", files.open_config_dialog)
    w.act_save_config = a("Sa&ve Config As…", files.save_config_dialog)
    w.act_reset_config = a("Reset Settings to Defaults", w.reset_to_defaults, None,
                           "Every setting back to the built-in default config")
    w.act_quit = a("&Quit", w.close, "Ctrl+Q")
    w.act_train = a("Train", run.train, "F5", "Train the DEQ on the training data and config")
    w.act_reconstruct = a("Reconstruct", w.analysis.reconstruct, "F6",
                          "Reconstruct the slice shown (or a phantom) with the current model, at the chosen size")
    w.act_pause = a("Pause", run.toggle_pause, "F7", "Pause / resume the training run")
    w.act_stop = a("Stop", run.stop, "F8", "Stop the run (keeps the last good state)")
    w.act_keep = a("Keep current iterate", run.keep_current_iterate, None,
                   "End the solve in progress now and use its current iterate")
    w.act_cancel = a("Cancel Work in Progress", w.jobs.cancel, None,
                     "Cancel the reconstruction, probe or file read in progress")
    w.act_quick_guide = a("&Quick Guide", w.show_quick_guide, "F1",
                          "DEQ, Equivariant Imaging, implicit vs JFB gradients, how to read the residual plot")
    w.act_welcome = a("Show the &Welcome Hint", w.show_welcome, None, "What the window shows and where to start")
    w.act_about = a("&About EquiDEQ Workbench", w.show_about, None,
                    "Versions of the app, torch, deepinv, Qt, and the device in use")
    run_actions = (w.act_train, w.act_reconstruct, w.act_pause, w.act_stop, w.act_keep)

    mb = w.menuBar()
    fm = mb.addMenu("&File")
    fm.addActions([w.act_open_scan, w.act_open_folder, w.act_open_ckpt])
    w.recent_menu = fm.addMenu("Recent Files")
    for group in ([w.act_open_run, w.act_follow_run, w.act_stop_following], [w.act_save_ckpt, w.act_export],
                  [w.act_open_config, w.act_save_config, w.act_reset_config], [w.act_quit]):
        fm.addSeparator()
        fm.addActions(group)
    w.run_menu = mb.addMenu("&Run")
    w.run_menu.addActions(list(run_actions) + [w.act_cancel])
    mb.addMenu("&View").addActions([dock.toggleViewAction() for dock in w.docks.values()])
    w.help_menu = mb.addMenu("&Help")
    w.help_menu.addActions([w.act_quick_guide, w.act_welcome])
    w.help_menu.addSeparator()
    w.help_menu.addAction(w.act_about)
    w.help_menu.addSeparator()

    tb = QToolBar("Run")
    tb.setObjectName("toolbar_run")
    tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
    tb.addActions(list(run_actions))
    tb.addSeparator()
    tb.addActions([w.act_open_scan, w.act_open_ckpt, w.act_export])
    w.addToolBar(tb)
    w.toolbar = tb
    w.reconstructions.controls.reconstruct_button.setDefaultAction(w.act_reconstruct)
