#!/usr/bin/env bash
# The one prepared check to run when a GPU machine is lent (the project never needs one):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: runs/gpu_check-<timestamp>
#
# 1. the machine: nvidia-smi, torch / CUDA / cuDNN / NCCL (benchmarks/gpu_check.py info)
# 2. the tests that skip without CUDA (the test files that ask torch.cuda.is_available, tests named *cuda*)
# 3. training steps of ct_phantom_quick at 128x128 and 320x320 on the GPU and on the CPU (all cores)
# 4. bf16 autocast on/off and channels_last vs contiguous (auto) on the GPU at 320x320, with their solve statistics
# 5. a 1-process torchrun on the GPU (NCCL process group set-up and teardown), torch.compile at 128x128
# then results.md: the markdown tables (benchmarks/gpu_check.py table), printed at the end, and bundle.tar.gz:
# the results folder without checkpoints and snapshots (logs, JSON summaries, metrics.jsonl, solves.jsonl).
#
# Every part is independent and time-limited (`timeout`); a failed part is reported and the next one runs.
# Parts that would start with less than ~20 s of the budget left are skipped, so the whole check ends
# within GPU_CHECK_BUDGET_S (default 510 s, ~8.5 min, CUDA start-up included).
#
# Environment: GPU_CHECK_DEVICE=cpu runs the "GPU" parts on the CPU (to check this script's plumbing
# where there is no GPU); GPU_CHECK_QUICK=1 uses tiny sizes (32 and 48 px) and 2-3 steps;
# GPU_CHECK_THREADS (default: all cores) for the CPU runs; PYTHON (default: .venv/bin/python when it
# imports torch, else python3). The repository is put on PYTHONPATH; torch must be installed, and deepinv
# too unless .whl/ holds the wheels benchmarks/gpu_wheels.sh fetched (installed into a temporary folder).
set -u

cd "$(dirname "$0")/.." || exit 1
RESULTS=${1:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-510}
THREADS=${GPU_CHECK_THREADS:-$(nproc)}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
# an image without deepinv & co.: install the wheels carried in .whl/ (benchmarks/gpu_wheels.sh) beside its
# python, in a temporary folder, not into it
if [[ -d .whl ]] && ! "$PYTHON" -c "import deepinv" 2>/dev/null; then
    WHEEL_SITE=${TMPDIR:-/tmp}/equideq-gpu-check-site
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WHEEL_SITE" .whl/*.whl; then
        export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed $(ls .whl | wc -l) wheels from .whl into $WHEEL_SITE"
    else
        echo "wheels from .whl: not installed (the imports part will say what is missing)"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 QT_QPA_PLATFORM=offscreen
mkdir -p "$RESULTS/logs" || exit 1
SUMMARY="$RESULTS/parts.txt"
: >"$SUMMARY"
START=$SECONDS

if [[ $QUICK == 1 ]]; then SMALL=32 LARGE=48 DEVICE_STEPS=3 CPU_STEPS=2
else SMALL=128 LARGE=320 DEVICE_STEPS=6 CPU_STEPS=3; fi

# part NAME LIMIT_S COMMAND...: run COMMAND with its output in logs/NAME.log, at most LIMIT_S seconds
# (less when the budget is nearly spent), and record its exit code and time in parts.txt
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        echo "$name: skipped ($left s of the budget left)" | tee -a "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most $limit s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1
    local code=$?
    local status="ok"
    ((code == 124 || code == 137)) && status="timed out after $limit s"
    ((code != 0 && code != 124 && code != 137)) && status="failed (exit $code)"
    echo "$name: $status, $((SECONDS - began)) s" | tee -a "$SUMMARY"
    ((code != 0)) && tail -n 15 "$RESULTS/logs/$name.log" | sed 's/^/    /'
}

train() {  # train NAME LIMIT_S --device D --size N --steps K [more gpu_check.py train options]
    local name=$1 limit=$2
    shift 2
    part "$name" "$limit" "$PYTHON" benchmarks/gpu_check.py train "$RESULTS" --name "$name" --threads "$THREADS" "$@"
}

