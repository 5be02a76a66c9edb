#!/usr/bin/env python
r"""EI weight sweep on sparse-view CT: alpha in {0.01, 0.1, 1, 10, 100, auto}, same data, steps, seed and start.

Every run is an EI DEQ (``loss.mode = ei``, implicit gradient) trained from the
*same* initial denoiser weights (written once to ``<out>/init_denoiser.pt``;
``--init shipped`` (default) = the shipped pretrained denoiser where one fits,
else the seeded random initialisation; ``--init random`` = always random) on
the same measurements with the same batches, EI transforms and noise draws
(everything is seeded per step by the trainer), for the same number of steps.
Only ``loss.ei_weight`` differs.

Before training, on the trainer's own first batch (the batch and seeding that
``Trainer`` uses to balance ``"auto"``: ``seed_for_step(seed, -1)``, batch
indices of step 0, model in train mode), it computes the parameter gradients of
the two unweighted terms (``TrainingLoss.terms``: MC and EI, through the
implicit DEQ gradient) and reports

    ratio = ||alpha * grad EI|| / ||grad MC||

``auto`` is balanced here with the formula of ``TrainingLoss.balance_alpha``
(``alpha = AUTO_EI_GRADIENT_RATIO * ||grad MC|| / ||grad EI||``, ratio 0.2 by
construction) and handed to the trainer, so every run -- fixed or auto --
sees exactly one such probe before its first step. After training it reports
the final validation PSNR / SSIM (and the FBP baseline, the equivariance error
of the trainer's validation and the fraction of converged solves).

Data: ``--data phantom`` (default): ``ct_phantom_quick`` (ellipse phantoms,
30 views, noise 0.01) at 64x64; ``--data head``: ``ct_head`` (the real head CT
``Cranium.inv3``, train slices 0:80, validation 80:108) at 64x64 unless
``--size``. Default 100 steps per alpha (~5 min in all at 64x64 on one
thread); ``--quick``: 15 steps, 16 training phantoms / 8 validation slices.
The paper used alpha = 100 for CT (``engine.losses.PAPER_ALPHA``).

Writes ``<out>/results.json`` (after every run) and ``<out>/results.md``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/alpha_sweep.py                # phantoms, 64x64
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/alpha_sweep.py --data head --size 128 --steps 200
    .venv/bin/python benchmarks/alpha_sweep.py --quick --alphas 0.1,1,auto
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import fmt, format_solves, machine_description, say, train_run, write_init_weights  # noqa: E402
from run_options import (add_run_options, finish_results, parse_run_args, run_meta, save_results,  # noqa: E402
                         start_run)

from engine.config import builtin_config  # noqa: E402
from engine.data import invesalius_head_ct_path  # noqa: E402
from engine.losses import AUTO_EI_GRADIENT_RATIO, PAPER_ALPHA  # noqa: E402
from engine.trainer import Trainer, seed_for_step  # noqa: E402

DEFAULT_ALPHAS = "0.01,0.1,1,10,100,auto"


def parse_alphas(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "auto":
            out.append("auto")
            continue
        try:
            value = float(part)
        except ValueError:
            raise SystemExit(f"--alphas: '{part}' is neither a number nor 'auto'") from None
        if not (value >= 0 and math.isfinite(value)):
            raise SystemExit(f"--alphas: {part} must be a finite number >= 0")
        out.append(value)
    if not out:
        raise SystemExit("--alphas: no values given")
    return out


def first_batch_gradient_norms(trainer: Trainer) -> tuple[float, float]:
    """(||grad MC||, ||grad EI||) of the unweighted terms on the trainer's first batch (as ``_balance_alpha``)."""
    cfg = trainer.config
    seed = seed_for_step(cfg.run.seed, -1)
    torch.manual_seed(seed)
    trainer.loss.reseed(seed)
    y = trainer.train_set.measurements[trainer._batch_indices(0)]
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    terms = trainer.loss.terms(trainer.model, y, trainer.physics)
    grad_mc = torch.autograd.grad(terms["mc"], params, retain_graph=True, allow_unused=True)
    grad_ei = torch.autograd.grad(terms["ei"], params, allow_unused=True)
    norm = lambda grads: float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
    return norm(grad_mc), norm(grad_ei)


