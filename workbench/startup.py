"""Time-to-window: how long ``equideq-workbench`` takes from launch until its window is painted,
and until the engine (torch, deepinv) is loaded behind it. Qt-free: each measurement starts
the workbench in a fresh process (``--report-startup``) with its own settings folder.

    from workbench.startup import measure_time_to_window
    timings = measure_time_to_window(runs=3)   # [StartupTiming(window_s=1.3, engine_s=4.0), ...]

A display is needed (``DISPLAY``, or ``QT_QPA_PLATFORM=offscreen`` in ``env``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MARKER = "EQUIDEQ_STARTUP "


@dataclass(frozen=True)
class StartupTiming:
    window_s: float  # launch -> the window's first paint
    engine_s: float  # launch -> torch, deepinv and the engine imported, device probed


def measure_time_to_window(runs: int = 1, timeout_s: float = 180.0, env: Optional[dict] = None,
                           python: str = sys.executable) -> list[StartupTiming]:
    """Start the workbench ``runs`` times and time each start (raises RuntimeError when one fails)."""
    timings = []
    for _ in range(int(runs)):
        with tempfile.TemporaryDirectory(prefix="equideq-startup-") as settings:
            run_env = dict(os.environ, **(env or {}))
            run_env["EQUIDEQ_WORKBENCH_SETTINGS_DIR"] = settings  # a first start, the user's settings untouched
            launched = time.time()
            result = subprocess.run([python, "-m", "workbench", "--report-startup", "--run-root",
                                     os.path.join(settings, "runs")], cwd=str(ROOT), env=run_env,
                                    capture_output=True, text=True, timeout=timeout_s)
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith(MARKER)), None)
        if line is None:
            raise RuntimeError(f"the workbench did not report its start-up (exit {result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}")
        times = json.loads(line[len(MARKER):])
        timings.append(StartupTiming(window_s=times["window painted"] - launched,
                                     engine_s=times["engine ready"] - launched))
    return timings


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for timing in measure_time_to_window(runs):
        print(f"window {timing.window_s:.2f} s, engine {timing.engine_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
