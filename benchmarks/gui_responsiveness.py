#!/usr/bin/env python
"""GUI responsiveness while training: timer jitter of the Qt event loop.

Starts the workbench window (offscreen unless a display is set), starts a
training run, and records the actual intervals of a 10 ms QTimer until the run
ends. Prints p50 / p99 / max interval and stall (interval - 10 ms).
Goal: p99 < 50 ms.

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/gui_responsiveness.py [--steps 20] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="ct_phantom_quick", help="built-in config name")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="physics.img_size")
    p.add_argument("--interval", type=float, default=10.0, help="timer interval in ms")
    args = p.parse_args()

    from PySide6.QtCore import QSettings, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    tmp = tempfile.mkdtemp(prefix="equideq-bench-")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tmp)

    import numpy as np

    from engine.config import builtin_config
    from workbench.app import configure_interpreter
    from workbench.main_window import MainWindow

    configure_interpreter()

    cfg = builtin_config(args.config).replace(**{"optim.steps": args.steps, "physics.img_size": args.size,
                                                 "run.validate_every": max(1, args.steps // 5)})
    win = MainWindow(config=cfg, settings=QSettings(os.path.join(tmp, "b.ini"), QSettings.Format.IniFormat),
                     error_dialog=lambda t, m: print(f"error: {t}: {m}", file=sys.stderr),
                     run_root=os.path.join(tmp, "runs"), restore=False)
    win.show()

    stamps: list[float] = []
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(int(args.interval))
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    t0 = [0.0]
    done = []

    def ended(result):
        done.append((result, time.perf_counter() - t0[0]))
        timer.stop()
        QTimer.singleShot(50, win.close)

    def start():
        t0[0] = time.perf_counter()
        timer.start()
        win.train()

    def start_when_warm():
        # like a real session: the window warms the engine up (imports torch) at start-up
        if win.tasks.pending:
            QTimer.singleShot(100, start_when_warm)
        else:
            start()

    win.on_run_ended.append(ended)
    QTimer.singleShot(200, start_when_warm)
    app.exec()

    iv = np.diff(np.asarray(stamps)) * 1000.0
    if iv.size == 0:
        print("no timer ticks recorded", file=sys.stderr)
        return 1
    stall = np.maximum(iv - args.interval, 0.0)
    result, secs = done[0] if done else ("?", float("nan"))
    n_solves = sum(win.residuals.model.counts.values())
    print(f"training run: {result}, {len(win.losses.model.steps)} steps, {n_solves} solves, {secs:.1f} s, "
          f"img {args.size}px, {os.cpu_count()} cores; {iv.size} ticks of a {args.interval:.0f} ms timer; "
          f"{win.relay.emitted} cross-thread wake-ups")
    print()
    print(f"{'':>10} | {'p50':>8} | {'p99':>8} | {'max':>8}")
    print(f"{'-' * 10}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}")
    for name, arr in (("interval", iv), ("stall", stall)):
        print(f"{name + ' ms':>10} | {np.percentile(arr, 50):8.1f} | {np.percentile(arr, 99):8.1f} | {arr.max():8.1f}")
    if os.environ.get("EQUIDEQ_BENCH_VERBOSE"):
        ts = np.asarray(stamps[1:]) - t0[0]
        for i in np.argsort(iv)[::-1][:8]:
            print(f"  stall of {iv[i]:.0f} ms ending at t = {ts[i]:.2f} s")
    ok = np.percentile(stall, 99) < 50.0
    print()
    print(f"goal p99 stall < 50 ms: {'met' if ok else 'NOT met'}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
