#!/usr/bin/env python
"""Take the README screenshots: start the workbench under Xvfb with --demo and let it
save PNGs (window.grab()) into docs/screenshots/ when the demo run has finished.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--timeout 600]

Uses ``xvfb-run`` when available, else starts ``Xvfb :99`` itself. The user's
QSettings are not touched (a temporary settings folder is used).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--size", default="1600x1000")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="equideq-shots-")
    env = dict(os.environ, EQUIDEQ_WORKBENCH_SETTINGS_DIR=tmp, QT_QPA_PLATFORM="xcb")
    app = [sys.executable, "-m", "workbench", "--demo", "--screenshot-dir", str(out),
           "--run-root", os.path.join(tmp, "runs"), "--quit-after", str(args.timeout)]
    try:  # a real CT slice for the second screenshot, when pydicom ships its test file
        sys.path.insert(0, str(ROOT))
        from engine.data import pydicom_test_file

        ct = pydicom_test_file("CT_small.dcm")
        if ct is not None:
            app += ["--screenshot-scan", str(ct)]
    except Exception:
        pass
    xvfb_proc = None
    if shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", f"-screen 0 {args.size}x24"] + app
    elif shutil.which("Xvfb"):
        xvfb_proc = subprocess.Popen(["Xvfb", ":99", "-screen", "0", f"{args.size}x24"])
        time.sleep(1.0)
        env["DISPLAY"] = ":99"
        cmd = app
    else:
        print("neither xvfb-run nor Xvfb found; falling back to the offscreen platform", file=sys.stderr)
        env["QT_QPA_PLATFORM"] = "offscreen"
        cmd = app
    try:
        rc = subprocess.run(cmd, cwd=str(ROOT), env=env, timeout=args.timeout + 60).returncode
    finally:
        if xvfb_proc is not None:
            xvfb_proc.terminate()
            xvfb_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    shots = sorted(out.glob("*.png"))
    for s in shots:
        print(s)
    return rc if shots else 1


if __name__ == "__main__":
    sys.exit(main())
