"""Command-line and output plumbing shared by the training benchmarks (``reproduce.py``, ``alpha_sweep.py``).

Both take the same ``--init``, ``--threads``, ``--device`` and ``--out`` options,
resolve them the same way (``auto`` -> CUDA when available; the output folder
``runs/<name>-<timestamp>`` by default), start the same way (engine threads
set, output folder created, clock started) and write the same two files:
``results.json`` (rewritten after every unit of work, with the elapsed time in
``meta.total_seconds``) and ``results.md`` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from engine.atomic import atomic_write_text
from engine.trainer import configure_threads


def add_run_options(parser: argparse.ArgumentParser, name: str, init_help: str) -> None:
    """``--init``, ``--threads``, ``--device`` and ``--out`` (default ``runs/<name>-<timestamp>``)."""
    parser.add_argument("--init", choices=("shipped", "random"), default="shipped", help=init_help)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = engine default: cores - 1)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="(default cpu)")
    parser.add_argument("--out", type=Path, help=f"output folder (default runs/{name}-<timestamp>)")


def parse_run_args(parser: argparse.ArgumentParser, argv, name: str) -> argparse.Namespace:
    """Parse ``argv``: ``--device auto`` -> ``cuda`` when available, else ``cpu``; no ``--out`` ->
    ``runs/<name>-<timestamp>``."""
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        args.out = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    return args


def start_run(args: argparse.Namespace) -> float:
    """Set the engine's threads, create the output folder; the start time (``time.perf_counter()``)."""
    configure_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return time.perf_counter()


def run_meta(args: argparse.Namespace, argv, **fields) -> dict:
    """``meta`` of ``results.json``: start time, command line, arguments, ``fields`` (machine...), elapsed time."""
    return {"started": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **fields, "total_seconds": 0.0}


def save_results(out: Path, data: dict, started: float) -> None:
    """Rewrite ``out/results.json`` (atomically) with the seconds elapsed since ``started``."""
    data["meta"]["total_seconds"] = time.perf_counter() - started
    atomic_write_text(out / "results.json", json.dumps(data, indent=2, default=str))


def finish_results(out: Path, data: dict, started: float, markdown: str) -> None:
    """Save ``results.json`` a last time, write ``markdown`` to ``out/results.md`` and print it."""
    save_results(out, data, started)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    print("\n" + markdown, flush=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({data['meta']['total_seconds']:.0f} s)", flush=True)
