#!/usr/bin/env python
"""A training step on 1 and 2 processes of one CPU machine (gloo): time per step and what it computes.

The same config and global batch are trained three ways, each a fresh ``equideq train``:

* 1 process, 1 torch thread;
* 1 process, as many threads as the machine has logical cores;
* ``torchrun --standalone --nproc-per-node 2 -m engine.cli train``: 2 processes, cores / 2 threads each
  (``engine/distributed.py``: each rank solves its half of the batch, gradients all-reduced over gloo).

So the thread rows use the whole machine either way: threads inside one process against processes
with a thread each. Reported per row: the median of ``metrics.jsonl``'s per-step ``seconds`` (the first
step left out: warm-up; under torchrun rank 0's, which includes waiting for the other rank in the
all-reduce), the speed-up over 1 process / 1 thread, the wall time of the whole command (imports,
data, alpha balancing and validations included), the final validation PSNR and the median per-step
forward / backward iterations (the largest over the batch; under torchrun over the ranks too). The
PSNRs agree up to float rounding and, with ``loss.ei_apply_noise`` on (the default), EI's noise draw,
which is per shard (``engine/distributed.py``).

    .venv/bin/python benchmarks/distributed_scaling.py                      # ct_phantom_quick, 8 steps
    .venv/bin/python benchmarks/distributed_scaling.py --steps 12 --batch 8 --out runs/scaling
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402
from run_summary import cell, summarise_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def layouts(cores: int) -> list[tuple[int, int]]:
    """(processes, threads each) to compare: 1 x 1, 1 x cores and 2 x cores/2."""
    rows = [(1, 1)]
    if cores > 1:
        rows.append((1, cores))
    rows.append((2, max(1, cores // 2)))
    return rows


def train_command(processes: int, threads: int, args, run_dir: Path) -> list[str]:
    overrides = {"optim.steps": args.steps, "run.threads": threads, "run.validate_every": args.steps,
                 "run.checkpoint_every": 0, "run.device": "cpu"}
    if args.batch:
        overrides["optim.batch_size"] = args.batch
    train = ["-m", "engine.cli", "--threads", str(threads), "train", "--config", args.config, "--out", str(run_dir),
             "--overwrite", "--quiet"] + [f"--set={k}={v}" for k, v in overrides.items()]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *train]


def measure(processes: int, threads: int, args) -> dict:
    run_dir = args.out / f"p{processes}_t{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(train_command(processes, threads, args, run_dir), cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) x {threads} thread(s) failed ({done.returncode}):\n"
                           f"{done.stderr.strip()[-3000:]}")
    return {"processes": processes, "threads": threads, "wall_s": wall, **summarise_run(run_dir)}


def table(rows: list[dict]) -> str:
    base = rows[0]["step_seconds"]
    lines = ["| processes | threads each | median s / step | speed-up | run wall time (s) | final validation PSNR (dB) "
             "| forward / backward iterations per step |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speedup = base / r["step_seconds"] if base and r["step_seconds"] else None
        lines.append(f"| {r['processes']} | {r['threads']} | {cell(r['step_seconds'], '.2f')} | "
                     f"{cell(speedup, '.2f')}x | {r['wall_s']:.1f} | {cell(r['final_psnr'], '.2f')} | "
                     f"{cell(r['forward_iterations'], 'g')} / {cell(r['backward_iterations'], 'g')} |")
    return "\n".join(lines)


def machine(cores: int) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"CPU: {cpu_model()}; logical cores: {cores}; load average: {load}; python {platform.python_version()}, "
            f"torch {version('torch')}, deepinv {version('deepinv')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ct_phantom_quick", help="config file or built-in name")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="logical cores to fill (default: this machine's)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/distributed_scaling-<timestamp>)")
    args = parser.parse_args(argv)
    args.out = args.out or REPO / "runs" / f"distributed_scaling-{datetime.now():%Y%m%d-%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)

    print(machine(args.cores), flush=True)
    rows = []
    for processes, threads in layouts(args.cores):
        row = measure(processes, threads, args)
        print(f"{processes} process(es) x {threads} thread(s): {cell(row['step_seconds'], '.2f')} s/step, "
              f"wall {row['wall_s']:.1f} s, PSNR {cell(row['final_psnr'], '.2f')} dB", flush=True)
        rows.append(row)
    print()
    print(f"{datetime.now():%Y-%m-%d}, `{args.config}`, {args.steps} steps, global batch "
          f"{args.batch or 'of the config'}; at the end: {machine(args.cores)}")
    print(table(rows))
    print(f"\nrun directories in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
