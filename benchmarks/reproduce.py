#!/usr/bin/env python
r"""Reproduce the paper's comparison at small scale, against TV: supervised vs EI (implicit / JFB) DEQs
and an unrolled network, on the real head CT and the Colin27 MRI.

For each task, in one process, on the same data and budget (same steps, batch,
learning rate, seed and *identical initial denoiser weights*, written once to
``<out>/<task>/init_denoiser.pt`` and passed to every run as ``model.weights``),
it trains

* **Supervised DEQ (implicit)**  ``loss.mode = supervised``, ``deq.gradient = implicit``
* **EI DEQ (implicit)**          ``loss.mode = ei``,         ``deq.gradient = implicit``
* **EI DEQ (JFB)**               ``loss.mode = ei``,         ``deq.gradient = jfb``
* **EI unrolled network**        ``loss.mode = ei``,         ``deq.gradient = unrolled``: the same
  denoiser, ``deq.unrolled_iterations`` iterations of the same map, trained and tested as that network
* (``--budget long`` also) **MC-only DEQ (implicit)** and, for CT, an EI DEQ trained on phantoms

and reports, on the held-out test slices (measurements simulated with a fixed
seed, identical for every method):

* ``A^dagger y`` (FBP for CT, zero-filled for MRI);
* **TV** (:mod:`engine.tv`: deepinv ``PGD`` + ``TVPrior``), its ``lambda`` chosen
  on :data:`TV_TUNING_SLICES` evenly spaced *training* slices, never on test slices;
* the untrained DEQ (the shared initial weights), so that what training adds shows;
* every trained model: PSNR, SSIM, the equivariance error
  ``mean ||f(A T_g x) - T_g f(A x)||^2 / ||T_g f(A x)||^2`` over 4 rotations, the
  spectral radius of ``dF/dx`` at the test fixed points of the first
  :data:`RADIUS_IMAGES` test images (below 1: the iteration converges there), the
  training time (sum of the optimisation steps' own times) and the fraction of
  per-sample fixed-point solves that converged (forward and backward in training,
  forward at test; JFB has no backward solve, an unrolled network no solve at all).

The EI weight alpha is the task config's (``ct_head``: ``"auto"``); when it is
``"auto"`` it is balanced once, on EI-implicit's first batch, and the *same*
alpha is then given to EI-JFB and the unrolled network (so they differ from
EI-implicit only in how gradients cross the solve).

Tasks:

``ct``   sparse-view CT (30 views, Gaussian noise 0.01) on the real head CT
         ``Cranium.inv3`` (Debian ``invesalius-examples``), config ``ct_head``:
         train slices 0:80, test slices 80:108 (never trained on); every CT model is
         also evaluated on pydicom's bundled real slice ``CT_small.dcm``.
``mri``  4x accelerated single-coil MRI on Colin27 T1 slices (Debian
         ``mricron-data``), config ``mri_brain``: train 60:130, test 130:150.

Budgets (``--budget``; ``--size``, ``--steps``, ``--batch`` override any):

``default``  128x128, :data:`BUDGETS` ``["default"]`` steps per run, the shipped
             configs' denoisers (pretrained weights from ``resources/weights/``);
             under ~30 minutes on a 2-core CPU at 2 threads. The README's tables.
``long``     for a GPU: many more steps, the MC-only and phantom runs too.
``quick``    a few minutes at 64x64 (a smoke test of the script).

Writes ``<out>/results.json`` (after every run, so an interrupted run keeps what
finished) and ``<out>/results.md``. A task whose data file is absent is skipped
with a message.

Usage::

    .venv/bin/python benchmarks/reproduce.py --threads 2                      # both tasks, the README's tables
    .venv/bin/python benchmarks/reproduce.py --budget quick                   # a few minutes
    .venv/bin/python benchmarks/reproduce.py --budget long --device cuda      # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine import __version__
from engine.config import ExperimentConfig, builtin_config
from engine.data import (colin27_t1_path, invesalius_head_ct_path, load_scan, prepare_slices, pydicom_test_file,
                         slice_range)
from engine.errors import EquiDEQError
from engine.events import Observers, RunFailed, SolveFinished
from engine.evaluation import score
from engine.inference import LoadedModel, load_model, model_from_config
from engine.metrics import default_angles
from engine.model import build_model
from engine.physics import image_channels
from engine.solver_names import CONVERGED
from engine.trainer import Trainer
from engine.tv import TV_LAMBDAS, tune_tv_lambda, tv_reconstruct
from run_options import add_run_options, finish_results, parse_run_args, run_meta, save_results, start_run

#: the paper's headline numbers, quoted for context only
PAPER_HEADLINE = ("Paper: EI-trained DEQs come within 1.3 dB of supervised training, and implicit "
                  "differentiation beats Jacobian-free backprop (4x MRI: 31.34 dB implicit vs 29.39 dB JFB).")

#: our targets (checked from the measured numbers, never assumed)
TARGET_OVER_TV_DB = 1.0
TARGET_MRI_OVER_ZERO_FILLED_DB = 4.0
TARGET_MRI_EI_GAP_DB = 1.0
TARGET_MRI_IMPLICIT_OVER_JFB_DB = 0.5
TARGET_CT_TRAINING_GAIN_DB = 1.0
TARGET_CONVERGED = 0.99

#: training slices TV's lambda is tuned on, and test images the spectral radius is measured at
TV_TUNING_SLICES = 4
RADIUS_IMAGES = 4
#: test images the equivariance error is measured on (a reconstruction per rotation each)
EQUIVARIANCE_IMAGES = 8

#: (key, label, config overrides, budgets that run it)
METHODS = [
    ("supervised", "Supervised DEQ (implicit)", {"loss.mode": "supervised", "deq.gradient": "implicit"}),
    ("ei_implicit", "EI DEQ (implicit)", {"loss.mode": "ei", "deq.gradient": "implicit"}),
    ("ei_jfb", "EI DEQ (JFB)", {"loss.mode": "ei", "deq.gradient": "jfb"}),
    ("unrolled", "EI unrolled network", {"loss.mode": "ei", "deq.gradient": "unrolled"}),
    ("mc", "MC-only DEQ (implicit)", {"loss.mode": "mc", "deq.gradient": "implicit"}),
]
METHOD_LABELS = {key: label for key, label, _ in METHODS} | {"phantom": "EI DEQ (implicit), trained on phantoms"}
DEQ_KEYS = ("supervised", "ei_implicit", "ei_jfb", "mc", "phantom")  # fixed-point models (not unrolled)

#: what each budget runs
BUDGETS = {
    "quick": dict(size=64, steps=10, methods=("supervised", "ei_implicit", "ei_jfb", "unrolled"), phantom=False,
                  tv_lambdas=(1e-3, 1e-2), note="smoke test"),
    "default": dict(size=128, steps=30, methods=("supervised", "ei_implicit", "ei_jfb", "unrolled"), phantom=False,
                    tv_lambdas=TV_LAMBDAS, note="a 2-core CPU in under ~30 minutes"),
    "long": dict(size=128, steps=2000, methods=tuple(m[0] for m in METHODS), phantom=True,
                 tv_lambdas=TV_LAMBDAS, note="a GPU"),
}

#: task -> config name, data finder, package hint, train / test slices (full, quick), description
TASKS = {
    "ct": dict(config="ct_head", find=invesalius_head_ct_path, package="invesalius-examples",
               train="0:80", test="80:108", quick_test="80:88",
               title="Sparse-view CT on the real head CT (Cranium.inv3)"),
    "mri": dict(config="mri_brain", find=colin27_t1_path, package="mricron-data",
                train="60:130", test="130:150", quick_test="130:136",
                title="4x accelerated MRI on Colin27 T1 slices"),
}


def say(message: str) -> None:
    print(message, flush=True)


# -- shared helpers (also used by alpha_sweep.py) ------------------------------------------------

def machine_description(threads: int) -> str:
    from machine import cpu_model

    cpu = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    gpu = f"; CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"CPU: {cpu}; logical cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()} "
            f"(--threads {threads}); load average at start: {', '.join(f'{v:.2f}' for v in load) or '?'}"
            f"{gpu}; python {platform.python_version()}, torch {torch.__version__}, equideq {__version__}")


class SolveCounter:
    """Counts per-sample fixed-point solves and how many converged, by direction.

    Feed it the trainer's ``SolveFinished`` events (as an observer) or a model's
    ``on_solve(direction, SolveStats)`` callback (:meth:`on_solve`). An unrolled
    network's "solves" (fixed iteration counts) are not counted.
    """

    def __init__(self) -> None:
        self.samples: dict[str, int] = {}
        self.converged: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, direction: str, stop_reasons, solver: str = "") -> None:
        if solver == "unrolled":
            return
        reasons = list(stop_reasons)
        self.calls[direction] = self.calls.get(direction, 0) + 1
        self.samples[direction] = self.samples.get(direction, 0) + len(reasons)
        self.converged[direction] = self.converged.get(direction, 0) + sum(r == CONVERGED for r in reasons)

    def __call__(self, event) -> None:  # observer
        if isinstance(event, SolveFinished):
            self.add(event.direction, event.stop_reasons, event.solver)

    def on_solve(self, direction: str, stats) -> None:  # DEQReconstructor.on_solve
        self.add(direction, stats.stop_reasons, stats.solver)

    def fraction(self, direction: str) -> Optional[float]:
        n = self.samples.get(direction, 0)
        return self.converged.get(direction, 0) / n if n else None

    def as_dict(self) -> dict:
        return {d: {"solves": self.calls[d], "sample_solves": self.samples[d], "converged": self.converged[d],
                    "fraction": self.fraction(d)} for d in sorted(self.samples)}


def write_init_weights(config: ExperimentConfig, init: str, path: Path) -> str:
    """Write the denoiser's initial state to ``path`` (every run of a task starts from it); returns a note."""
    shipped = init == "shipped"
    cfg = config.replace(**{"model.weights": ""})
    model = build_model(cfg, "cpu", load_weights=shipped)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.operator.denoiser.state_dict(), path)
    if not shipped:
        return f"random initialisation (seed {cfg.run.seed})"
    from engine.model import default_weights

    found = default_weights(cfg.model, image_channels(cfg.physics))
    return f"shipped weights {found.name}" if found else \
        f"random initialisation (seed {cfg.run.seed}; no shipped weights fit this architecture)"