def gradient_probe(alpha):
    """A ``before_run`` hook for :func:`reproduce.train_run`: measure, set alpha for auto, return the numbers."""
    def probe(trainer: Trainer) -> dict:
        t0 = time.perf_counter()
        mc, ei = first_batch_gradient_norms(trainer)
        if alpha == "auto":  # TrainingLoss.balance_alpha's rule, incl. its fallback
            value = AUTO_EI_GRADIENT_RATIO * mc / ei if (mc > 0 and ei > 0 and math.isfinite(mc + ei)) else 1.0
            trainer.loss.alpha = value
        else:
            value = float(alpha)
        ratio = value * ei / mc if mc > 0 else float("nan")
        say(f"    first batch: ||grad MC|| = {mc:.4g}, ||grad EI|| = {ei:.4g}, alpha = {value:.4g}, "
            f"||alpha grad EI|| / ||grad MC|| = {ratio:.4g}")
        return {"grad_mc_norm": mc, "grad_ei_norm": ei, "alpha_used": value, "initial_ratio": ratio,
                "probe_seconds": time.perf_counter() - t0}
    return probe


def markdown(data: dict) -> str:
    meta, s = data["meta"], data["settings"]
    lines = ["# EI weight (alpha) sweep, sparse-view CT", "",
             f"Run {meta['started']} with `{meta['command']}` ({meta['total_seconds']:.0f} s in all).", "",
             f"Machine: {meta['machine']}", "",
             f"Data: {s['data']}; {s['size']}x{s['size']}, {s['views']} views, Gaussian noise {s['noise_sigma']:g}; "
             f"{s['steps']} steps, batch {s['batch']}, lr {s['lr']:g}, seed {s['seed']}, EI implicit, every run from "
             f"the same initial weights ({s['init']}). Validation: {s['validation']}.", "",
             f"Initial ratio = ||alpha grad EI|| / ||grad MC|| on the trainer's first batch (before any step). "
             f"`auto` targets {AUTO_EI_GRADIENT_RATIO}; the paper used alpha = {PAPER_ALPHA['ct']:g} for CT.", "",
             "| alpha | initial ratio | val PSNR (dB) | val SSIM | vs FBP (dB) | equivariance error | training time "
             "| solves converged (fwd / bwd) |",
             "|---|---|---|---|---|---|---|---|"]
    runs = data["runs"]
    finite = [r["final_validation"]["psnr"] for r in runs if math.isfinite(r.get("final_validation", {})
                                                                             .get("psnr", float("nan")))]
    best = max(finite) if finite else None
    base = next((r["final_validation"].get("baseline_psnr") for r in runs if r.get("final_validation")), None)
    base_ssim = next((r["final_validation"].get("baseline_ssim") for r in runs if r.get("final_validation")), None)
    if base is not None:
        lines.append(f"| FBP (A^dagger y) | – | {fmt(base)} | {fmt(base_ssim, '.3f')} | – | – | – | – |")
    for r in runs:
        v = r.get("final_validation") or {}
        name = r["alpha_label"] if r["alpha_label"] != "auto" else f"auto ({fmt(r.get('alpha_used'), '.3g')})"
        psnr = v.get("psnr")
        cell = fmt(psnr)
        if best is not None and psnr is not None and psnr == best:
            cell = f"**{cell}**"
        status = "" if r.get("status") == "completed" else f" ({r.get('status')})"
        delta = psnr - base if psnr is not None and base is not None else None
        lines.append(f"| {name}{status} | {fmt(r.get('initial_ratio'), '.3g')} | {cell} | {fmt(v.get('ssim'), '.3f')} "
                     f"| {fmt(delta, '+.2f')} | {fmt(v.get('equivariance_error'), '.3g')} "
                     f"| {fmt(r.get('step_seconds'), '.0f')} s | {format_solves(r)} |")
    norms = next((r for r in runs if "grad_mc_norm" in r), None)
    if norms:
        lines += ["", f"First-batch gradient norms (unweighted, identical start for every run): ||grad MC|| = "
                      f"{norms['grad_mc_norm']:.4g}, ||grad EI|| = {norms['grad_ei_norm']:.4g}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("phantom", "head"), default="phantom",
                   help="ellipse phantoms (ct_phantom_quick; default) or the real head CT (ct_head)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"comma-separated EI weights, 'auto' allowed (default {DEFAULT_ALPHAS})")
    p.add_argument("--quick", action="store_true", help="15 steps, 16 training phantoms / 8 validation slices")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--steps", type=int, help="optimisation steps per alpha (default 100, --quick 15)")
    p.add_argument("--batch", type=int, default=0, help="images per step (0 = the config's, 4)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    add_run_options(p, "alpha_sweep", "initial denoiser weights shared by every run (default shipped)")
    args = parse_run_args(p, argv, "alpha_sweep")
    args.alpha_values = parse_alphas(args.alphas)
    if args.steps is None:
        args.steps = 15 if args.quick else 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = start_run(args)
    out = args.out

    overrides = {"physics.img_size": args.size, "optim.steps": args.steps, "data.seed": args.seed,
                 "run.seed": args.seed, "run.threads": args.threads, "run.device": args.device,
                 "run.checkpoint_every": 0, "run.validate_every": args.steps,
                 "loss.mode": "ei", "deq.gradient": "implicit"}
    if args.batch:
        overrides["optim.batch_size"] = args.batch
    if args.data == "head":
        path = invesalius_head_ct_path()
        if path is None:
            say("skipped: the head CT Cranium.inv3 is not installed (Debian package invesalius-examples); "
                "use --data phantom")
            return 0
        val = "80:88" if args.quick else "80:108"
        cfg = builtin_config("ct_head").replace(**overrides, **{"data.paths": [str(path)],
                                                                 "data.train_slices": "0:80", "data.val_slices": val})
        data_note, validation = f"head CT {path.name}, train slices 0:80", f"slices {val} (never trained on)"
    else:
        cfg = builtin_config("ct_phantom_quick").replace(**overrides)
        if args.quick:
            cfg = cfg.replace(**{"data.n_train": 16})
        data_note = f"{cfg.data.phantom} phantoms, {cfg.data.n_train} training images"
        validation = f"{cfg.data.n_val} held-out phantoms"
    init_path = out / "init_denoiser.pt"
    init_note = write_init_weights(cfg, args.init, init_path)
    cfg = cfg.replace(**{"model.weights": str(init_path.resolve())})

    data = {"meta": run_meta(args, argv, machine=machine_description(args.threads)),
            "settings": {"data": data_note, "validation": validation, "size": cfg.physics.img_size,
                         "views": cfg.physics.views, "noise_sigma": cfg.physics.noise_sigma, "steps": cfg.optim.steps,
                         "batch": cfg.optim.batch_size, "lr": cfg.optim.lr, "seed": args.seed, "init": init_note,
                         "init_file": str(init_path), "alphas": [str(a) for a in args.alpha_values]},
            "runs": []}
    say(f"output: {out}\n{data['meta']['machine']}\n{data_note}, {args.size}x{args.size}, {args.steps} steps; "
        f"initial weights: {init_note}")

    save = functools.partial(save_results, out, data, started)
    for alpha in args.alpha_values:
        label = "auto" if alpha == "auto" else f"{alpha:g}"
        run_cfg = cfg.replace(**{"loss.ei_weight": alpha, "run.name": f"alpha_{label}"})
        say(f"alpha = {label}:")
        summary, _ = train_run(run_cfg, out / f"alpha_{label}", args.device, log_prefix="    ",
                               before_run=gradient_probe(alpha))
        summary["alpha_label"] = label
        data["runs"].append(summary)
        save()

    finish_results(out, data, started, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
