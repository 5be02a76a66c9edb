"""A finished run directory in a few numbers (shared by ``distributed_scaling.py`` and ``gpu_check.py``).

Reads only the run's record (``metrics.jsonl``, ``solves.jsonl``: ``engine/run_record.py``), so it
summarises runs made by any process, distributed or not, on any device. No torch.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Optional

from engine.outputs import METRICS_FILE, SOLVES_FILE
from engine.run_record import read_records


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def final_residuals(solve: dict) -> list[float]:
    """Each sample's last residual of a ``solves.jsonl`` line, in the mode its tolerance is tested in."""
    trace = solve["rel_residuals"] if solve.get("tolerance_mode") == "rel" else solve["abs_residuals"]
    last: list = [None] * (len(trace[0]) if trace else 0)
    for row in trace:  # null once a sample stopped: its last number is where it stopped
        last = [v if v is not None else old for v, old in zip(row, last)]
    return [float(v) for v in last if v is not None]


def summarise_run(run_dir: Path) -> dict:
    """Per-step time (median, the first step left out: warm-up), iterations, final validation, solve statistics."""
    metrics = read_records(Path(run_dir) / METRICS_FILE)
    steps = [r for r in metrics if "step" in r]
    validations = [r["validation"] for r in metrics if "validation" in r]
    seconds = [r["seconds"] for r in steps]
    summary = {
        "steps": len(steps),
        "step_seconds": _median(seconds[1:] or seconds),
        "step_seconds_all": seconds,
        "forward_iterations": _median([r.get("forward_iterations") for r in steps]),
        "backward_iterations": _median([r.get("backward_iterations") for r in steps]),
        "final_psnr": validations[-1]["psnr"] if validations else None,
        "final_ssim": validations[-1]["ssim"] if validations else None,
        "validation_step": validations[-1]["step"] if validations else None,
    }
    solves = read_records(Path(run_dir) / SOLVES_FILE)
    for direction in ("forward", "backward"):
        mine = [s for s in solves if s.get("direction") == direction]
        residuals = [r for s in mine for r in final_residuals(s)]
        summary[f"{direction}_solves"] = {
            "solves": len(mine),
            "median_iterations": _median([i for s in mine for i in s["iterations"]]),
            "median_final_residual": _median(residuals),
            "max_final_residual": max(residuals) if residuals else None,
            "stop_reasons": dict(Counter(r for s in mine for r in s["stop_reasons"])),
        }
    return summary


def cell(value, spec: str) -> str:
    """``value`` formatted for a markdown table, ``–`` when missing."""
    return "–" if value is None else format(value, spec)
