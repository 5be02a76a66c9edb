#!/usr/bin/env python
"""Reconstructing one slice at 128, 256 and 512 px: operator build time, solve time and peak memory.

For each size and modality, with the shipped default weights (the ``ct_head``
and ``mri_brain`` configs' denoisers, ``resources/weights/``):

* **CT**, 60 views (``physics.views = 60``): building the operator
  (:class:`engine.physics.SparseTomography`: deepinv's Radon grids, the exact
  CSR matrix and its transpose, the power-iteration normalisation) and one DEQ
  solve of one slice, reported separately;
* **MRI**, 4x (``mri_brain``'s mask at that size): the same two numbers (the
  MRI operator is an FFT and a mask, so its build is instant).

The slice is the middle slice of a real scan when it is installed (the head CT
``Cranium.inv3`` / Colin27 ``ch2.nii.gz``, resampled to the size), else a
Shepp-Logan phantom; measurements are simulated from it (seeded), as
``equideq reconstruct`` does. The model is ``LoadedModel.at_size(size)``: the
same network, the operator built for that size.

Each (modality, size) runs ``--repeats`` times, every time in a fresh process,
so the build is never a cache hit, and the peak resident memory (Linux's VmHWM,
reset once the network is loaded and the slice prepared) is that of building the
operator and solving, on top of the process's imports and network. Reported: medians of the build, of the first
solve (which includes measuring the data step's Lipschitz constant for a new
size, cached afterwards) and of a second solve, the solver iterations, and the
largest peak RSS (and the RSS after imports and the network, which every process pays).

Time to window (how long the workbench takes to show its window) belongs to
the GUI and is not measured here yet: :func:`time_to_window` is the place for it
and the table prints "not measured" until it returns a number.

    .venv/bin/python benchmarks/scale.py                      # 128, 256, 512; CT and MRI; 3 repeats
    .venv/bin/python benchmarks/scale.py --sizes 128,256 --repeats 1 --only ct
    .venv/bin/python benchmarks/scale.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: modality -> (built-in config, overrides, real scan locator in engine.data, what the slice is)
TASKS = {
    "ct": ("ct_head", {"physics.views": 60}, "invesalius_head_ct_path", "60-view parallel-beam CT"),
    "mri": ("mri_brain", {}, "colin27_t1_path", "4x Cartesian MRI"),
}


def _peak_rss_gb() -> float:
    """Peak resident memory of this process since the last :func:`_reset_peak_rss`, GB.

    Linux's VmHWM (resettable); elsewhere ``ru_maxrss``, the peak of the whole process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure_one(modality: str, size: int, device: str, threads: int) -> dict:
    """Build the operator and solve one slice at ``size`` in this process; the numbers as a dict."""
    import torch

    import engine.data as data
    from engine.config import builtin_config
    from engine.inference import model_from_config
    from engine.trainer import configure_threads

    configure_threads(threads)
    config_name, overrides, locate, _ = TASKS[modality]
    config = builtin_config(config_name).replace(**overrides)
    # the network and its weights, with a tiny operator, so that at_size builds the measured one at every size
    base = model_from_config(config.replace(**{"physics.img_size": 16}), device)
    after_imports = _peak_rss_gb()

    path = getattr(data, locate)()
    if path is not None:
        # the volume is prepared whole (MRI is scaled per volume), then only the slice is kept: the peak
        # memory below is the reconstruction's, not the prepared stack's
        slices = data.prepare_slices(data.load_scan(path), size, window=list(config.data.window) or None)
        image, source = slices[len(slices) // 2][None].copy(), path.name
        del slices
    else:
        image, source = data.phantom_batch("shepp_logan", 1, size, seed=0), "Shepp-Logan phantom"

    _reset_peak_rss()  # from here on: the operator and the solves
    started = time.perf_counter()
    model = base.at_size(size)
    build = time.perf_counter() - started
    timings, results = [], []
    for _ in range(2):  # the first solve measures the data step's Lipschitz constant for this size
        started = time.perf_counter()
        result = model.reconstruct(image)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        results.append(result)
    stats = results[-1].forward_stats
    iterations = int(torch.as_tensor(stats.iterations).max()) if stats is not None else None
    return {"modality": modality, "size": size, "source": source, "build_s": build, "first_solve_s": timings[0],
            "solve_s": timings[1], "iterations": iterations, "psnr": float(results[-1].psnr[0]),
            "baseline_psnr": float(results[-1].baseline_psnr[0]), "peak_rss_gb": _peak_rss_gb(),
            "rss_after_imports_gb": after_imports,
            "cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def run_fresh(modality: str, size: int, device: str, threads: int) -> dict:
    """:func:`measure_one` in a new Python process (cold caches, its own peak memory)."""
    command = [sys.executable, __file__, "--one", f"{modality}:{size}", "--device", device, "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{modality} at {size} px failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_to_window(runs: int = 3) -> Optional[tuple[float, float]]:
    """Median seconds from starting ``equideq-workbench`` to (its window painted, the engine loaded).

    Measured by :func:`workbench.startup.measure_time_to_window` in fresh processes (offscreen
    when there is no display); None when the workbench cannot start here (no Qt).
    """
    try:
        from workbench.startup import measure_time_to_window

        env = None if os.environ.get("DISPLAY") else {"QT_QPA_PLATFORM": "offscreen"}
        timings = measure_time_to_window(runs, env=env)
    except (ImportError, RuntimeError) as exc:
        print(f"time to window not measured: {exc}", file=sys.stderr)
        return None
    return (statistics.median(t.window_s for t in timings), statistics.median(t.engine_s for t in timings))


def _median(runs: list, key: str) -> Optional[float]:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _cell(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list, device: str) -> str:
    memory = "peak GPU memory (GB)" if device == "cuda" else "peak RSS (GB)"
    lines = [f"| modality | size | operator build (s) | first solve (s) | solve again (s) | iterations "
             f"| {memory} | PSNR / baseline (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for runs in rows:
        first = runs[0]
        peak = max(r["cuda_peak_gb"] if device == "cuda" else r["peak_rss_gb"] for r in runs)
        lines.append(f"| {TASKS[first['modality']][3]} | {first['size']} | {_cell(_median(runs, 'build_s'), '.2f')} "
                     f"| {_cell(_median(runs, 'first_solve_s'), '.2f')} | {_cell(_median(runs, 'solve_s'), '.2f')} "
                     f"| {first['iterations']} | {peak:.2f} | {first['psnr']:.2f} / {first['baseline_psnr']:.2f} |")
    base = statistics.median(r["rss_after_imports_gb"] for runs in rows for r in runs)
    window = time_to_window()
    lines += ["", f"Peak RSS: the whole process while it builds the operator and solves, of which ~{base:.2f} GB "
                  "are Python, torch, deepinv and the network before either.",
              "Time to window (workbench, median of 3 fresh starts): " + (
                  "not measured (no Qt here)" if window is None
                  else f"{window[0]:.2f} s to the painted window, {window[1]:.2f} s until the engine is loaded "
                       "behind it.")]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,256,512", help="comma-separated image sides (default 128,256,512)")
    parser.add_argument("--only", choices=tuple(TASKS), help="one modality (default both)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (modality, size); medians")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = engine default: cores - 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "ct:512": measure in this process, print JSON
    args = parser.parse_args(argv)
    if args.one:
        modality, size = args.one.split(":")
        print(json.dumps(measure_one(modality, int(size), args.device, args.threads)))
        return 0

    from reproduce import machine_description

    from engine.trainer import configure_threads

    configure_threads(args.threads)  # as every measuring process does, so the description says what they use
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    print(machine_description(args.threads), flush=True)
    for modality in ([args.only] if args.only else list(TASKS)):
        for size in sizes:
            runs = [run_fresh(modality, size, args.device, args.threads) for _ in range(max(1, args.repeats))]
            r = runs[-1]
            print(f"{modality} {size}: build {_median(runs, 'build_s'):.2f} s, solve {_median(runs, 'first_solve_s'):.2f}"
                  f" / {_median(runs, 'solve_s'):.2f} s, peak RSS {max(x['peak_rss_gb'] for x in runs):.2f} GB "
                  f"(after imports {r['rss_after_imports_gb']:.2f}); slice of {r['source']}", flush=True)
            rows.append(runs)
    print()
    print(f"{time.strftime('%Y-%m-%d')}, {args.repeats} fresh process(es) each, medians; device {args.device}")
    print(table(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
