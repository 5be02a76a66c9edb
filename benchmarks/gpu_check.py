#!/usr/bin/env python
"""The Python parts of ``benchmarks/gpu_check.sh``: each runs on the CPU too (``--device cpu``).

    gpu_check.py info  RESULTS                    # torch / CUDA / cuDNN / NCCL, the GPU -> RESULTS/info.json
    gpu_check.py train RESULTS --name NAME --device cuda --size 128 [--steps 6] [--memory-format auto]
                       [--autocast off|bf16] [--compile] [--threads N]
                                                  # a short ct_phantom_quick run at that size -> RESULTS/NAME.json
    gpu_check.py table RESULTS                    # the markdown tables -> RESULTS/results.md (and printed)

``train`` runs ``equideq train`` in this process (so it can read the peak GPU memory afterwards) on the
``ct_phantom_quick`` config at ``--size`` pixels with its angular sampling (views = size / 4), 2
validation images, validation only at the start and end, no checkpoints, and summarises the run
directory (``run_summary.py``): median seconds per step without the first (warm-up: cuDNN
autotuning, the first kernels, compilation), iterations, final residuals and stop reasons of every
training solve, final validation PSNR. Each call is independent: a failure in one leaves the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # noqa: E402
from run_summary import cell, summarise_run  # noqa: E402

#: the names of the CPU runs the device runs of the same size are compared with (gpu_check.sh names them so)
CPU_REFERENCE = "cpu_reference_"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


def _nccl_version():
    import torch

    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # a build without NCCL: say so in the results, do not fail the part
        return f"unavailable ({type(exc).__name__})"


def cmd_info(args) -> int:
    import torch

    info = {"kind": "info", "python": platform.python_version(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_count=torch.cuda.device_count(), device=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gb=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version(),
                    nccl=_nccl_version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
        started = time.perf_counter()
        x = torch.randn(4096, 4096, device="cuda")
        (x @ x).sum().item()
        info["first_matmul_s"] = time.perf_counter() - started
    info["distributed_backends"] = {name: getattr(torch.distributed, f"is_{name}_available", lambda: False)()
                                    for name in ("gloo", "nccl")}
    _write_json(args.results / "info.json", info)
    print(json.dumps(info, indent=2, default=str))
    return 0


def train_overrides(args) -> dict:
    views = args.views or max(8, args.size // 4)  # ct_phantom_quick's 64 px at 16 views
    return {"physics.img_size": args.size, "physics.views": views, "data.n_train": args.n_train, "data.n_val": 2,
            "optim.steps": args.steps, "optim.batch_size": args.batch, "run.validate_every": args.steps,
            "run.checkpoint_every": 0, "run.device": args.device, "run.threads": args.threads,
            "run.memory_format": args.memory_format, "run.autocast": args.autocast,
            "run.compile": "true" if args.compile else "false"}


def cmd_train(args) -> int:
    import torch

    from engine.cli import main as equideq
    from engine.model import resolve_memory_format

    run_dir = args.results / args.name
    overrides = train_overrides(args)
    argv = ["--threads", str(args.threads), "train", "--config", "ct_phantom_quick", "--out", str(run_dir),
            "--overwrite", "--quiet"] + [f"--set={k}={v}" for k, v in overrides.items()]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    code = equideq(argv)
    wall = time.perf_counter() - started
    layout = resolve_memory_format(args.memory_format, args.device)
    result = {"kind": "train", "name": args.name, "exit_code": code, "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if cuda else cpu_model(),
              "size": args.size, "views": overrides["physics.views"], "batch": args.batch,
              "memory_format": layout, "autocast": args.autocast, "compile": args.compile,
              "threads": args.threads, "wall_s": wall,
              "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
              **summarise_run(run_dir)}
    _write_json(args.results / f"{args.name}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds_all"}, default=str))
    return code


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "–"


def tables(runs: list[dict], info: dict) -> str:
    cpu_time = {r["size"]: r["step_seconds"] for r in runs
                if r["name"].startswith(CPU_REFERENCE) and r["step_seconds"]}
    lines = [f"GPU check, {time.strftime('%Y-%m-%d %H:%M')}: "
             f"{info.get('device', 'no CUDA device')}; torch {info.get('torch', '?')} (CUDA {info.get('cuda_build')}, "
             f"cuDNN {info.get('cudnn')}, NCCL {info.get('nccl')}); {info.get('cpu_count', '?')} logical CPU cores",
             "",
             "| run | device | size (views) | memory format | autocast | compile | median s / step | CPU / this "
             "| wall (s) | peak GPU memory (GB) | final validation PSNR (dB) |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        ratio = cpu_time.get(r["size"]) / r["step_seconds"] if cpu_time.get(r["size"]) and r["step_seconds"] else None
        lines.append(f"| {r['name']} | {r['device']} | {r['size']} ({r['views']}) | {r['memory_format']} | "
                     f"{r['autocast']} | {'yes' if r['compile'] else 'no'} | {cell(r['step_seconds'], '.3f')} | "
                     f"{cell(ratio, '.1f')} | {r['wall_s']:.1f} | {cell(r['peak_gpu_gb'], '.2f')} | "
                     f"{cell(r['final_psnr'], '.2f')} |")
    lines += ["", "Training solves (every sample of every step; final residual in the tolerance's mode):", "",
              "| run | forward it. / step | backward it. / step | forward final residual median / max "
              "| backward final residual median / max | forward stop reasons | backward stop reasons |",
              "|---|---:|---:|---|---|---|---|"]
    for r in runs:
        f, b = r["forward_solves"], r["backward_solves"]
        lines.append(f"| {r['name']} | {cell(r['forward_iterations'], 'g')} | {cell(r['backward_iterations'], 'g')} | "
                     f"{cell(f['median_final_residual'], '.2e')} / {cell(f['max_final_residual'], '.2e')} | "
                     f"{cell(b['median_final_residual'], '.2e')} / {cell(b['max_final_residual'], '.2e')} | "
                     f"{_reasons(f['stop_reasons'])} | {_reasons(b['stop_reasons'])} |")
    failed = [r["name"] for r in runs if r["exit_code"] != 0]
    if failed:
        lines += ["", "Runs that did not complete (see their logs): " + ", ".join(failed)]
    return "\n".join(lines)


def cmd_table(args) -> int:
    records = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    info = next((r for r in records if r.get("kind") == "info"), {})
    runs = [r for r in records if r.get("kind") == "train"]
    markdown = tables(runs, info)
    (args.results / "results.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="torch, CUDA, the GPU")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("train", help="a short ct_phantom_quick run, summarised")
    p.add_argument("--name", required=True, help="the run's folder and JSON file name in RESULTS")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--size", type=int, default=128, help="image side (default 128)")
    p.add_argument("--views", type=int, default=0, help="CT views (default size / 4)")
    p.add_argument("--steps", type=int, default=6, help="training steps; the first is not timed (default 6)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-train", type=int, default=16, help="training phantoms (default 16)")
    p.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto")
    p.add_argument("--autocast", choices=("off", "bf16"), default="off")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("table", help="the markdown tables of the runs in RESULTS")
    p.set_defaults(func=cmd_table)
    for p in sub.choices.values():
        p.add_argument("results", type=Path, help="results folder")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