def train_run(config: ExperimentConfig, run_dir: Path, device: str, log_prefix: str = "",
              before_run: Optional[Callable[[Trainer], dict]] = None) -> tuple[dict, Optional[Trainer]]:
    """Train one config into ``run_dir``; returns (summary, trainer or None if it could not start)."""
    counter = SolveCounter()
    errors: list[str] = []
    observers = Observers()
    observers.add(counter)
    observers.add(lambda e: errors.append(e.message) if isinstance(e, RunFailed) else None)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(config, run_dir=run_dir, observers=observers, device=device, overwrite=True)  # ours
    except (EquiDEQError, OSError, ValueError) as exc:
        say(f"{log_prefix}could not start: {exc}")
        return {"status": "failed", "error": str(exc)}, None
    setup = time.perf_counter() - t0
    extra = before_run(trainer) if before_run is not None else {}
    t1 = time.perf_counter()
    status = trainer.run()
    wall = time.perf_counter() - t1
    history = trainer.history
    step_seconds = sum(r["seconds"] for r in history)
    checkpoint = trainer.last_checkpoint if status == "completed" else None
    if checkpoint is None:  # keep whatever the model reached (failed steps were never applied)
        checkpoint = trainer.save_checkpoint(run_dir / "final.pt")
    mean_it = lambda key: (sum(r.get(key, 0) for r in history) / len(history)) if history else None
    radii = [r["spectral_radius"] for r in history if "spectral_radius" in r]
    summary = {
        "status": status, "errors": errors, "steps_done": trainer.step, "steps_applied": len(history),
        "setup_seconds": setup, "wall_seconds": wall, "step_seconds": step_seconds,
        "alpha": trainer.loss.alpha, "final_validation": trainer.last_validation,
        "solves": counter.as_dict(), "mean_forward_iterations": mean_it("forward_iterations"),
        "mean_backward_iterations": mean_it("backward_iterations"),
        "forward_max_iter": config.solver.max_iter, "backward_max_iter": config.backward_solver.max_iter,
        "training_spectral_radius_max": max(radii) if radii else None,
        "safeguard_actions": sum(r.get("safeguard", "none") != "none" for r in history),
        "final_jacobian_weight": trainer.penalty.weight, "checkpoint": str(checkpoint), **extra,
    }
    say(f"{log_prefix}{status} in {wall:.0f} s ({trainer.step} steps, {step_seconds:.0f} s in steps); "
        f"solves converged: {format_solves(summary)}; last validation PSNR "
        f"{trainer.last_validation.get('psnr', float('nan')):.2f} dB")
    return summary, trainer


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%" if 0.99 < x < 1 else f"{100 * x:.0f}%"


