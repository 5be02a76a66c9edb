"""The training loop: self-supervised (EI / MC) or supervised DEQ training with live events.

Measurements are simulated once, ``y = A x + n`` with a fixed noise draw, and
the self-supervised objectives see **only** ``y``: the ground truth images are
kept in a separate store that only the supervised loss and validation read
(``tests/test_trainer.py`` proves training never touches them).

Each step ``k`` is a pure function of ``(seed, k)`` and the state (the batch
indices, the EI transform and the EI noise are drawn after seeding with
``seed_for_step``), so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.

A step whose forward or backward solve diverged or went non-finite, or whose
loss or gradient is non-finite, is not applied: the parameters stay as they
were, the reason is reported, and after ``MAX_FAILED_STEPS`` failures in a row
the run stops with the last good checkpoint kept.

Keeping ``F`` contractive (config section ``[jacobian]``): with
``jacobian.penalty = mu > 0`` each step adds ``mu * max(||dF/dx|| - target, 0)``
at the first model call's fixed points (:mod:`engine.regularisers`; ``F`` before
relaxation). Every ``jacobian.monitor_every`` steps the spectral radius of the
iterated map's Jacobian at those fixed points is estimated
(:func:`engine.linalg.jacobian_spectral_radius`), reported as a
:class:`~engine.events.StabilityChecked` event and as ``spectral_radius`` in
``metrics.jsonl``. Above ``jacobian.radius_limit`` the safeguard doubles the
penalty weight (at least to :data:`MIN_SAFEGUARD_PENALTY`) and, with
``safeguard = "rollback"``, also restores the weights and optimiser state of the
last check that passed, saying so in the log.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine import __version__
from engine.checkpoint import (Checkpoint, capture_rng_state, check_compatible, check_resume_state, load_checkpoint,
                               publish_latest, remove_stale_temp_files, save_checkpoint)
from engine.config import ExperimentConfig, save_config
from engine.data import load_training_images
from engine import distributed as ddp
from engine.distributed import DistContext
from engine.diagnostics.recording import SolveRecorder
from engine.errors import ConfigError, EquiDEQError
from engine.events import (CheckpointSaved, LogMessage, Observers, RunControl, RunFailed, RunFinished,
                           RunStarted, Snapshot, SolveAlarm, StabilityChecked, StepFinished, ValidationFinished)
from engine.evaluation import Problem, reconstruction_of, score, solve
from engine.fixed_point_cache import FixedPointCache
from engine.losses import TrainingLoss
from engine.measured import load_measurement_data, measurement_physics
from engine.metrics import equivariance_error
from engine.model import build_model, resolve_device
from engine.outputs import CONFIG_FILE, METRICS_FILE, checkpoint_name, claim_run_dir, truncate_run
from engine.physics import baseline, build_physics, describe, to_model_space
from engine.regularisers import JacobianSpectralPenalty
from engine.run_record import record_run
from engine.solver_names import FAILURE_REASONS
from engine.solvers import SolveStats

MAX_FAILED_STEPS = 3
SIMULATION_CHUNK = 16

#: the safeguard raises a zero (or tiny) Jacobian penalty weight to at least this
MIN_SAFEGUARD_PENALTY = 1e-2



def seed_for_step(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63 - 1)


def configure_threads(requested: int) -> int:
    """Torch threads for the engine: ``cores - 1`` (at least 1) unless set, leaving a core to the GUI.

    Under torchrun (``LOCAL_WORLD_SIZE`` processes on this machine, no GUI) the cores are
    shared out instead: ``cores // processes`` each, so the processes do not oversubscribe
    the machine (measured on 2 busy cores: threads that wait for descheduled peers ran ~10x slower).
    """
    if not isinstance(requested, int) or requested < 0:
        raise ConfigError(f"threads must be 0 (automatic) or a positive count, got {requested}")
    cores = os.cpu_count() or 2
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    automatic = max(1, cores // local_processes) if local_processes > 1 else max(1, cores - 1)
    threads = requested or automatic
    torch.set_num_threads(threads)
    return threads


def oversubscription_note(threads: int) -> Optional[str]:
    """A warning when more torch threads than cores are asked for (measured: 256 on 2 cores ran ~10x slower)."""
    cores = os.cpu_count() or 1
    if threads > cores:
        return (f"{threads} threads on {cores} cores: oversubscribed threads slow training down many times; "
                f"use run.threads = 0 (automatic) or at most {cores}")
    return None


class GroundTruthLocked(RuntimeError):
    """Raised when anything reads training ground truth in a self-supervised run."""


class TrainingSet:
    """Training measurements, with the ground truth locked unless the objective is supervised."""

    def __init__(self, measurements: torch.Tensor, ground_truth: Optional[torch.Tensor], unlocked: bool):
        self.measurements = measurements
        self._ground_truth = ground_truth
        self._unlocked = unlocked

    def __len__(self) -> int:
        return len(self.measurements)

    @property
    def ground_truth(self) -> torch.Tensor:
        if not self._unlocked or self._ground_truth is None:
            raise GroundTruthLocked("training ground truth is not available to a self-supervised objective")
        return self._ground_truth


class StepFailed(Exception):
    """A step that must not be applied (divergence, non-finite values).

    When a solve failed, ``direction``, ``tag``, ``sample`` and ``stop_reason`` name it
    (as :class:`~engine.events.SolveFinished` does); otherwise ``direction`` is None.
    """

    def __init__(self, message: str, direction: Optional[str] = None, tag: str = "", sample: int = 0,
                 stop_reason: str = ""):
        super().__init__(message)
        self.direction, self.tag, self.sample, self.stop_reason = direction, tag, sample, stop_reason


@dataclass
class StepRecordings:
    """The recorded solves of one training step (``engine.diagnostics.SolveRecording``, in call order)
    and the weights they ran with (CPU copies: a replay needs them after the weights have moved on)."""

    step: int
    recordings: list
    weights: dict
    failed: bool = False
    message: str = ""


class Trainer:
    """Train a DEQ from a config; ``run()`` in any thread, events to ``observers``."""

    def __init__(self, config: ExperimentConfig, run_dir: Optional[str | Path] = None,
                 observers: Optional[Observers] = None, control: Optional[RunControl] = None,
                 resume_from: Optional[str | Path] = None, device: Optional[str] = None,
                 overwrite: bool = False, distributed: Optional[DistContext] = None):
        self.config = config.validate()
        #: set under torchrun (:mod:`engine.distributed`): this rank's shard of each batch; rank 0 writes the run
        self.dist = distributed if distributed is not None and distributed.world_size > 1 else None
        if self.dist is not None:
            if config.optim.batch_size < self.dist.world_size:
                raise ConfigError(f"optim.batch_size = {config.optim.batch_size} is smaller than the "
                                  f"{self.dist.world_size} processes: each needs at least one sample")
            if not self.dist.is_main:
                run_dir = None  # the other ranks keep the same state but write nothing
        self._agreed_stop = False
        self.observers = observers if observers is not None else Observers()
        self.control = control if control is not None else RunControl()
        # refused before any data is read: an existing run is replaced only on request
        self.run_dir = claim_run_dir(run_dir, resuming=resume_from is not None, overwrite=overwrite) if run_dir else None
        self.device = torch.device(device) if device else resolve_device(config.run.device)
        self.threads = configure_threads(config.run.threads)
        cfg = self.config
        self.modality = cfg.physics.modality
        self.data_notes: list[str] = []

        noise_rng = torch.Generator(device=self.device).manual_seed(cfg.data.seed + 99)
        supervised = cfg.loss.mode == "supervised"
        # val_x is None for measurement files without reference images (measurement-domain validation)
        train_y, train_x, self.val_y, self.val_x, self.physics = self._data_source(noise_rng, supervised)
        # Ground truth of the training set is readable only by the supervised objective.
        self.train_set = TrainingSet(train_y, train_x if supervised else None, unlocked=supervised)
        # From here on the noise of EI's A T_g x comes from the global, per-step seeded RNG.
        self.physics.noise_model.rng = None

        self.model = build_model(cfg, self.device, control=self.control, load_weights=resume_from is None)
        self.model.on_solve = self._on_solve
        self.model.on_fixed_point = self._on_fixed_point
        jac = cfg.jacobian
        self.penalty = JacobianSpectralPenalty(weight=jac.penalty, target=jac.target, iters=jac.power_iters,
                                               samples=jac.samples)
        self._fixed_points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fixed_point_cache = FixedPointCache() if cfg.loss.reuse_fixed_points else None
        # weights and optimiser state at the last spectral-radius check that passed (for rollback)
        self._good_state: Optional[tuple[int, dict, dict]] = None
        gaussian = cfg.physics.noise == "gaussian" and cfg.loss.mc_noise_floor
        self.loss = TrainingLoss(cfg.loss, noise_floor=cfg.physics.noise_sigma ** 2 if gaussian else 0.0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = self._make_scheduler()
        self.step = 0
        self.history: list[dict] = []
        self.last_validation: dict = {}
        self._pending_solves: list[tuple[str, SolveStats]] = []
        #: the last ``inspect.keep_steps`` steps' recorded solves (read through between_steps / recordings_of)
        self._recordings: OrderedDict[int, StepRecordings] = OrderedDict()
        self._failed_in_a_row = 0
        self.last_checkpoint: Optional[Path] = None
        self._penalty_count: Optional[int] = None  # distributed: this rank's samples of the penalty
        if resume_from is not None:
            self.restore(resume_from)

    # -- setup ------------------------------------------------------------------------------
    def _data_source(self, noise_rng: torch.Generator, supervised: bool):
        """(train y, train ground truth or None, val y, val references or None, physics).

        Images (phantoms, image files) are simulated through the config's physics;
        files of raw measurements (k-space, sinograms) are used as measured, with a
        physics built from their own sampling mask / angles.
        """
        cfg = self.config
        measured = load_measurement_data(cfg.data, cfg.physics)
        if measured is None:
            train_images, val_images = load_training_images(cfg.data, cfg.physics)
            self.physics = build_physics(cfg.physics, self.device, rng=noise_rng)
            train_y, val_y = self._simulate(train_images), self._simulate(val_images)
            to_x = lambda images: to_model_space(torch.from_numpy(images)[:, None], self.modality).to(self.device)
            return train_y, to_x(train_images) if supervised else None, val_y, to_x(val_images), self.physics
        train, val = measured
        if supervised and train.reference is None:
            raise ConfigError(f"loss.mode = 'supervised' needs reference images, but {train.source} holds "
                              "measurements only; use loss.mode = 'ei' or 'mc'")
        self.data_notes = list(dict.fromkeys(train.notes))  # logged when the run starts
        physics = measurement_physics(cfg.physics, train, self.device, rng=noise_rng)
        move = lambda t: None if t is None else t.to(self.device)
        return move(train.y), move(train.reference), move(val.y), move(val.reference), physics

    def _simulate(self, images: np.ndarray) -> torch.Tensor:
        x = to_model_space(torch.from_numpy(np.ascontiguousarray(images))[:, None], self.modality).to(self.device)
        with torch.no_grad():
            return torch.cat([self.physics(chunk) for chunk in x.split(SIMULATION_CHUNK)])

    def _make_scheduler(self):
        cfg = self.config.optim
        if cfg.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.steps)
        if cfg.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=max(1, cfg.steps // 3), gamma=0.3)
        return None

    def _on_solve(self, direction: str, stats: SolveStats) -> None:
        self._pending_solves.append((direction, stats))

    def _on_fixed_point(self, y: torch.Tensor, x_star: torch.Tensor) -> None:
        self._fixed_points.append((y, x_star))

    def _log(self, level: str, message: str) -> None:
        self.observers.emit(LogMessage(level=level, message=message))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> str:
        """Train to ``optim.steps``; returns ``completed``, ``stopped`` or ``failed``."""
        # commands from other threads run here, between steps; the run directory records the solves,
        # snapshots and end of the run (engine.run_record)
        with self.control.serving(), record_run(self.observers, self.run_dir):
            return self._run()

    def _run(self) -> str:
        cfg = self.config
        total = cfg.optim.steps
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / CONFIG_FILE)
            remove_stale_temp_files(self.run_dir)  # what killed saves left behind
        dropped = truncate_run(self.run_dir, self.step) if self.run_dir is not None else 0
        self.observers.emit(RunStarted(run_dir=str(self.run_dir) if self.run_dir else None, config=cfg.to_dict(),
                                       device=str(self.device), total_steps=total, start_step=self.step))
        self._log("info", f"training on {self.device} ({self.threads} threads): {describe(cfg.physics)}, "
                          f"{len(self.train_set)} training measurements, loss {cfg.loss.mode}, gradient {cfg.deq.gradient}")
        for note in self.data_notes:
            self._log("warning", note)
        oversubscribed = oversubscription_note(self.threads)
        if oversubscribed:
            self._log("warning", oversubscribed)
        if dropped:
            self._log("info", f"{METRICS_FILE}: removed {dropped} records of steps after {self.step}, "
                              "the checkpoint this run continues from")
        try:
            if self.loss.needs_alpha:
                self._balance_alpha()
            if self.step == 0:
                self.validate()
            while self.step < total:
                if self.dist is not None:  # no pausing under torchrun; a stop is agreed by all ranks (a collective)
                    if self._stop_requested(sync=True):
                        break
                elif not self.control.wait_while_paused() or self.control.stopped:
                    break
                try:
                    self.train_step()
                except StepFailed as failure:
                    if self._stop_requested():  # the user's stop, not a failure: discard the partial step
                        self._log("info", f"stopped during step {self.step + 1}; that step was not applied")
                        break
                    self._failed_in_a_row += 1
                    self._log("error", f"step {self.step + 1} not applied: {failure}")
                    self._alarm(failure)
                    if self._failed_in_a_row >= MAX_FAILED_STEPS:
                        kept = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
                        message = f"stopped after {MAX_FAILED_STEPS} failed steps in a row: {failure}{kept}"
                        self.observers.emit(RunFailed(message=message, step=self.step))
                        self.observers.emit(RunFinished(reason="failed", step=self.step, run_dir=self._run_dir_str()))
                        return "failed"
                    continue
                if self._stop_requested():
                    break
                if self.step % cfg.run.validate_every == 0 or self.step == total:
                    self.validate()
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0 and self.step < total:
                    self._checkpoint()
            reason = "completed" if self.step >= total else "stopped"
            self._checkpoint()
            self.observers.emit(RunFinished(reason=reason, step=self.step, run_dir=self._run_dir_str()))
            return reason
        except EquiDEQError as exc:
            self.observers.emit(RunFailed(message=str(exc), step=self.step))
            self.observers.emit(RunFinished(reason="failed", step=self.step, run_dir=self._run_dir_str()))
            return "failed"

    def _stop_requested(self, sync: bool = False) -> bool:
        """The user's stop; distributed, the ranks' agreed one (``sync``: agree now, a collective)."""
        if self.dist is None:
            return self.control.stopped
        if sync:
            self._agreed_stop = ddp.any_rank(self.control.stopped or self._agreed_stop)
        return self._agreed_stop

    def _run_dir_str(self) -> Optional[str]:
        return str(self.run_dir) if self.run_dir else None

    def _balance_alpha(self) -> None:
        self._seed(-1)
        y = self.train_set.measurements[self._batch_indices(0)]
        self.model.train()
        if self.dist is None:
            alpha = self.loss.balance_alpha(self.model, y, self.physics, self.model.parameters())
        else:  # rank 0 balances on the whole first batch (as one process would); the others take its alpha
            alpha = self.loss.balance_alpha(self.model, y, self.physics, self.model.parameters()) \
                if self.dist.is_main else float("nan")
            self.loss.alpha = alpha = ddp.broadcast_float(alpha)
            self.model.zero_grad(set_to_none=True)
        self._pending_solves.clear()
        self._log("info", f"EI weight alpha = {alpha:.4g} (auto: balances the EI and MC gradients on the first batch)")

    def _seed(self, step: int) -> None:
        """Seed everything random in step ``step`` (global RNG: EI noise; the EI transform's own RNG)."""
        seed = seed_for_step(self.config.run.seed, step)
        torch.manual_seed(seed)
        self.loss.reseed(seed)

    def _batch_indices(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed_for_step(self.config.data.seed, step))
        n = len(self.train_set)
        return torch.randperm(n, generator=generator)[: min(self.config.optim.batch_size, n)].to(self.device)

    def train_step(self) -> dict[str, float]:
        """One optimisation step; raises :class:`StepFailed` (nothing applied) on divergence or NaN."""
        cfg = self.config
        started = time.perf_counter()
        next_step = self.step + 1
        self._seed(next_step)
        idx = self._batch_indices(next_step)
        share = 1.0  # this rank's share of the global batch (distributed: weights its loss and gradient)
        if self.dist is not None:
            self._global_batch = len(idx)
            idx = self.dist.shard(idx)
            share = len(idx) / self._global_batch
        y = self.train_set.measurements[idx]
        x = self.train_set.ground_truth[idx] if self.loss.needs_ground_truth else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending_solves.clear()
        self._fixed_points.clear()
        stability: dict = {}
        solves: list = []
        recording = cfg.inspect.record
        if recording:  # the weights these solves run with, for replays after they have moved on
            step_weights = self.weights_copy()
            self.model.recorder_factory = self._new_recorder
        try:
            x_init = None
            if self._fixed_point_cache is not None:
                x_init = self._fixed_point_cache.start(idx, lambda: self.model.initial(y, self.physics))
            loss = self.loss(self.model, y, self.physics, x, x_init=x_init)
            # the first model call's measurements and fixed points: the batch's own reconstructions
            y_fp, x_fp = self._fixed_points[0] if self._fixed_points else (None, None)
            if self.penalty.active and x_fp is not None:
                stability["jacobian_norm"] = self._add_jacobian_penalty(loss, y_fp, x_fp, next_step)
            finite = bool(torch.isfinite(loss.total))
            if self.dist is not None and ddp.any_rank(not finite):
                raise StepFailed(f"loss is not finite on a rank (rank {self.dist.rank}: {loss.as_floats()})")
            if not finite:
                raise StepFailed(f"loss is not finite ({loss.as_floats()})")
            (loss.total if self.dist is None else loss.total * share).backward()
            solves, self._pending_solves = self._pending_solves, []
            self._emit_solves(solves, next_step)
            if self.dist is None:
                for i, (direction, stats) in enumerate(solves):
                    if stats.failed:
                        sample, reason = next((b, r) for b, r in enumerate(stats.stop_reasons) if r in FAILURE_REASONS)
                        raise StepFailed(f"{direction} solve {', '.join(sorted(set(stats.stop_reasons)))} "
                                         f"({stats.summary()})", direction, f"call {i}", sample, reason)
            else:
                solves_per_rank = self._agree_on_solves(solves)
            if self._stop_requested():
                raise StepFailed("stopped by the user during the step")
            if self.dist is not None:  # each rank's gradient is its share's: their sum is the whole batch's
                ddp.all_reduce_gradients([p for p in self.model.parameters() if p.requires_grad])
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf")))
            if not math.isfinite(grad_norm):
                raise StepFailed("gradient is not finite")
        except StepFailed as failure:
            self.optimizer.zero_grad(set_to_none=True)
            if recording:  # the failed step's solves (those before a non-finite loss too)
                solves = solves or self._pending_solves
                self._keep_recordings(next_step, solves, step_weights, failed=True, message=str(failure))
            raise
        finally:
            self.model.recorder_factory = None
        if recording:
            self._keep_recordings(next_step, solves, step_weights)
        if self._fixed_point_cache is not None and x_fp is not None:
            self._fixed_point_cache.store(idx, x_fp)
        monitor = cfg.jacobian.monitor_every
        rolled_back = False
        if monitor and next_step % monitor == 0 and x_fp is not None:
            stability.update(self._check_stability(y_fp, x_fp, next_step))
            rolled_back = stability["safeguard"] == "rolled_back"
        if not rolled_back:  # a rollback has restored the last good weights: this step's update is dropped
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = next_step
        self._failed_in_a_row = 0
        values = loss.as_floats()
        if self.dist is not None:  # the whole batch's values: the share-weighted sum of the ranks'
            keys = sorted(values)
            values = dict(zip(keys, ddp.all_reduce_floats([share * values[k] for k in keys])))
            if "jacobian_norm" in stability:
                stability["jacobian_norm"] = ddp.all_reduce_floats([stability["jacobian_norm"]], op="max")[0]
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": self.step, **values, "lr": lr, "grad_norm": grad_norm,
                  "seconds": time.perf_counter() - started}
        record.update(stability)
        if self.penalty.active:
            record["jacobian_weight"] = self.penalty.weight
        if self.dist is None:
            for direction, stats in solves:
                record.setdefault(f"{direction}_iterations", 0)
                record[f"{direction}_iterations"] = max(record[f"{direction}_iterations"], stats.max_iterations_used)
        else:
            record.update(self._per_rank_solve_record(solves_per_rank))
        self.history.append(record)
        self._write_metrics(record)
        self.observers.emit(StepFinished(step=self.step, losses=values, lr=lr, seconds=record["seconds"],
                                         grad_norm=grad_norm))
        return values

    # -- distributed agreement (engine.distributed) ----------------------------------------------
    def _agree_on_solves(self, solves) -> list:
        """Gather every rank's solve summaries and stop flag (a collective); raise on any rank's failed solve."""
        mine = [(direction, int(stats.max_iterations_used), list(stats.stop_reasons), bool(stats.failed))
                for direction, stats in solves]
        gathered = ddp.gather_objects({"solves": mine, "stop": bool(self.control.stopped)})
        self._agreed_stop = self._agreed_stop or any(g["stop"] for g in gathered)
        per_rank = [g["solves"] for g in gathered]
        for rank, rank_solves in enumerate(per_rank):
            for i, (direction, iterations, reasons, failed) in enumerate(rank_solves):
                if failed:
                    sample, reason = next((b, r) for b, r in enumerate(reasons) if r in FAILURE_REASONS)
                    raise StepFailed(f"{direction} solve {', '.join(sorted(set(reasons)))} on rank {rank} "
                                     f"({iterations} iterations)", direction, f"call {i}, rank {rank}",
                                     rank + sample * self.dist.world_size, reason)
        return per_rank

    @staticmethod
    def _per_rank_solve_record(per_rank: list) -> dict:
        """``{direction}_iterations`` (max over ranks) and, per rank, the iterations and stop-reason counts."""
        record: dict = {}
        directions = sorted({d for rank_solves in per_rank for d, *_ in rank_solves})
        for direction in directions:
            iterations, reasons = [], []
            for rank_solves in per_rank:
                mine = [(it, rs) for d, it, rs, _ in rank_solves if d == direction]
                iterations.append(max((it for it, _ in mine), default=0))
                counts: dict = {}
                for _, rs in mine:
                    for r in rs:
                        counts[r] = counts.get(r, 0) + 1
                reasons.append(counts)
            record[f"{direction}_iterations"] = max(iterations)
            record[f"{direction}_iterations_per_rank"] = iterations
            record[f"{direction}_stop_reasons_per_rank"] = reasons
        return record

    # -- keeping F contractive ------------------------------------------------------------------
    def _add_jacobian_penalty(self, loss, y_fp: torch.Tensor, x_fp: torch.Tensor, step: int) -> float:
        """Add the term ``jacobian`` = mean ``max(||dF/dx|| - target, 0)`` (weight mu) to ``loss``; returns max ||dF/dx||."""
        generator = torch.Generator(device=x_fp.device).manual_seed(seed_for_step(self.config.run.seed, step) + 1)
        if self.dist is not None:  # this rank's part of the global batch's first `samples` samples
            limit = min(self.penalty.samples, self._global_batch)
            k = self.dist.count_below(limit)
            share = len(x_fp) / self._global_batch
            if k == 0:
                loss.terms["jacobian"] = torch.zeros((), device=x_fp.device)
                return float("-inf")
            fn = self.model.fixed_point_map(y_fp[:k], self.physics, relaxed=False)
            norms = self.penalty.norms(fn, x_fp[:k], generator)
            # divided by the share the whole objective is multiplied with: the ranks sum to the global mean
            hinge = torch.clamp(norms - self.penalty.target, min=0).sum() / (limit * share)
            loss.terms["jacobian"] = hinge
            loss.total = loss.total + self.penalty.weight * hinge
            return float(norms.detach().max())
        fn = self.model.fixed_point_map(y_fp[: self.penalty.samples], self.physics, relaxed=False)
        norms = self.penalty.norms(fn, x_fp, generator)
        hinge = torch.clamp(norms - self.penalty.target, min=0).mean()
        loss.terms["jacobian"] = hinge
        loss.total = loss.total + self.penalty.weight * hinge
        return float(norms.detach().max())

    def spectral_radius(self, y: torch.Tensor, x_star: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Per-sample spectral radius of the iterated map's Jacobian at ``x_star`` (first ``jacobian.samples``)."""
        n = self.config.jacobian.samples
        generator = torch.Generator(device=x_star.device).manual_seed(seed_for_step(self.config.run.seed, step) + 2)
        return self.model.spectral_radius(y[:n], self.physics, x_star[:n], generator=generator)

    def _check_stability(self, y_fp: torch.Tensor, x_fp: torch.Tensor, step: int) -> dict:
        """Estimate the spectral radius at this step's fixed points; act when it is above the limit."""
        jac = self.config.jacobian
        if self.dist is None:
            radius = float(self.spectral_radius(y_fp, x_fp, step).max())
        else:  # the largest over the ranks' parts of the global batch's first `samples` samples
            k = self.dist.count_below(min(jac.samples, self._global_batch))
            local = float(self.spectral_radius(y_fp[:k], x_fp[:k], step).max()) if k else float("-inf")
            radius = ddp.all_reduce_floats([local if math.isfinite(local) or local < 0 else float("inf")],
                                           op="max")[0]
        action, message = "none", ""
        if not math.isfinite(radius) or radius > jac.radius_limit:
            if jac.safeguard != "off":
                old = self.penalty.weight
                self.penalty.weight = max(2.0 * old, MIN_SAFEGUARD_PENALTY)
                action = "strengthened"
                message = (f"step {step}: spectral radius of dF/dx at the fixed point is {radius:.3f} "
                           f"(> {jac.radius_limit:g}); Jacobian penalty weight {old:g} -> {self.penalty.weight:g}")
                if jac.safeguard == "rollback" and self._good_state is not None:
                    good_step, model_state, optim_state = self._good_state
                    self.model.load_state_dict(model_state)
                    self.optimizer.load_state_dict(optim_state)
                    action = "rolled_back"
                    message += f"; weights and optimiser restored to those of step {good_step}"
                self._log("warning", message)
            else:
                message = (f"step {step}: spectral radius of dF/dx at the fixed point is {radius:.3f} "
                           f"(> {jac.radius_limit:g}); safeguard off")
                self._log("warning", message)
        elif jac.safeguard == "rollback":  # copies: the live tensors change with the next optimiser step
            self._good_state = (step - 1, {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                                copy.deepcopy(self.optimizer.state_dict()))
        self.observers.emit(StabilityChecked(step=step, spectral_radius=radius, limit=jac.radius_limit,
                                             penalty_weight=self.penalty.weight, action=action, message=message))
        return {"spectral_radius": radius, "safeguard": action}

    # -- recorded solves (the Solver Inspector's data) -------------------------------------------
    def _new_recorder(self, direction: str) -> SolveRecorder:
        return SolveRecorder(direction, max_frames=self.config.inspect.frames)

    def _keep_recordings(self, step: int, solves, weights: dict, failed: bool = False, message: str = "") -> None:
        recordings = []
        for i, (_, stats) in enumerate(solves):
            if stats.recording is not None:
                stats.recording.step, stats.recording.tag = step, f"call {i}"
                recordings.append(stats.recording)
        self._recordings[step] = StepRecordings(step, recordings, weights, failed, message)
        while len(self._recordings) > self.config.inspect.keep_steps:
            self._recordings.popitem(last=False)

    def recorded_steps(self) -> list[int]:
        """Steps whose solves are kept (oldest first); call between steps (:meth:`between_steps`)."""
        return list(self._recordings)

    def recordings_of(self, step: Optional[int] = None) -> Optional[StepRecordings]:
        """The recorded solves of ``step`` (default: the newest kept step), or None."""
        if not self._recordings:
            return None
        return self._recordings.get(step) if step is not None else next(reversed(self._recordings.values()))

    def _alarm(self, failure: StepFailed) -> None:
        """A step failed on a solve: say so, and pause when asked to (``control.pause_on_divergence``)."""
        if failure.direction is None:
            return
        paused = bool(self.control.pause_on_divergence) and not self.control.stopped
        if paused:
            self.control.pause()
            self._log("warning", f"paused at step {self.step + 1}: the {failure.direction} solve ({failure.tag}) "
                                 f"{failure.stop_reason.replace('_', ' ')}; inspect it, then resume or stop")
        self.observers.emit(SolveAlarm(step=self.step + 1, direction=failure.direction, tag=failure.tag,
                                       sample=failure.sample, stop_reason=failure.stop_reason,
                                       message=str(failure), paused=paused))

    def _emit_solves(self, solves, step: int) -> None:
        if not self.observers.active:
            return
        for i, (direction, stats) in enumerate(solves):
            self.observers.emit(stats.to_event(direction, step=step, tag=f"call {i}"))

    # -- validation, checkpoints ------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Validation metrics (:func:`engine.evaluation.score`), the spectral radius and a snapshot."""
        problem = Problem(self.val_y, self.physics, self.modality, self.val_x)
        self._fixed_points.clear()
        x_hat = solve(self.model, problem, chunk=None)
        x_base = baseline(self.physics, self.val_y)
        self._pending_solves.clear()
        fixed_points = self._fixed_points[:1]
        model_scores, base_scores = score(problem, x_hat), score(problem, x_base)
        result = {"step": self.step, "domain": problem.domain,
                  "psnr": float(model_scores.psnr.mean()), "ssim": float(model_scores.ssim.mean()),
                  "baseline_psnr": float(base_scores.psnr.mean()), "baseline_ssim": float(base_scores.ssim.mean()),
                  "residual": float(model_scores.residual.mean()),
                  "baseline_residual": float(base_scores.residual.mean())}
        if self.config.jacobian.monitor_every and fixed_points:
            result["spectral_radius"] = float(self.spectral_radius(*fixed_points[0], step=self.step).max())
        first = self.val_x[:1] if self.val_x is not None else x_hat[:1]
        result["equivariance_error"] = equivariance_error(lambda y: self.model(y, self.physics), self.physics,
                                                          first, angles=[37.0])
        self._pending_solves.clear()
        self.last_validation = result
        self._write_metrics({"validation": result})
        self.observers.emit(ValidationFinished(**{k: result[k] for k in ValidationFinished.__dataclass_fields__
                                                  if k in result}))
        if self.observers.active:
            shown = reconstruction_of(problem.subset([0]), x_hat[:1], x_base[:1])
            self.observers.emit(Snapshot(step=self.step, measurement=shown.measurement, baseline=shown.baseline[0],
                                         reconstruction=shown.reconstruction[0],
                                         reference=None if shown.reference is None else shown.reference[0],
                                         mask=shown.mask, modality=self.modality))
        return result

    def _write_metrics(self, record: dict) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def make_checkpoint(self) -> Checkpoint:
        """The current state as a :class:`Checkpoint` of *copies* (call between steps: see :meth:`save_checkpoint`).

        Copies, because on the CPU ``.cpu()`` returns the live parameter and the
        optimiser's ``state_dict()`` holds its live moment tensors: a checkpoint
        written while the next step runs would mix two steps.
        """
        return Checkpoint(
            model_state=self.weights_copy(),
            config=self.config.to_dict(),
            step=self.step,
            optimizer_state=copy.deepcopy(self.optimizer.state_dict()),
            scheduler_state=copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
            metrics={"ei_weight": self.loss.alpha if self.loss.alpha is not None else float("nan"),
                     "jacobian_weight": float(self.penalty.weight),
                     **{k: v for k, v in self.last_validation.items() if isinstance(v, float)}},
            rng_state=capture_rng_state(),
            physics=describe(self.config.physics),
            software_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def weights_copy(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state dict (call between steps, or through :meth:`between_steps`)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def between_steps(self, command):
        """Run ``command()`` in the training thread between steps and return its result (any thread).

        While no run is in its loop the command runs at once. Blocks the caller
        for at most the rest of the current step.
        """
        return self.control.submit(command).result()

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save the current state to ``path`` (atomic) from any thread; returns the path.

        The state is captured between steps by the training thread; the file is
        written by the calling thread.
        """
        path = save_checkpoint(path, self.between_steps(self.make_checkpoint))
        self.observers.emit(CheckpointSaved(step=self.step, path=str(path)))
        return Path(path)

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        ext = "safetensors" if self.config.run.checkpoint_format == "safetensors" else "pt"
        path = self.save_checkpoint(self.run_dir / checkpoint_name(self.step, ext))
        # last.<ext> always names the newest complete checkpoint (copied, then renamed: atomic)
        latest = self.run_dir / f"last.{ext}"
        publish_latest(path, latest)
        self.last_checkpoint = latest

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint: model, optimiser, scheduler, step, alpha."""
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, self.config)
        check_resume_state(ckpt, self.model, self.optimizer, self.scheduler)  # refuse before loading anything
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.scheduler is not None and ckpt.scheduler_state is not None:
            self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.step = int(ckpt.step)
        alpha = ckpt.metrics.get("ei_weight")
        if self.loss.mode == "ei" and alpha is not None and math.isfinite(alpha):
            self.loss.alpha = float(alpha)
        weight = ckpt.metrics.get("jacobian_weight")  # the safeguard may have raised it
        if weight is not None and math.isfinite(weight):
            self.penalty.weight = float(weight)
        self.last_checkpoint = Path(path)
