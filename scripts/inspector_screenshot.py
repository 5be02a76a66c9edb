#!/usr/bin/env python
"""Take docs/screenshots/solver_inspector.png: run the divergence demonstration in the workbench,
wait for the alarm to open the Solver Inspector, replay the failed solve damped and with Anderson,
then grab the inspector window.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/inspector_screenshot.py [--out PNG]

The config is the built-in quick one at 32 px and 12 views (where MAKE_IT_DIVERGE's solves
diverge within a few iterations); the user's QSettings are not touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots" / "solver_inspector.png"))
    p.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
    args = p.parse_args()
    settings_dir = tempfile.mkdtemp(prefix="equideq-inspector-shot-")
    os.environ["EQUIDEQ_WORKBENCH_SETTINGS_DIR"] = settings_dir

    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication([sys.argv[0]])
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings_dir)
    from engine.config import builtin_config
    from workbench.main_window import MainWindow
    from workbench.panels.inspector_model import ReplaySettings
    from workbench.presenters.run import RunPhase

    config = builtin_config("ct_phantom_quick").replace(**{
        "physics.img_size": 32, "physics.views": 12, "optim.steps": 5, "data.n_train": 8, "data.n_val": 2,
        "optim.batch_size": 2, "run.checkpoint_every": 0})
    window = MainWindow(config=config, run_root=os.path.join(settings_dir, "runs"), restore=False,
                        error_dialog=lambda title, message: None)
    window.show()
    feature, result = window.inspector, {"code": 1, "replayed": False}

    def grab() -> None:
        feature.dialog.refresh()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        feature.dialog.grab().save(args.out)
        print(f"saved {args.out}")
        result["code"] = 0
        window.request_shutdown()
        QTimer.singleShot(2000, app.quit)

    def poll() -> None:
        model = feature.presenter.model
        if not result["replayed"] and window.run.phase is RunPhase.PAUSED and feature.dialog and model.measured:
            result["replayed"] = True
            recorded = feature.presenter.replay_defaults()
            feature.presenter.replay(ReplaySettings(recorded.name, recorded.memory, 0.5, recorded.tol,
                                                    recorded.max_iter))
            feature.presenter.replay(ReplaySettings("anderson", 5, 1.0, recorded.tol, recorded.max_iter))
        elif result["replayed"] and len(model.replays) == 2 and model.working == 0:
            QTimer.singleShot(800, grab)
            return
        QTimer.singleShot(100, poll)

    QTimer.singleShot(500, feature.act_demonstration.trigger)
    QTimer.singleShot(600, poll)
    QTimer.singleShot(int(args.timeout * 1000), lambda: (print("timed out", file=sys.stderr),
                                                          window.request_shutdown(), app.quit()))
    app.exec()
    return result["code"]


if __name__ == "__main__":
    sys.exit(main())