def format_solves(summary: dict) -> str:
    solves = summary.get("solves", {})
    parts = []
    if "forward" in solves:
        parts.append(f"fwd {_pct(solves['forward']['fraction'])}")
    if "backward" in solves:
        parts.append(f"bwd {_pct(solves['backward']['fraction'])}")
    test = summary.get("test_solves", {}).get("forward", {}).get("fraction")
    if test is not None:
        parts.append(f"test {_pct(test)}")
    return " / ".join(parts) or "– (no solves)"


def fmt(x, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


# -- evaluation ---------------------------------------------------------------------------------

def prepared_slices(path: Path, config: ExperimentConfig, spec: str):
    """(the slices ``spec`` of the scan at ``path``, prepared as in training; the scan's slice count)."""
    scan = load_scan(path)
    images = prepare_slices(scan, config.physics.img_size, window=list(config.data.window) or None)
    return images[list(slice_range(spec, images.shape[0]))], int(images.shape[0])


def evaluate_checkpoint(checkpoint: str, images, device: str, angles) -> dict:
    return evaluate_loaded(load_model(checkpoint, device=device), images, angles)


@torch.no_grad()
def test_spectral_radius(loaded: LoadedModel, images) -> list[float]:
    """Spectral radius of dF/dx at the test fixed points of the first :data:`RADIUS_IMAGES` images."""
    x = loaded.images_to_tensor(images[:RADIUS_IMAGES])
    y = loaded.simulate(x, seed=0)
    model = loaded.model.eval()
    x_star = model.solve_forward(y, loaded.physics) if model.gradient != "unrolled" else model(y, loaded.physics)
    generator = torch.Generator(device=x.device).manual_seed(0)
    return [float(r) for r in model.spectral_radius(y, loaded.physics, x_star, generator=generator)]


def evaluate_loaded(loaded: LoadedModel, images, angles) -> dict:
    """Test metrics of a loaded model (per-image lists dropped), its solve counts, test spectral radius and time."""
    counter = SolveCounter()
    loaded.model.on_solve = counter.on_solve
    t0 = time.perf_counter()
    result = loaded.evaluate(images, angles=angles, seed=0, equivariance_images=EQUIVARIANCE_IMAGES).to_dict()
    for key in ("psnr_per_image", "ssim_per_image"):
        result["model"].pop(key, None)
        result["baseline"].pop(key, None)
    result["seconds"] = time.perf_counter() - t0
    result["solves"] = counter.as_dict()
    loaded.model.on_solve = None
    radii = test_spectral_radius(loaded, images)
    result["spectral_radius"] = radii
    result["spectral_radius_max"] = max(radii)
    return result


def tv_baseline(cfg: ExperimentConfig, train_images, test_images, lambdas, device: str) -> dict:
    """TV with lambda tuned on a few training slices, on the test slices (the same simulated y as the models)."""
    loaded = model_from_config(cfg.replace(**{"model.weights": ""}), device=device)
    pick = np.linspace(0, len(train_images) - 1, min(TV_TUNING_SLICES, len(train_images))).round().astype(int)
    x_train = loaded.images_to_tensor(train_images[pick])
    t0 = time.perf_counter()
    tuning = tune_tv_lambda(loaded.physics, loaded.simulate(x_train, seed=1), x_train, lambdas)
    tune_seconds = time.perf_counter() - t0
    problem = loaded.problem(test_images, seed=0)  # the y the models see
    t1 = time.perf_counter()
    x_hat = tv_reconstruct(loaded.physics, problem.y, tuning.lam)
    seconds = time.perf_counter() - t1
    scores = score(problem, x_hat)
    return {"lambda": tuning.lam, "train_psnr_by_lambda": tuning.train_psnr, "tuned_on": [int(i) for i in pick],
            "psnr": float(scores.psnr.mean()), "ssim": float(scores.ssim.mean()),
            "tune_seconds": tune_seconds, "seconds": seconds}


# -- targets ------------------------------------------------------------------------------------

def _metric(rows: dict, key: str, name: str = "psnr") -> Optional[float]:
    value = rows.get(key, {}).get("test", {}).get("model", {}).get(name)
    return value if value is not None and math.isfinite(value) else None


def _target(out: list, desc: str, values: list, test: Callable[..., bool], detail: Callable[..., str]) -> None:
    if any(v is None for v in values):
        out.append({"target": desc, "met": None, "detail": "a run has no result"})
    else:
        out.append({"target": desc, "met": bool(test(*values)), "detail": detail(*values)})


def check_targets(task: str, result: dict) -> list[dict]:
    """Each target of the issue: description, met (True / False / None when it could not be evaluated), detail."""
    rows = result["runs"]
    out: list[dict] = []
    ei, ei_ssim = _metric(rows, "ei_implicit"), _metric(rows, "ei_implicit", "ssim")
    tv = result.get("tv") or {}
    tv_psnr, tv_ssim = tv.get("psnr"), tv.get("ssim")
    _target(out, f"EI-implicit >= TV + {TARGET_OVER_TV_DB:g} dB", [ei, tv_psnr],
            lambda a, b: a - b >= TARGET_OVER_TV_DB, lambda a, b: f"EI-implicit - TV = {a - b:+.2f} dB")
    _target(out, "EI-implicit SSIM >= TV's", [ei_ssim, tv_ssim],
            lambda a, b: a >= b, lambda a, b: f"{a:.3f} vs {b:.3f}")
    if task == "mri":
        base = (result.get("baseline") or {}).get("psnr")
        _target(out, f"EI-implicit >= zero-filled + {TARGET_MRI_OVER_ZERO_FILLED_DB:g} dB", [ei, base],
                lambda a, b: a - b >= TARGET_MRI_OVER_ZERO_FILLED_DB, lambda a, b: f"{a - b:+.2f} dB")
        sup = _metric(rows, "supervised")
        _target(out, f"EI-implicit within {TARGET_MRI_EI_GAP_DB:g} dB of supervised", [sup, ei],
                lambda a, b: a - b <= TARGET_MRI_EI_GAP_DB, lambda a, b: f"supervised - EI-implicit = {a - b:+.2f} dB")
        jfb = _metric(rows, "ei_jfb")
        _target(out, f"EI-implicit >= EI-JFB + {TARGET_MRI_IMPLICIT_OVER_JFB_DB:g} dB", [ei, jfb],
                lambda a, b: a - b >= TARGET_MRI_IMPLICIT_OVER_JFB_DB, lambda a, b: f"{a - b:+.2f} dB")
    else:
        start = (result.get("untrained") or {}).get("model", {}).get("psnr")
        _target(out, f"training adds >= {TARGET_CT_TRAINING_GAIN_DB:g} dB over the untrained DEQ", [ei, start],
                lambda a, b: a - b >= TARGET_CT_TRAINING_GAIN_DB,
                lambda a, b: f"EI-implicit - untrained = {a - b:+.2f} dB")
    fractions = []
    for key, row in rows.items():
        solves = dict(row.get("solves", {}))
        for direction, data in solves.items():
            fractions.append((f"{key} {direction}", data["fraction"]))
        test = row.get("test_solves", {}).get("forward")
        if test:
            fractions.append((f"{key} test", test["fraction"]))
    worst = min(fractions, key=lambda kv: kv[1]) if fractions else None
    out.append({"target": f">= {100 * TARGET_CONVERGED:g} % of forward and backward solves converge in every run",
                "met": None if worst is None else worst[1] >= TARGET_CONVERGED,
                "detail": "no solves" if worst is None else f"lowest: {worst[0]} {100 * worst[1]:.1f} %"})
    radii = [(key, row["test"]["spectral_radius_max"]) for key, row in rows.items()
             if key in DEQ_KEYS and "test" in row]
    top = max(radii, key=lambda kv: kv[1]) if radii else None
    out.append({"target": "spectral radius at test fixed points < 1 (every DEQ)",
                "met": None if top is None else top[1] < 1.0,
                "detail": "no DEQ evaluated" if top is None else f"largest: {top[1]:.3f} ({METHOD_LABELS[top[0]]})"})
    return out


def verdict(met: Optional[bool]) -> str:
    return "**met**" if met else ("not evaluated" if met is None else "**not met**")


# -- markdown -----------------------------------------------------------------------------------

def _row(label: str, test: dict, radius, seconds, solves: str) -> str:
    return (f"| {label} | {fmt(test.get('psnr'))} | {fmt(test.get('ssim'), '.3f')} | {fmt(test.get('eq'), '.3g')} "
            f"| {fmt(radius, '.3f')} | {seconds} | {solves} |")


def task_markdown(result: dict) -> str:
    if result.get("skipped"):
        return f"## {result['title']}\n\nSkipped: {result['skipped']}\n"
    s = result["settings"]
    lines = [f"## {result['title']}", "",
             f"{s['size']}x{s['size']}, {s['physics']}. Train slices {s['train_slices']} "
             f"({s['n_train']} images), test slices {s['test_slices']} ({s['n_test']} images, never trained on). "
             f"{s['steps']} steps, batch {s['batch']}, lr {s['lr']:g}, seed {s['seed']}, denoiser {s['denoiser']}. "
             f"Every run starts from the same initial weights: {s['init']}. EI weight alpha = "
             f"{fmt(s.get('alpha'), '.4g')} ({s['alpha_source']}). Unrolled network: {s['unrolled_iterations']} "
             f"iterations. Equivariance error over {len(s['angles'])} rotations "
             f"({', '.join(f'{a:.0f}' for a in s['angles'])} deg) of the first {EQUIVARIANCE_IMAGES} test images; "
             f"spectral radius of dF/dx at the test fixed points "
             f"of {RADIUS_IMAGES} images (largest).", "",
             "| method | PSNR (dB) | SSIM | equivariance error | spectral radius | training time "
             "| solves converged (fwd / bwd / test) |",
             "|---|---|---|---|---|---|---|"]
    base = result.get("baseline")
    if base:
        lines.append(_row(f"{base['method']} (A^dagger y)", base, None, "–", "–"))
    tv = result.get("tv")
    if tv:
        lines.append(_row(f"TV (lambda {tv['lambda']:g}, tuned on {len(tv['tuned_on'])} training slices)", tv, None,
                          f"{tv['tune_seconds']:.0f} s tuning", "–"))
    start = result.get("untrained")
    if start:
        lines.append(_row("Untrained DEQ (the shared initial weights)",
                          {**start["model"], "eq": start.get("equivariance_error")}, start.get("spectral_radius_max"),
                          "–", f"test {_pct(start['test_solves'].get('forward', {}).get('fraction'))}"))
    for key, label in METHOD_LABELS.items():
        row = result["runs"].get(key)
        if row is None:
            continue
        test = row.get("test") or {}
        status = "" if row.get("status") == "completed" else f" ({row.get('status')})"
        lines.append(_row(f"{label}{status}", {**test.get("model", {}), "eq": test.get("equivariance_error")},
                          test.get("spectral_radius_max"), f"{fmt(row.get('step_seconds'), '.0f')} s",
                          format_solves(row)))
    lines += ["", "Targets (from the test numbers above):", ""]
    for t in result["targets"]:
        lines.append(f"- {t['target']}: {verdict(t['met'])} ({t['detail']})")
    gen = result.get("generalisation")
    if gen:
        lines += ["", f"### Generalisation to a real slice: {gen['file']}", ""]
        if gen.get("skipped"):
            lines.append(f"Skipped: {gen['skipped']}")
        else:
            lines += ["| model | PSNR (dB) | SSIM | equivariance error |", "|---|---|---|---|"]
            if gen.get("baseline"):
                b = gen["baseline"]
                lines.append(f"| {b['method']} (A^dagger y) | {fmt(b['psnr'])} | {fmt(b['ssim'], '.3f')} | – |")
            for key, label in METHOD_LABELS.items():
                r = gen["models"].get(key)
                if r is None:
                    continue
                lines.append(f"| {label} | {fmt(r['model']['psnr'])} | {fmt(r['model']['ssim'], '.3f')} | "
                             f"{fmt(r['equivariance_error'], '.3g')} |")
    return "\n".join(lines) + "\n"


def results_markdown(data: dict) -> str:
    meta = data["meta"]
    parts = ["# EquiDEQ reproduction (small scale)", "",
             f"Run {meta['started']} with `{meta['command']}` ({meta['total_seconds']:.0f} s in all; budget "
             f"{meta['budget']}).", "",
             f"Machine: {meta['machine']}", "", PAPER_HEADLINE, "",
             "Training time is the sum of the optimisation steps' times (results.json also has wall times). "
             "Solves converged: fraction of per-sample fixed-point solves during training that reached the "
             "tolerance (fwd = forward, bwd = implicit backward; JFB has none, an unrolled network none at all), "
             "and of the forward solves at test time. Targets are marked met / not met from the measured numbers.",
             ""]
    for task in data["tasks"].values():
        parts.append(task_markdown(task))
    return "\n".join(parts)


# -- the tasks ----------------------------------------------------------------------------------

def evaluate_run(summary: dict, images, args, angles, log_prefix: str) -> None:
    summary["test"] = evaluate_checkpoint(summary["checkpoint"], images, args.device, angles)
    summary["test_solves"] = summary["test"].pop("solves")
    test = summary["test"]
    say(f"{log_prefix}test: PSNR {test['model']['psnr']:.2f} dB, SSIM {test['model']['ssim']:.3f}, equivariance "
        f"error {test['equivariance_error']:.3g}, spectral radius {test['spectral_radius_max']:.3f} "
        f"(baseline {test['baseline']['psnr']:.2f} dB)")


def run_task(task: str, args, out: Path, save: Callable[[], None], results: dict) -> None:
    spec = TASKS[task]
    budget = BUDGETS[args.budget]
    data_path = spec["find"]()
    base_cfg = builtin_config(spec["config"])
    result = {"title": spec["title"], "runs": {}}
    results[task] = result
    if data_path is None:
        expected = base_cfg.data.paths[0] if base_cfg.data.paths else "?"
        result["skipped"] = (f"data file not found ({expected}; Debian package {spec['package']}). "
                             "Install it to run this task.")
        say(f"[{task}] skipped: {result['skipped']}")
        save()
        return
    test_spec = spec["quick_test"] if args.budget == "quick" else spec["test"]
    overrides = {
        "physics.img_size": args.size, "data.paths": [str(data_path)],
        "data.train_slices": spec["train"], "data.val_slices": test_spec, "data.seed": args.seed,
        "optim.steps": args.steps, "run.seed": args.seed, "run.threads": args.threads, "run.device": args.device,
        "run.checkpoint_every": 0, "run.validate_every": args.steps,
    }
    if args.batch:
        overrides["optim.batch_size"] = args.batch
    cfg = base_cfg.replace(**overrides)
    task_dir = out / task
    init_path = task_dir / "init_denoiser.pt"
    init_note = write_init_weights(cfg, args.init, init_path)
    cfg = cfg.replace(**{"model.weights": str(init_path.resolve())})
    images, n_all = prepared_slices(data_path, cfg, test_spec)
    train_images, _ = prepared_slices(data_path, cfg, spec["train"])
    angles = list(default_angles(args.angles, args.seed))
    physics = (f"{cfg.physics.views} views, Gaussian noise {cfg.physics.noise_sigma:g}" if task == "ct" else
               f"{cfg.physics.acceleration:g}x {cfg.physics.mask} mask, centre {cfg.physics.center_fraction:g}, "
               f"Gaussian noise {cfg.physics.noise_sigma:g}")
    m = cfg.model
    result["settings"] = {
        "size": cfg.physics.img_size, "physics": physics, "data": str(data_path),
        "train_slices": spec["train"], "n_train": len(slice_range(spec["train"], n_all)),
        "test_slices": test_spec, "n_test": int(images.shape[0]), "steps": cfg.optim.steps,
        "batch": cfg.optim.batch_size, "lr": cfg.optim.lr, "seed": args.seed, "init": init_note,
        "init_file": str(init_path), "angles": angles, "config": spec["config"],
        "denoiser": (f"{m.denoiser} {m.channels} channels, depth {m.depth}, norm {m.norm}, "
                     f"{'spectral norm' if m.spectral_norm else 'no spectral norm'}, Jacobian penalty "
                     f"{cfg.jacobian.penalty:g} (target {cfg.jacobian.target:g}), relaxation {cfg.deq.relaxation:g}"),
        "unrolled_iterations": cfg.deq.unrolled_iterations,
        "alpha": None if cfg.loss.ei_weight == "auto" else float(cfg.loss.ei_weight),
        "alpha_source": ("auto: balanced on EI-implicit's first batch, reused for EI-JFB and unrolled"
                         if cfg.loss.ei_weight == "auto" else f"config {spec['config']}"),
    }
    say(f"[{task}] {spec['title']}: {result['settings']['n_train']} train / {images.shape[0]} test slices at "
        f"{args.size}x{args.size}, {args.steps} steps; initial weights: {init_note}")

    tv = tv_baseline(cfg, train_images, images, budget["tv_lambdas"], args.device)
    result["tv"] = tv
    say(f"[{task}] TV: lambda {tv['lambda']:g} "
        f"(tuned on training slices {tv['tuned_on']} in {tv['tune_seconds']:.0f} s)"
        f": PSNR {tv['psnr']:.2f} dB, SSIM {tv['ssim']:.3f}")
    save()

    # the shared starting point, evaluated like the trained models: what training adds is the difference
    untrained = evaluate_loaded(model_from_config(cfg, device=args.device), images, angles)
    untrained["test_solves"] = untrained.pop("solves")
    result["untrained"] = untrained
    result["baseline"] = untrained["baseline"]
    say(f"[{task}] untrained DEQ (initial weights): PSNR {untrained['model']['psnr']:.2f} dB, SSIM "
        f"{untrained['model']['ssim']:.3f}, spectral radius {untrained['spectral_radius_max']:.3f} "
        f"(baseline {untrained['baseline']['psnr']:.2f} dB)")
    save()

    alpha = cfg.loss.ei_weight
    for key, label, method_overrides in METHODS:
        if key not in budget["methods"]:
            continue
        run_cfg = cfg.replace(**method_overrides, **{"run.name": f"{task}_{key}"})
        if key != "ei_implicit" and run_cfg.loss.mode == "ei" and alpha != "auto":
            run_cfg = run_cfg.replace(**{"loss.ei_weight": alpha})
        say(f"[{task}] training {label} ...")
        summary, trainer = train_run(run_cfg, task_dir / key, args.device, log_prefix=f"[{task}]   ")
        if key == "ei_implicit" and trainer is not None and trainer.loss.alpha is not None:
            alpha = float(trainer.loss.alpha)
            result["settings"]["alpha"] = alpha
        summary["label"] = label
        if trainer is not None:
            evaluate_run(summary, images, args, angles, f"[{task}]   ")
        result["runs"][key] = summary
        save()

    if task == "ct":
        if budget["phantom"]:
            run_phantom(cfg, args, task_dir, images, angles, result, save)
        run_generalisation(cfg, args, angles, result, save)
    result["targets"] = check_targets(task, result)
    for t in result["targets"]:
        say(f"[{task}] target '{t['target']}': {verdict(t['met']).strip('*')} ({t['detail']})")
    save()


def run_phantom(cfg, args, task_dir: Path, head_images, angles, result, save) -> None:
    """Train a ct_phantom_quick-style EI model at the head-CT geometry and evaluate it on the head CT."""
    phantom_cfg = builtin_config("ct_phantom_quick").replace(**{
        "physics.img_size": cfg.physics.img_size, "physics.views": cfg.physics.views,
        "data.seed": args.seed, "optim.steps": cfg.optim.steps, "optim.lr": cfg.optim.lr,
        "optim.batch_size": cfg.optim.batch_size, "run.seed": args.seed, "run.threads": args.threads,
        "run.device": args.device, "run.checkpoint_every": 0, "run.validate_every": cfg.optim.steps,
        "run.name": "ct_phantom",
        # the same denoiser, map and stability settings and initial weights as the head-CT runs
        **{f"model.{f.name}": getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)},
        **{f"deq.{f.name}": getattr(cfg.deq, f.name) for f in dataclasses.fields(cfg.deq)},
        **{f"jacobian.{f.name}": getattr(cfg.jacobian, f.name) for f in dataclasses.fields(cfg.jacobian)},
    })
    say("[ct] training EI DEQ (implicit) on phantoms (ct_phantom_quick style) ...")
    summary, trainer = train_run(phantom_cfg, task_dir / "phantom", args.device, log_prefix="[ct]   ")
    summary["label"] = METHOD_LABELS["phantom"]
    if trainer is not None:
        evaluate_run(summary, head_images, args, angles, "[ct]   head-CT ")
    result["runs"]["phantom"] = summary
    save()


