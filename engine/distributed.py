"""Data-parallel training on PyTorch's own engine (``torch.distributed``), started by ``torchrun``.

``torchrun --standalone --nproc-per-node N -m engine.cli train ...`` (or multi-node
torchrun) runs the ordinary ``equideq train`` in N processes; :func:`from_env`
recognises torchrun by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and
:func:`setup` joins the process group: NCCL on CUDA (one GPU per local rank),
gloo on the CPU.

**The batch.** Every rank draws the step's global batch indices from the same
seed (``seed_for_step``) and takes ``indices[rank::world_size]``, the
``DistributedSampler`` semantics. Every rank holds the whole (small, simulated)
training set; only the indexing is sharded.

**Gradients: all-reduced by hand, not through DistributedDataParallel.** DDP's
reducer marks each parameter ready once per backward from hooks on the gradient
accumulators. A DEQ step does not fit that contract: the EI objective calls
the model twice before one backward (``x = f(y)`` and ``f(A T_g x)``), the
implicit gradient runs an adjoint fixed-point solve with ``autograd.grad``
inside a backward hook on the DEQ output, and the Jacobian penalty is a
double backward (``create_graph=True``) -- DDP refuses or mis-counts all
three ("marked ready twice", no ``autograd.grad`` support). So each rank runs
its step exactly as a single process does, adjoint solves included, and
:func:`all_reduce_gradients` sums the finished ``.grad`` tensors once after
``backward()`` (one flat buffer). Each rank's objective is weighted by its
share of the global batch (``len(shard) / len(batch)``; the penalty by its
share of the penalty's samples), so the sum over ranks is exactly the
single-process gradient of the whole batch's mean loss, also for uneven shards.

**Agreement.** Everything that decides whether a step is applied (a non-finite
loss, a failed solve on any rank, a stop request) is agreed collectively, so no
rank leaves a collective another rank waits in. Solve statistics go to every
rank (:func:`gather_objects`); rank 0 writes them with per-rank iteration
counts and stop reasons (``forward_iterations_per_rank``,
``forward_stop_reasons_per_rank``), so one diverging rank stays visible.

Only rank 0 writes the run directory (config, ``metrics.jsonl``, checkpoints);
the other ranks keep the same state (same weights, optimiser, alpha, penalty
weight) and load the same checkpoint on resume.

Not covered: mixed precision (bf16 autocast) and GPU-specific tuning. What is
not bit-identical to one process: EI's simulated noise on ``A T_g x``
(``loss.ei_apply_noise``) and the random start vectors of the Jacobian
penalty's / monitor's power iterations are drawn per shard (same seed,
shard-sized draws), so with those on, results agree in distribution, not
to floating-point tolerance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global batch ``indices`` (``indices[rank::world_size]``)."""
        return indices[self.rank::self.world_size]

    def count_below(self, limit: int) -> int:
        """How many of this rank's shard positions hold global batch positions ``< limit``."""
        return len(range(self.rank, max(0, limit), self.world_size))


def from_env() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ConfigError(f"torchrun environment is malformed: {exc}") from None
    return rank, world, local


def setup(device_name: str = "auto") -> Optional[tuple[DistContext, str]]:
    """Join the process group when started by torchrun: (context, device for this rank), else None."""
    env = from_env()
    if env is None:
        return None
    rank, world, local = env
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda', but this machine has no working CUDA device")
        torch.cuda.set_device(local)
        backend, device = "nccl", f"cuda:{local}"
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend), device


def teardown(barrier: bool = True) -> None:
    """Leave the process group (after a barrier, so rank 0's last files are written before anyone exits;
    ``barrier=False`` after an error, when the other ranks may be waiting in another collective)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks (a missing gradient counts as zero where another rank has one)."""
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_device())
    dist.all_reduce(have, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, have.tolist()) if h]
    if not used:
        return
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in used:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise ``sum`` / ``max`` of a list of floats over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    return all_reduce_floats([1.0 if flag else 0.0], op="max")[0] > 0


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_float(value: float, src: int = 0) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.broadcast(t, src=src)
    return float(t.item())
