"""Data-parallel training (engine.distributed): 2 gloo processes on the CPU match one process.

The ranks run in processes started by ``torch.multiprocessing.spawn`` (the same code path
as under torchrun: a process group, each rank its ``indices[rank::2]`` shard of the same
global batch, gradients all-reduced after the DEQ's backward, rank 0 writing the run).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import DistContext, all_reduce_gradients, any_rank
from engine.events import Observers, RunControl, StepFinished
from engine.trainer import Trainer
from tests.test_trainer import params, tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def exact_config(**changes):
    """A tiny EI run whose every random draw is the same for a shard as for the whole batch
    (EI noise off: the noise on A T_g x is drawn per shard)."""
    base = {"optim.batch_size": 4, "optim.steps": 4, "loss.ei_apply_noise": False, "run.validate_every": 100,
            "run.checkpoint_every": 0, "jacobian.monitor_every": 0}
    base.update(changes)
    return tiny_config(**base)


def grads(trainer) -> torch.Tensor:
    """The gradient the step just applied (all-reduced when distributed)."""
    return torch.cat([p.grad.detach().reshape(-1) for p in trainer.model.parameters() if p.grad is not None]).clone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg_dict: dict, run_dir: str, out: str, stop_at: int, resume: str) -> None:
    from engine.config import ExperimentConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        control, observers = RunControl(), Observers()
        first_grads = []
        observers.add(lambda e: first_grads.append(grads(trainer)) if isinstance(e, StepFinished) and e.step == 1
                      else None)
        if stop_at:  # a stop request arriving on one rank only: the ranks must agree and stop together
            observers.add(lambda e: control.stop() if isinstance(e, StepFinished) and e.step == stop_at
                          and rank == 1 else None)
        trainer = Trainer(ExperimentConfig.from_dict(cfg_dict), run_dir=run_dir, observers=observers,
                          control=control, resume_from=resume or None, device="cpu",
                          distributed=DistContext(rank=rank, world_size=WORLD, local_rank=rank))
        reason = trainer.run()
        torch.save({"reason": reason, "step": trainer.step, "params": params(trainer),
                    "history": trainer.history, "alpha": trainer.loss.alpha,
                    "first_grads": first_grads[0] if first_grads else None}, f"{out}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(cfg, run_dir, tmp_path, stop_at: int = 0, resume: str = "") -> list[dict]:
    out = str(tmp_path / f"result-{os.path.basename(str(run_dir))}")
    mp.spawn(_worker, args=(_free_port(), cfg.to_dict(), str(run_dir), out, stop_at, resume), nprocs=WORLD)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def test_two_processes_match_one_and_resume(tmp_path):
    cfg = exact_config()
    events = Observers()
    single_grads = []
    single = Trainer(cfg, run_dir=tmp_path / "single", observers=events)
    events.add(lambda e: single_grads.append(grads(single)) if isinstance(e, StepFinished) and e.step == 1 else None)
    assert single.run() == "completed"

    # 2 ranks, stopped after step 2 (requested on rank 1 only), then resumed on 2 ranks from rank 0's checkpoint
    first = run_distributed(cfg, tmp_path / "dist", tmp_path, stop_at=2)
    assert [r["reason"] for r in first] == ["stopped", "stopped"] and [r["step"] for r in first] == [2, 2]
    assert torch.equal(first[0]["params"], first[1]["params"])  # the ranks keep the same state
    assert (tmp_path / "dist" / "last.pt").is_file()
    resumed = run_distributed(cfg, tmp_path / "dist", tmp_path, resume=str(tmp_path / "dist" / "last.pt"))
    assert [r["reason"] for r in resumed] == ["completed", "completed"]
    assert torch.equal(resumed[0]["params"], resumed[1]["params"])
    assert first[0]["alpha"] == pytest.approx(single.loss.alpha, rel=1e-6)

    # the same gradient as one process over the same global batch (step 1: the same weights) ...
    g1, g = first[0]["first_grads"], single_grads[0]
    print("step-1 gradient: max |difference| / max |g| =", float((g1 - g).abs().max() / g.abs().max()))
    torch.testing.assert_close(g1, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
    # ... and then the same losses and weights, up to float32 rounding amplified by the solvers' per-sample
    # stopping (tol 1e-3) and Adam's sign-like first steps
    losses = torch.tensor([h["total"] for h in first[0]["history"] + resumed[0]["history"]])
    print("losses", losses.tolist(), [h["total"] for h in single.history])
    print("weights: max |difference| =", float((resumed[0]["params"] - params(single)).abs().max()))
    torch.testing.assert_close(losses, torch.tensor([h["total"] for h in single.history]), rtol=1e-3, atol=0)
    torch.testing.assert_close(resumed[0]["params"], params(single), rtol=0, atol=4 * cfg.optim.lr)

    # rank 0 alone wrote the run: every step once, with per-rank solve statistics
    records = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert len(r["forward_iterations_per_rank"]) == WORLD
        assert r["forward_iterations"] == max(r["forward_iterations_per_rank"])
        assert all(sum(c.values()) > 0 for c in r["backward_stop_reasons_per_rank"])


def _collectives_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2))
        a.grad = torch.full((3,), float(rank + 1))
        if rank == 1:  # a gradient only one rank has counts as zero on the others
            b.grad = torch.ones(2)
        all_reduce_gradients([a, b])
        torch.save({"a": a.grad, "b": b.grad, "any": any_rank(rank == 1), "none": any_rank(False)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gradient_all_reduce(tmp_path):
    out = str(tmp_path / "c")
    mp.spawn(_collectives_worker, args=(_free_port(), out), nprocs=WORLD)
    for rank in range(WORLD):
        r = torch.load(f"{out}.{rank}")
        assert torch.equal(r["a"], torch.full((3,), 3.0)) and torch.equal(r["b"], torch.ones(2))
        assert r["any"] is True and r["none"] is False


def test_shards_follow_distributed_sampler():
    indices = torch.tensor([5, 1, 7, 3, 0])
    shards = [DistContext(rank=r, world_size=2, local_rank=r).shard(indices) for r in range(2)]
    assert shards[0].tolist() == [5, 7, 0] and shards[1].tolist() == [1, 3]
    assert [DistContext(rank=r, world_size=2, local_rank=r).count_below(3) for r in range(2)] == [2, 1]
