"""Data-parallel training (engine.distributed): 2 gloo processes on the CPU match one process.

The ranks run in processes started by ``torch.multiprocessing.spawn`` (the same code path
as under torchrun: a process group, each rank its ``indices[rank::2]`` shard of the same
global batch, gradients all-reduced after the DEQ's backward, rank 0 writing the run).
A real ``torchrun`` job of ``equideq train``, killed with SIGKILL mid-run, resumes from its
last checkpoint with every step recorded once (:func:`test_killed_torchrun_job_resumes`). Two torchrun
agents in separate working directories play a two-machine job of 3 ranks with uneven shards
(:func:`test_two_machine_torchrun_job_with_uneven_shards_matches_one_process`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.checkpoint import load_checkpoint
from engine.distributed import DistContext, all_reduce_gradients, any_rank
from engine.events import Observers, RunControl, StepFinished
from engine.trainer import Trainer
from tests.test_trainer import params, tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def exact_config(**changes):
    """A tiny EI run whose every random draw is the same for a shard as for the whole batch
    (EI noise off: the noise on A T_g x is drawn per shard), with a denoiser that is contractive at its
    random initialisation (spectral norm, no GroupNorm), so every solve converges (6-7 iterations) and the
    ranks' results differ from one process's by float32 rounding, not by where a capped solve stopped."""
    base = {"optim.batch_size": 4, "optim.steps": 4, "loss.ei_apply_noise": False, "run.validate_every": 100,
            "run.checkpoint_every": 0, "jacobian.monitor_every": 0, "model.norm": "none"}
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
    # ... and then the same losses and weights, up to float32 rounding carried through converged solves (tol
    # 1e-3; measured 1e-7 relative) and Adam's sign-like first steps (a component whose sign rounding could flip)
    losses = torch.tensor([h["total"] for h in first[0]["history"] + resumed[0]["history"]])
    print("losses", losses.tolist(), [h["total"] for h in single.history])
    print("weights: max |difference| =", float((resumed[0]["params"] - params(single)).abs().max()))
    torch.testing.assert_close(losses, torch.tensor([h["total"] for h in single.history]), rtol=1e-4, atol=0)
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


# -- a killed torchrun job resumes --------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _descendants(root: int) -> list[int]:
    """``root``'s living descendants (Linux /proc): torchrun starts its workers in sessions of their own, so
    killing torchrun's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process it started, all at once (as a crashed machine would stop them)."""
    pids = [proc.pid] + _descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # the workers are reaped by init, not by us: wait until they are gone
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _torchrun(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
            "-m", "engine.cli", "--threads", "1", "train", "--config", str(config), "--out", str(run_dir),
            "--quiet", *extra]


