"""Trainer: self-supervised training without ground truth, exact resume, divergence handling, events."""

import json

import pytest
import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.config import ExperimentConfig
from engine.events import (CheckpointSaved, Observers, RunControl, RunFailed, RunFinished, Snapshot, SolveFinished,
                           StepFinished, ValidationFinished)
from engine.trainer import GroundTruthLocked, Trainer


def tiny_config(**changes) -> ExperimentConfig:
    base = {
        "physics.img_size": 32, "physics.views": 12, "data.n_train": 8, "data.n_val": 2,
        "model.channels": 8, "model.depth": 1, "solver.tol": 1e-3, "solver.max_iter": 30,
        "backward_solver.tol": 1e-3, "backward_solver.max_iter": 30, "optim.steps": 3, "optim.batch_size": 2,
        "optim.lr": 1e-3, "run.validate_every": 1, "run.checkpoint_every": 0, "run.threads": 1,
    }
    base.update(changes)
    return ExperimentConfig().replace(**base)


def collect():
    events = []
    observers = Observers()
    observers.add(events.append)
    return events, observers


def params(trainer):
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).clone()


def test_self_supervised_run_never_reads_training_ground_truth(tmp_path):
    events, observers = collect()
    trainer = Trainer(tiny_config(), run_dir=tmp_path, observers=observers)
    with pytest.raises(GroundTruthLocked):
        trainer.train_set.ground_truth
    before = params(trainer)
    assert trainer.run() == "completed"
    assert not torch.equal(before, params(trainer))  # it did learn, from measurements alone
    steps = [e for e in events if isinstance(e, StepFinished)]
    assert [e.step for e in steps] == [1, 2, 3]
    assert set(steps[0].losses) == {"mc", "ei", "total"}
    assert all(torch.isfinite(torch.tensor(e.losses["total"])) for e in steps)
    solves = [e for e in events if isinstance(e, SolveFinished) and e.step == 1]
    assert sorted(e.direction for e in solves) == ["backward", "backward", "forward", "forward"]
    assert any(isinstance(e, ValidationFinished) for e in events)
    snapshot = next(e for e in events if isinstance(e, Snapshot))
    assert snapshot.reconstruction.shape == (32, 32) and snapshot.measurement.ndim == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "step" in r and "total" in r] == [1, 2, 3]
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "last.pt").is_file()
    assert isinstance(events[-1], RunFinished) and events[-1].reason == "completed"


def test_supervised_run_uses_ground_truth():
    trainer = Trainer(tiny_config(**{"loss.mode": "supervised", "optim.steps": 1}))
    assert trainer.train_set.ground_truth.shape == (8, 1, 32, 32)
    assert trainer.run() == "completed"
    assert "supervised" in trainer.history[-1]


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(**{"optim.steps": 4, "run.checkpoint_every": 2, "run.validate_every": 10})
    straight = Trainer(cfg, run_dir=tmp_path / "straight")
    straight.run()

    # the same run, interrupted after step 2 (as a kill after the step-2 checkpoint would)
    control = RunControl()
    observers = Observers()
    observers.add(lambda e: control.stop() if isinstance(e, StepFinished) and e.step == 2 else None)
    first = Trainer(cfg, run_dir=tmp_path / "half", observers=observers, control=control)
    assert first.run() == "stopped"
    resumed = Trainer(cfg, run_dir=tmp_path / "resumed", resume_from=tmp_path / "half" / "last.pt")
    assert resumed.step == 2
    resumed.run()
    assert torch.equal(params(straight), params(resumed))
    assert [r["total"] for r in straight.history[2:]] == [r["total"] for r in resumed.history]


def test_diverging_solves_skip_steps_and_keep_last_good_checkpoint(tmp_path):
    events, observers = collect()
    cfg = tiny_config(**{"optim.steps": 6, "run.checkpoint_every": 1, "solver.fallback": ""})
    trainer = Trainer(cfg, run_dir=tmp_path, observers=observers)
    trainer.config = cfg.replace(**{"optim.steps": 2})
    trainer.run()
    good = params(trainer)
    assert load_checkpoint(tmp_path / "last.pt").step == 2

    class Exploding(nn.Module):  # expansive: the forward solve must be reported as diverged
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(1.8))

        def forward(self, x, sigma=None):
            return self.gain * x + 0.1

    trainer.model.operator.denoiser = Exploding()
    trainer.model.forward_solver.name = "fixed_point"  # Anderson would solve this affine map exactly
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=1e-3)
    trainer.config = cfg
    events.clear()
    assert trainer.run() == "failed"
    assert trainer.step == 2  # no update applied
    failure = next(e for e in events if isinstance(e, RunFailed))
    assert "diverged" in failure.message and "last good checkpoint" in failure.message
    assert load_checkpoint(tmp_path / "last.pt").step == 2
    assert float(trainer.model.operator.denoiser.gain.detach()) == pytest.approx(1.8)


def test_stop_request_ends_run_between_steps_with_a_checkpoint(tmp_path):
    control = RunControl()
    events, observers = collect()
    observers.add(lambda e: control.stop() if isinstance(e, StepFinished) and e.step == 1 else None)
    trainer = Trainer(tiny_config(**{"optim.steps": 50}), run_dir=tmp_path, observers=observers, control=control)
    assert trainer.run() == "stopped"
    assert trainer.step == 1
    assert any(isinstance(e, CheckpointSaved) for e in events)
    assert load_checkpoint(tmp_path / "last.pt").step == 1