def run_generalisation(cfg, args, angles, result, save) -> None:
    """Every CT model on pydicom's CT_small.dcm, a real slice none of them saw."""
    path = pydicom_test_file("CT_small.dcm")
    gen = {"file": "pydicom CT_small.dcm", "models": {}}
    result["generalisation"] = gen
    if path is None:
        gen["skipped"] = "CT_small.dcm is not in the installed pydicom's data/test_files"
        say(f"[ct] generalisation skipped: {gen['skipped']}")
        save()
        return
    image, _ = prepared_slices(path, cfg, "")
    gen["path"] = str(path)
    for key, row in result["runs"].items():
        if "test" not in row:  # the run could not start
            continue
        loaded = load_model(row["checkpoint"], device=args.device)
        r = loaded.evaluate(image, angles=angles, seed=0, equivariance_images=EQUIVARIANCE_IMAGES).to_dict()
        gen["models"][key] = r
        gen.setdefault("baseline", r["baseline"])
        say(f"[ct] CT_small.dcm, {row['label']}: PSNR {r['model']['psnr']:.2f} dB "
            f"(FBP {r['baseline']['psnr']:.2f}), SSIM {r['model']['ssim']:.3f}")
    save()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=tuple(BUDGETS), default="default",
                   help="default: the README's tables (2-core CPU, < ~30 min); long: a GPU; quick: a smoke test")
    p.add_argument("--quick", action="store_true", help="the same as --budget quick")
    p.add_argument("--only", choices=("ct", "mri"), help="run one task only")
    p.add_argument("--size", type=int, help="image side (default: the budget's)")
    p.add_argument("--steps", type=int, help="optimisation steps per run (default: the budget's)")
    p.add_argument("--batch", type=int, default=0, help="images per step (0 = the config's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of data noise, batches, EI draws and initial weights (default 0)")
    p.add_argument("--angles", type=int, default=4, help="rotations for the equivariance error (default 4)")
    add_run_options(p, "reproduce", "initial denoiser weights shared by all runs of a task (default shipped)")
    args = parse_run_args(p, argv, "reproduce")
    if args.quick:
        args.budget = "quick"
    budget = BUDGETS[args.budget]
    args.size = args.size or budget["size"]
    args.steps = args.steps or budget["steps"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = start_run(args)
    out = args.out
    data = {"meta": run_meta(args, argv, budget=args.budget, machine=machine_description(args.threads)), "tasks": {}}
    say(f"output: {out}\n{data['meta']['machine']}")

    save = functools.partial(save_results, out, data, started)
    for task in ("ct", "mri"):
        if args.only and task != args.only:
            continue
        run_task(task, args, out, save, data["tasks"])
    finish_results(out, data, started, results_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