def _step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in records if "step" in r]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_killed_torchrun_job_resumes(tmp_path):
    from engine.config import save_config

    steps, every = 5, 2  # killed after step 3: two steps' margin before the run would end by itself
    config = tmp_path / "tiny.toml"
    save_config(exact_config(**{"optim.steps": steps, "run.checkpoint_every": every}), config)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "first.log", "w")
    job = subprocess.Popen(_torchrun(config, run_dir), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # killed once a checkpoint exists and a later step has been recorded: the record runs past the checkpoint
        deadline = time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline:
            saved = [int(p.stem.split("_")[1]) for p in run_dir.glob("checkpoint_*.pt")]
            if saved and any(r["step"] > max(saved) for r in _step_records(run_dir)):
                break
            time.sleep(0.02)
    finally:
        _kill_job(job)
        log.close()
    assert job.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed_at = max(r["step"] for r in _step_records(run_dir))
    assert killed_at < steps and not (run_dir / "finished.json").exists()

    done = subprocess.run(_torchrun(config, run_dir, "--resume", str(run_dir / "last.pt")), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"completed at step {steps}" in done.stdout
    assert json.loads((run_dir / "finished.json").read_text()) == {"reason": "completed", "step": steps}

    # every step (and validation) recorded once, by rank 0, with each rank's solve statistics
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == list(range(1, steps + 1))
    assert [r["validation"]["step"] for r in records if "validation" in r] == [0, steps]
    by_step = {r["step"]: r for r in records if "step" in r}
    assert all(len(r["forward_iterations_per_rank"]) == WORLD for r in by_step.values())

    # solves.jsonl: rank 0's solves only (its shard of 2 of the 4 samples), no step twice, none past the end
    solves = [json.loads(line) for line in (run_dir / "solves.jsonl").read_text().splitlines()]
    keys = [(s["step"], s["direction"], s["tag"]) for s in solves]
    assert len(keys) == len(set(keys)) and max(k[0] for k in keys) == steps
    assert {k[0] for k in keys} == set(range(1, steps + 1))
    assert len({sum(k[0] == s for k in keys) for s in range(1, steps + 1)}) == 1  # as many solves every step
    assert all(len(s["iterations"]) == 2 for s in solves)
    for step, record in by_step.items():
        for direction in ("forward", "backward"):
            rank0 = max(max(s["iterations"]) for s in solves if s["step"] == step and s["direction"] == direction)
            assert rank0 == record[f"{direction}_iterations_per_rank"][0]

    # nothing but the run's own files, and nothing written beside the run directory (rank 1 writes nothing)
    names = {p.name for p in run_dir.iterdir()}
    expected = {"config.toml", "metrics.jsonl", "solves.jsonl", "finished.json", "snapshots", "last.pt"}
    assert names == expected | {f"checkpoint_{s:06d}.pt" for s in [*range(every, steps, every), steps]}
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["step_000000.npz", f"step_{steps:06d}.npz"]
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.toml", "run", "first.log"}


def test_automatic_threads_share_the_cores_between_torchrun_processes(monkeypatch):
    from engine.trainer import configure_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert configure_threads(0) == 7  # one process: a core left to the GUI
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert configure_threads(0) == 2  # four processes on 8 cores: 2 each
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert configure_threads(0) == 1
        assert configure_threads(3) == 3  # an explicit count is kept
    finally:
        torch.set_num_threads(before)


# -- two machines ----------------------------------------------------------------------------------
def test_two_machine_torchrun_job_with_uneven_shards_matches_one_process(tmp_path):
    """Multi-node torchrun as a cluster runs it, the machines played by two torchrun agents with their own
    working directories (no shared file system): static rendezvous (``--node-rank``, ``--master-addr``),
    2 processes on the first machine and 1 on the second, so 3 ranks split the global batch of 4 unevenly
    (2 / 1 / 1). It trains as one process does, and only global rank 0 (on node 0) writes."""
    from engine.config import save_config

    cfg = exact_config()
    config = tmp_path / "tiny.toml"
    save_config(cfg, config)
    single = Trainer(cfg, run_dir=tmp_path / "single", observers=Observers())
    assert single.run() == "completed"

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    machines = []
    for node, nproc in ((0, 2), (1, 1)):
        home = tmp_path / f"machine{node}"
        home.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "engine.cli", "--threads", "1", "train", "--config", str(config), "--out", "runs/job",
                   "--quiet"]
        machines.append((home, subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
    outputs = []
    for _, job in machines:
        try:
            outputs.append(job.communicate(timeout=240)[0])
        finally:
            if job.poll() is None:
                _kill_job(job)
    assert [job.returncode for _, job in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "completed at step 4" in outputs[0]

    run_dir = machines[0][0] / "runs" / "job"
    assert list(machines[1][0].iterdir()) == []  # the second machine's rank writes nothing, not even a folder
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(len(r["forward_iterations_per_rank"]) == 3 for r in steps)
    losses = torch.tensor([r["total"] for r in steps])
    torch.testing.assert_close(losses, torch.tensor([h["total"] for h in single.history]), rtol=1e-4, atol=0)
    weights = load_checkpoint(run_dir / "last.pt").model_state
    reference = single.weights_copy()
    assert weights.keys() == reference.keys()
    worst = max(float((weights[k].float() - reference[k].float()).abs().max()) for k in reference)
    print("3 ranks on 2 machines vs 1 process: max |weight difference| =", worst)
    assert worst <= 4 * cfg.optim.lr
