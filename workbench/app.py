"""``equideq-workbench``: the QApplication, command-line options and the entry point.

Qt is imported only once the command line asks for a window, so ``--version`` and
``--help`` answer at once; the engine (torch, deepinv) is imported after the
window's first paint (:meth:`~workbench.main_window.MainWindow.load_engine`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Optional, Sequence

from engine.resources import default_run_root, resource_path
from workbench import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equideq-workbench",
                                description="EquiDEQ Workbench: train deep equilibrium reconstruction networks "
                                            "without ground truth and watch the fixed-point solver live.")
    p.add_argument("--demo", action="store_true", help="start a short training run on the built-in phantoms")
    p.add_argument("--config", metavar="FILE", help="experiment config (.toml / .yaml) to start with")
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint to open at start")
    p.add_argument("--scan", metavar="PATH", help="scan file or DICOM folder to open at start")
    p.add_argument("--screenshot-dir", metavar="DIR",
                   help="save screenshots of the window into DIR when the demo run has finished, then quit")
    p.add_argument("--screenshot-scan", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--quit-after", metavar="SECONDS", type=float, help="quit (cleanly) after this many seconds")
    p.add_argument("--run-root", metavar="DIR",
                   help="parent folder for run directories (default: ./runs in a source checkout, else the "
                        "user data folder, e.g. ~/.local/share/equideq/runs)")
    p.add_argument("--report-startup", action="store_true",
                   help="print when the window was painted and the engine loaded (JSON, seconds since the epoch), "
                        "then quit (workbench.startup.measure_time_to_window uses it)")
    p.add_argument("--smoke-test", metavar="DIR",
                   help="train the config (--config) for its steps, reconstruct, save DIR/smoke_test.png, print "
                        "one EQUIDEQ_SMOKE JSON line and quit; exit status 0 only when every stage succeeded "
                        "(packaging/smoke_test.py runs the bundled app this way)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def application_icon():
    """The app's icon at every size shipped in resources/icons (PNGs: no SVG plugin needed)."""
    from PySide6.QtGui import QIcon

    icon = QIcon()
    for png in sorted(resource_path("icons").glob("equideq-*.png")):
        icon.addFile(str(png))
    return icon


def configure_interpreter() -> None:
    """Hand the GIL to the GUI thread more often while the engine computes."""
    sys.setswitchinterval(0.002)


def install_signal_handlers(app, window):
    """SIGINT / SIGTERM close the window cleanly (no question asked).

    Python only runs signal handlers when the interpreter gets control, so a
    periodic no-op timer wakes it up while Qt's event loop waits.
    """
    from PySide6.QtCore import QTimer

    def handler(signum, _frame):
        QTimer.singleShot(0, window.request_shutdown)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not in the main thread / unsupported
            pass
    timer = QTimer(app)
    timer.setInterval(200)
    timer.timeout.connect(lambda: None)
    timer.start()
    return timer


def _startup(window, args) -> None:
    """Open what the command line asked for (in the background), then start the demo."""
    steps = []
    if args.config:
        steps.append(lambda then: window.files.open_config(args.config, then=then))
    if args.checkpoint:
        steps.append(lambda then: window.files.open_checkpoint(args.checkpoint, then=then))
    if args.scan:  # shown at once; Reconstruct when asked
        steps.append(lambda then: window.files.open_scan(args.scan, then=then))

    def finish():
        if args.demo or args.smoke_test:
            window.train()

    def run(i=0):
        if i < len(steps):
            steps[i](lambda: run(i + 1))
        else:
            finish()

    run()


def _screenshots(window, directory: str, scan=None) -> None:
    """After the demo run: compute the equivariance curve, then grab the window twice."""
    from workbench.screens import save_screenshots

    def on_end(_result):
        window.on_run_ended.remove(on_end)
        save_screenshots(window, directory, then=window.request_shutdown, scan=scan)

    window.on_run_ended.append(on_end)


SMOKE_MARKER = "EQUIDEQ_SMOKE "


def _smoke_test(window, directory: str) -> dict:
    """After the run _startup starts: reconstruct (a phantom, or the --scan), grab the window, report, quit.
    The returned report is complete once ``ok`` is set; a stage that fails reports through ``window.errors``
    and the --quit-after watchdog ends the wait."""
    from PySide6.QtCore import QTimer

    report = {"version": __version__, "run_root": window.run.run_root, "run": None, "reconstructed": False,
              "screenshot": None, "ok": None}

    def finish():
        from workbench.screens import save_window_image

        os.makedirs(directory, exist_ok=True)
        report["screenshot"] = save_window_image(window, os.path.join(directory, "smoke_test.png"))
        window.request_shutdown()

    def on_end(result):
        window.on_run_ended.remove(on_end)
        report["run"] = result
        if result == "completed":
            window.analysis.reconstruct(then=lambda: (report.update(reconstructed=True),
                                                      QTimer.singleShot(500, finish)))  # let the views draw
        else:
            finish()

    window.on_run_ended.append(on_end)
    return report


def _report_smoke_test(report: dict, window) -> int:
    report["errors"] = [f"{title}: {message}" for title, message in window.errors]
    report["ok"] = report["run"] == "completed" and report["reconstructed"] and not report["errors"]
    print(SMOKE_MARKER + json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def _report_startup(window) -> None:
    """Print the window's start-up times as one JSON line once the engine is loaded, then quit."""
    def report():
        print("EQUIDEQ_STARTUP " + json.dumps(window.startup_times), flush=True)
        window.request_shutdown()

    window.engineReady.connect(report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")
    configure_interpreter()
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0]])
    settings_dir = os.environ.get("EQUIDEQ_WORKBENCH_SETTINGS_DIR")
    if settings_dir:  # scripts and tests keep the user's settings untouched
        from PySide6.QtCore import QSettings

        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings_dir)
    app.setApplicationName("EquiDEQ Workbench")
    app.setOrganizationName("EquiDEQ")
    app.setDesktopFileName("equideq-workbench")  # packaging/equideq-workbench.desktop (Wayland matches them)
    app.setWindowIcon(application_icon())

    from workbench.main_window import MainWindow

    window = MainWindow(run_root=args.run_root or str(default_run_root()))
    window.show()
    keepalive = install_signal_handlers(app, window)  # noqa: F841 - must stay referenced
    if args.screenshot_dir:
        _screenshots(window, args.screenshot_dir, args.screenshot_scan)
        if not args.demo:  # nothing to wait for: grab the window once it has settled
            from workbench.screens import save_screenshots

            QTimer.singleShot(1500, lambda: save_screenshots(window, args.screenshot_dir,
                                                             then=window.request_shutdown,
                                                             scan=args.screenshot_scan))
    if args.report_startup:
        _report_startup(window)
    smoke = _smoke_test(window, args.smoke_test) if args.smoke_test else None
    if args.quit_after is not None:
        QTimer.singleShot(int(args.quit_after * 1000), window.request_shutdown)
    QTimer.singleShot(0, lambda: _startup(window, args))
    code = int(app.exec())
    return _report_smoke_test(smoke, window) if smoke is not None else code


if __name__ == "__main__":
    sys.exit(main())
