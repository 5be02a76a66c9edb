#!/usr/bin/env bash
# Fetch, here, the wheels a stock PyTorch GPU image lacks for benchmarks/gpu_check.sh, into .whl/
# (git-ignored), so that a GPU machine with no network can install them from the carried folder:
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12 (the lent H200 image's python3)
#
# The engine's pure-Python dependencies that such an image does not hold (deepinv and natsort, pydicom,
# tomli-w, platformdirs), at the versions this checkout's .venv runs (else the newest). torch, numpy,
# h5py, pillow, pyyaml, safetensors, einops, torchmetrics, matplotlib come with the image. gpu_check.sh
# installs .whl/*.whl into a temporary folder by itself when deepinv does not import.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
NAMES=(deepinv natsort pydicom tomli-w platformdirs)

specs=()
for name in "${NAMES[@]}"; do
    version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
    specs+=("$name${version:+==$version}")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${specs[@]}"
echo "wheels for Python $PYVER in .whl/ (${specs[*]}):"
ls -l .whl
du -sh .whl
