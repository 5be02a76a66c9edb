#!/usr/bin/env bash
# Build the one-folder desktop bundle dist/equideq/ (executables equideq-workbench and equideq),
# from a clean checkout, in one command:
#
#     packaging/build.sh
#
# It makes (or reuses) a build virtual environment, installs the project into it (not editable: the
# bundle takes the installed distribution's metadata, so its version is pyproject.toml's), runs
# PyInstaller on packaging/equideq.spec and prints the bundle's size, its biggest parts and what was
# left out. Takes ~12 minutes on 2 cores from a clean checkout (most of it pip fetching the CUDA wheels), a
# rebuild 2.5-5 minutes (PyInstaller analysing torch).
#
# Environment:
#   PYTHON          interpreter for the build venv (default python3; 3.11 or newer)
#   BUILD_VENV      the build venv (default build/packaging-venv; reused when present)
#   TORCH_VARIANT   pypi (default): torch and torchvision from PyPI as pinned in constraints-pypi.txt,
#                   on Linux the CUDA build (runs on CPU and NVIDIA GPUs; ~3.5 GB of NVIDIA libraries);
#                   cpu: the CPU-only build of the same release (constraints-cpu.txt) from TORCH_CPU_INDEX
#   TORCH_CPU_INDEX default https://download.pytorch.org/whl/cpu
#   DIST_DIR        where the bundle goes (default dist)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
BUILD_VENV=${BUILD_VENV:-build/packaging-venv}
TORCH_VARIANT=${TORCH_VARIANT:-pypi}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
DIST_DIR=${DIST_DIR:-dist}
started=$(date +%s)

if [ ! -x "$BUILD_VENV/bin/python" ]; then
    echo "== creating the build venv $BUILD_VENV"
    "$PYTHON" -m venv "$BUILD_VENV"
    "$BUILD_VENV/bin/python" -m pip install -q --upgrade pip
fi
PY=$BUILD_VENV/bin/python

echo "== installing the project and PyInstaller (torch: $TORCH_VARIANT)"
case "$TORCH_VARIANT" in
    pypi) pip_args=(-q -c packaging/constraints-pypi.txt) ;;
    cpu)  # asked once up front: pip would retry an unreachable index for every package it resolves
          if ! "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" \
                  "$TORCH_CPU_INDEX/torchvision/" 2>/dev/null; then
              echo "TORCH_VARIANT=cpu needs PyTorch's CPU builds of torch and torchvision, and" \
                   "$TORCH_CPU_INDEX is not reachable (set TORCH_CPU_INDEX to a mirror)" >&2
              exit 2
          fi
          pip_args=(-q -c packaging/constraints-cpu.txt --extra-index-url "$TORCH_CPU_INDEX") ;;
    *)    echo "TORCH_VARIANT must be pypi or cpu, not '$TORCH_VARIANT'" >&2; exit 2 ;;
esac
# nifti and jpeg: the optional scan readers (NIfTI, compressed DICOM) belong in a desktop build
# (pip reinstalls a local project every time, so the metadata always has pyproject.toml's version)
"$PY" -m pip install "${pip_args[@]}" ".[packaging,nifti,jpeg]"

echo "== PyInstaller"
rm -rf "$DIST_DIR/equideq"
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --distpath "$DIST_DIR" --workpath build/pyinstaller \
    packaging/equideq.spec
if [ "$(uname -s)" = Linux ]; then  # the bundle installs itself: ./install.sh (packaging/README.md)
    cp packaging/linux/install.sh packaging/linux/equideq-workbench.desktop "$DIST_DIR/equideq/"
fi

"$PY" packaging/bundle_report.py "$DIST_DIR/equideq"
echo "== built $DIST_DIR/equideq in $(( $(date +%s) - started )) s"
