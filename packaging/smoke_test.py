#!/usr/bin/env python3
"""Smoke test of the packaged app: build the bundle, then use it as a user would, from its own folder.

    python3 packaging/smoke_test.py              # build (packaging/build.sh), then test dist/equideq
    python3 packaging/smoke_test.py --no-build   # test the bundle already built

Not part of the test suite (the build takes minutes). It checks that

1. ``equideq --version`` and ``equideq-workbench --version`` of the bundle report pyproject.toml's version;
2. the bundled workbench, offscreen, trains a shipped config for two steps, reconstructs a CT slice
   (pydicom's CT_small.dcm when the build venv has it, else a phantom) and saves a screenshot
   (``--smoke-test``), exiting 0;
3. its run directory and settings land in the user's XDG folders (a fresh HOME here), not in the
   working directory, which is the bundle itself;
4. the bundled CLI reconstructs a scan with that checkpoint into DICOM and PNG, and the checkpoint and
   both exports carry the version;
5. nothing inside the bundle was written, changed or removed.

Exit status 0 when every check passed; the screenshot is copied to build/smoke-test/smoke_test.png.
Uses only the standard library, and the build venv's Python to read the checkpoint and DICOM back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_MARKER = "EQUIDEQ_SMOKE "  # workbench/app.py prints the --smoke-test report after it
TWO_STEPS = {("optim", "steps"): 2, ("run", "checkpoint_every"): 2, ("run", "validate_every"): 2,
             ("data", "n_train"): 8}


class SmokeFailure(Exception):
    pass


def check(condition: bool, what: str) -> None:
    print(f"   {'ok  ' if condition else 'FAIL'} {what}", flush=True)
    if not condition:
        raise SmokeFailure(what)


def checkout_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` -> (kind, size, mtime): what must not change while the app runs."""
    state = {}
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        state[str(path.relative_to(folder))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return state


def toml_text(config: dict) -> str:
    """A shipped config (tables of scalars and lists of scalars) as TOML: the standard library reads TOML only."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    lines = []
    for table, keys in config.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {value(v)}" for key, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file."""
    data, out, at = path.read_bytes(), {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"tEXt":
            key, _, text = data[at + 8:at + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        at += 12 + length
    return out


def run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"   ran {Path(str(cmd[0])).name} {' '.join(str(c) for c in cmd[1:3])}... "
          f"in {time.monotonic() - started:.1f} s (exit {result.returncode})", flush=True)
    return result


def venv_python(venv: Path, code: str, *args) -> str:
    """Run ``code`` in the build venv (torch, pydicom and the installed engine) and return its output."""
    result = run([venv / "bin" / "python", "-c", code, *args], timeout=300)
    if result.returncode != 0:
        raise SmokeFailure(f"the build venv could not read the outputs back: {result.stderr[-2000:]}")
    return result.stdout.strip()


def smoke_test(bundle: Path, venv: Path, timeout: float) -> Path:
    version = checkout_version()
    ext = ".exe" if sys.platform == "win32" else ""
    workbench, cli = bundle / f"equideq-workbench{ext}", bundle / f"equideq{ext}"
    before = tree_state(bundle)
    print(f"== the bundle {bundle} ({len(before)} entries), checkout version {version}")

    with tempfile.TemporaryDirectory(prefix="equideq-smoke-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        xdg = {"XDG_DATA_HOME": home / ".local" / "share", "XDG_CONFIG_HOME": home / ".config",
               "XDG_CACHE_HOME": home / ".cache"}
        for folder in xdg.values():
            folder.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EQUIDEQ_", "PYTHON", "QT_")) and k not in ("VIRTUAL_ENV", "LD_LIBRARY_PATH")}
        env.update({k: str(v) for k, v in xdg.items()}, HOME=str(home), QT_QPA_PLATFORM="offscreen")

        print("== 1. versions")
        for exe, prog in ((cli, "equideq"), (workbench, "equideq-workbench")):
            out = run([exe, "--version"], timeout=120, env=env, cwd=bundle)
            check(out.returncode == 0 and out.stdout.strip() == f"{prog} {version}",
                  f"{prog} --version says '{out.stdout.strip()}'")

        print("== 2. two training steps, a reconstruction and a screenshot in the bundled workbench")
        config = tomllib.loads((ROOT / "resources" / "configs" / "ct_phantom_quick.toml").read_text("utf-8"))
        for (table, key), value in TWO_STEPS.items():
            config[table][key] = value
        config_path = tmp / "two_steps.toml"
        config_path.write_text(toml_text(config), encoding="utf-8")
        scan = venv_python(venv, "from engine.data import pydicom_test_file; print(pydicom_test_file('CT_small.dcm') or '')")
        shots = tmp / "shots"
        app = [workbench, "--config", config_path, "--smoke-test", shots, "--quit-after", timeout]
        app += ["--scan", scan] if scan else []
        out = run(app, timeout=timeout + 60, env=env, cwd=bundle)  # the working directory is the bundle
        report_line = next((ln for ln in out.stdout.splitlines() if ln.startswith(SMOKE_MARKER)), None)
        if report_line is None:
            print(out.stdout[-3000:], out.stderr[-5000:], sep="\n")
        check(report_line is not None, "the workbench printed its smoke-test report")
        report = json.loads(report_line[len(SMOKE_MARKER):])
        print(f"   report: {json.dumps(report)}")
        check(out.returncode == 0 and report["ok"],
              f"trained ({report['run']}), reconstructed {'slice of ' + Path(scan).name if scan else 'a phantom'} "
              f"({report['reconstructed']}), no error ({report.get('errors')}), exit {out.returncode}")
        screenshot = Path(report["screenshot"] or shots / "missing.png")
        check(screenshot.is_file() and screenshot.stat().st_size > 10_000, f"screenshot {screenshot.name} saved")

        print("== 3. where the app wrote")
        runs_dir = xdg["XDG_DATA_HOME"] / "equideq" / "runs"
        check(Path(report["run_root"]) == runs_dir, f"run root is the XDG data folder ({report['run_root']})")
        checkpoints = sorted(runs_dir.glob("*/last.pt"))
        check(len(checkpoints) == 1, f"one run directory with last.pt under {runs_dir}")
        check((xdg["XDG_CONFIG_HOME"] / "EquiDEQ" / "Workbench.ini").is_file(),
              "settings in $XDG_CONFIG_HOME/EquiDEQ/Workbench.ini")
        written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
        print("   files the app left in HOME:")
        for path in written:
            print(f"     {path}")

        print("== 4. the bundled CLI reconstructs with that checkpoint; the version is in every output")
        source = scan or None
        if source is None:  # no DICOM at hand: reconstruct a phantom (a NumPy [1, H, W] batch) written as PNG
            source = str(tmp / "phantom.png")
            venv_python(venv, "import sys; from PIL import Image; from engine.data import phantom_batch; "
                              "Image.fromarray((phantom_batch('ellipses', 1, 64, seed=1)[0] * 255)"
                              ".astype('uint8')).save(sys.argv[1])", source)
        for suffix in (".dcm", ".png"):
            output = tmp / f"reconstruction{suffix}"
            out = run([cli, "reconstruct", "--checkpoint", checkpoints[0], "--input", source, "--output", output],
                      timeout=300, env=env, cwd=bundle)
            check(out.returncode == 0 and output.is_file(), f"equideq reconstruct -> {output.name} "
                                                            f"({out.stderr.strip()[-300:] or 'no message'})")
        saved = venv_python(venv, "import sys, pydicom; from engine.checkpoint.format import load_checkpoint; "
                                  "print(load_checkpoint(sys.argv[1]).software_version); "
                                  "print(pydicom.dcmread(sys.argv[2]).SoftwareVersions)",
                            checkpoints[0], tmp / "reconstruction.dcm").splitlines()
        check(saved == [version, version], f"checkpoint and DICOM carry {version} ({saved})")
        software = png_text(tmp / "reconstruction.png").get("Software", "")
        check(software.endswith(version), f"PNG Software '{software}'")

        print("== 5. the bundle is as it was")
        after = tree_state(bundle)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        check(not changed, f"nothing inside the bundle written or changed {changed[:10]}")

        keep = ROOT / "build" / "smoke-test" / "smoke_test.png"
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, keep)
        return keep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-build", action="store_true", help="test the bundle already in --bundle")
    p.add_argument("--bundle", type=Path, default=ROOT / "dist" / "equideq")
    p.add_argument("--venv", type=Path, default=Path(os.environ.get("BUILD_VENV", ROOT / "build" / "packaging-venv")))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the workbench may take")
    args = p.parse_args()
    started = time.monotonic()
    if not args.no_build:
        print("== building: packaging/build.sh", flush=True)
        if subprocess.run(["bash", str(ROOT / "packaging" / "build.sh")], cwd=ROOT).returncode != 0:
            print("smoke test FAILED: the build failed")
            return 1
    built = time.monotonic()
    try:
        screenshot = smoke_test(args.bundle.resolve(), args.venv.resolve(), args.timeout)
    except (SmokeFailure, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
        print(f"smoke test FAILED: {exc}")
        return 1
    print(f"smoke test passed in {time.monotonic() - started:.0f} s (build {built - started:.0f} s, "
          f"tests {time.monotonic() - built:.0f} s); screenshot {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