echo "results in $RESULTS; device $DEVICE; sizes $SMALL and $LARGE; python $PYTHON; budget $BUDGET_S s"

# 1. the machine
if command -v nvidia-smi >/dev/null; then
    part nvidia-smi 30 nvidia-smi
    cat "$RESULTS/logs/nvidia-smi.log"
else
    echo "nvidia-smi: not found" | tee -a "$SUMMARY"
fi
part imports 60 "$PYTHON" -c \
    "import torch, deepinv, engine.trainer; print('torch', torch.__version__, 'deepinv', deepinv.__version__)"
part info 60 "$PYTHON" benchmarks/gpu_check.py info "$RESULTS"

# 2. the CUDA tests (they skip where there is no CUDA device)
mapfile -t CUDA_TESTS < <(grep -l "cuda.is_available" tests/test_*.py)
part cuda_tests 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -k cuda \
    "${CUDA_TESTS[@]}"
grep -E "passed|failed|skipped|error" "$RESULTS/logs/cuda_tests.log" | tail -n 5 | sed 's/^/    /'

# 3.-4. training steps: the device at both sizes, its variants at the larger, then the CPU references
train "${DEVICE}_$SMALL" 90 --device "$DEVICE" --size "$SMALL" --steps "$DEVICE_STEPS"
train "${DEVICE}_$LARGE" 90 --device "$DEVICE" --size "$LARGE" --steps "$DEVICE_STEPS"
train "${DEVICE}_${LARGE}_bf16" 90 --device "$DEVICE" --size "$LARGE" --steps "$DEVICE_STEPS" --autocast bf16
# the layout run.memory_format = "auto" does not pick on this device (auto: contiguous on CUDA, channels_last on CPU)
OTHER_LAYOUT=channels_last
[[ $DEVICE == cpu ]] && OTHER_LAYOUT=contiguous
train "${DEVICE}_${LARGE}_$OTHER_LAYOUT" 90 --device "$DEVICE" --size "$LARGE" --steps "$DEVICE_STEPS" \
    --memory-format "$OTHER_LAYOUT"
train "cpu_reference_$SMALL" 120 --device cpu --size "$SMALL" --steps "$CPU_STEPS"

# 5. a 1-process torchrun (world size 1: the process group's set-up and teardown on NCCL; 2 ranks need 2 GPUs)
"$PYTHON" - "$RESULTS/tiny.toml" "$DEVICE" <<'EOF' || echo "tiny config: not written"
import sys
from engine.config import builtin_config, save_config
save_config(builtin_config("ct_phantom_quick").replace(**{
    "physics.img_size": 32, "physics.views": 8, "data.n_train": 8, "data.n_val": 2, "optim.steps": 2,
    "run.validate_every": 2, "run.checkpoint_every": 1, "run.device": sys.argv[2]}), sys.argv[1])
EOF
part torchrun_1_process 90 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m engine.cli train \
    --config "$RESULTS/tiny.toml" --out "$RESULTS/torchrun_1_process" --overwrite --quiet

train "cpu_reference_$LARGE" 240 --device cpu --size "$LARGE" --steps "$CPU_STEPS"
train "${DEVICE}_${SMALL}_compile" 150 --device "$DEVICE" --size "$SMALL" --steps "$DEVICE_STEPS" --compile

# the tables, whatever the budget says: they only read the results (about a second)
timeout 60 "$PYTHON" benchmarks/gpu_check.py table "$RESULTS" >"$RESULTS/logs/table.log" 2>&1 ||
    echo "table: failed (exit $?)" | tee -a "$SUMMARY"
# everything but checkpoints and snapshots in one file, for a machine that returns only a few files
tar czf "$RESULTS/bundle.tar.gz" -C "$RESULTS" --exclude='*.pt' --exclude='*.npz' --exclude=bundle.tar.gz . ||
    echo "bundle.tar.gz: not written"
echo
cat "$RESULTS/results.md" 2>/dev/null || echo "no results.md (see $RESULTS/logs/table.log)"
echo
echo "parts:"
cat "$SUMMARY"
echo "total $((SECONDS - START)) s; everything is in $RESULTS"
