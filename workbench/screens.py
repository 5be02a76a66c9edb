"""Screenshots of the main window (used by ``--screenshot-dir`` and scripts/screenshots.py)."""

from __future__ import annotations

import os
from typing import Callable, Optional

from PySide6.QtCore import QTimer


def save_window_image(window, path: str) -> str:
    """Draw what the plot and image timers have pending, then save the window as ``path``; returns it."""
    window.refresh_plots()
    window.refresh_images()
    window.grab().save(path)
    return path


def save_screenshots(window, directory: str, then: Optional[Callable] = None,
                     scan: Optional[str] = None) -> list[str]:
    """Compute the equivariance curve, then save workbench_training.png; open ``scan``
    (if given: reconstructed by the trained model at the scan's own size, its tags in the
    info panel) and save workbench_scan_log.png with the log and scan info raised; ``then``
    runs afterwards. The first-run notices are closed for the pictures."""
    os.makedirs(directory, exist_ok=True)
    saved: list[str] = []
    for key in list(window.notices.notices):
        window.notices.hide_notice(key)

    def grab(name: str) -> None:
        path = save_window_image(window, os.path.join(directory, name))
        saved.append(path)
        window.log.add("info", f"screenshot saved: {path}")

    def second():
        window.docks["log"].raise_()
        window.docks["info"].raise_()
        when_idle(lambda: QTimer.singleShot(600, lambda: (grab("workbench_scan_log.png"),
                                                          window.docks["equivariance"].raise_(),
                                                          window.docks["settings"].raise_(), then and then())))

    def when_idle(fn, waited=0):
        """After the work the reconstruction started (its equivariance probe), so no progress bar is in the picture."""
        if window.tasks.pending == 0 or waited > 300:
            fn()
        else:
            QTimer.singleShot(200, lambda: when_idle(fn, waited + 1))

    def first():
        grab("workbench_training.png")
        if scan:
            def reconstruct():
                window.scans.choose_size("native")
                window.analysis.reconstruct(then=second)

            window.files.open_scan(scan, then=reconstruct)
        else:
            second()

    state = {"waited": 0}

    def wait_for_curve():
        eq = window.equivariance.model
        state["waited"] += 1
        if (eq.curve is not None and eq.result is not None) or state["waited"] > 150:
            QTimer.singleShot(300, first)
        else:
            QTimer.singleShot(200, wait_for_curve)

    window.docks["equivariance"].raise_()
    window.equivariance.request_angle(window.equivariance.slider.value())
    window.equivariance.request_curve()
    wait_for_curve()
    return saved
