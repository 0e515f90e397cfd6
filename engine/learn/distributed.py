"""Several processes training one set of rotations: small helpers over torch.distributed.

The training loop (engine.learn.spinquant.train) wraps the learned rotations in DistributedDataParallel, so the
gradient all-reduce is torch's own; this module only sets the process group up from torchrun's environment,
says who this process is, and splits each step's batch of windows across ranks. Everything here also works in a
single plain process (world size 1), so callers need no special case.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every process


@dataclass(frozen=True)
class DistInfo:
    rank: int  # this process among all of them, 0 .. world_size - 1
    world_size: int  # processes training together (1: a plain single process)
    local_rank: int  # this process among those on its host (its GPU index)
    device: str  # where this process computes: "cuda:<local_rank>" or "cpu"

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {raw!r}") from None


def _device_for(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def init_from_env() -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), with the
    NCCL backend when CUDA is available, else gloo; set this process's CUDA device to LOCAL_RANK. Without
    WORLD_SIZE > 1 nothing is initialised and a single-process DistInfo comes back. Calling it again is harmless."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return current()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                f"start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(
                    f"WORLD_SIZE is {world_size} but {name} is not set; start the processes with "
                    "torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
                )
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(local_rank))


def current() -> DistInfo:
    """This process's place in an initialised process group, or a single process on the default device."""
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(local_rank))
    return DistInfo(0, 1, 0, "cuda" if torch.cuda.is_available() else "cpu")


def _several() -> bool:
    """A process group with more than one rank is running (collectives would do something)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group if one was initialised (the end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_batch(batch: int, world_size: int, rank: int) -> slice:
    """The windows of a step's global batch that `rank` computes: [rank * b / W, (rank + 1) * b / W).

    Every rank takes the same number of windows, so the average of the ranks' mean losses (what DDP's gradient
    averaging follows) is the mean loss over the whole batch, as in a single process."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch % world_size:
        fits = [w for w in range(1, batch + 1) if batch % w == 0]
        raise ValueError(
            f"batch ({batch} windows per step) is not divisible by the {world_size} processes; use a "
            f"multiple of {world_size} (e.g. {world_size * -(-batch // world_size)}) or run "
            f"{' or '.join(map(str, fits))} processes"
        )
    per_rank = batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a tensor over all ranks (every rank must call it); the tensor itself in a single process."""
    if not _several():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def check_same_on_all_ranks(tensors: list[torch.Tensor], what: str = "tensors", rtol: float = 1e-6) -> None:
    """Raise RuntimeError unless `tensors` agree across ranks (every rank must call it). Cheap: one fingerprint
    per tensor (a dot product with fixed pseudo-random weights, float64), all-reduced as max and min."""
    if not _several():
        return
    prints = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        weights = torch.sin(torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) * 0.7)
        prints.append(flat @ weights)
    prints = torch.stack(prints)  # [n_tensors]
    both = torch.cat([prints, -prints])  # max of -x gives -min: one all-reduce for both
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    spread = both[: len(tensors)] + both[len(tensors) :]  # max - min per tensor
    scale = prints.abs().clamp(min=1.0)
    if bool((spread > rtol * scale).any()):
        bad = int((spread / scale).argmax())
        raise RuntimeError(
            f"{what} differ across ranks (tensor {bad}: fingerprint spread {float(spread[bad]):.3g}); "
            "the ranks did not see the same averaged gradients"
        )


class TrainedOnly(nn.Module):
    """What DistributedDataParallel wraps: the trained module as the only submodule, and a loss function held in a
    tuple so the frozen network it computes through is not registered (DDP would broadcast every frozen weight at
    construction and track it). forward(*args) returns loss_fn(*args)."""

    def __init__(self, trained: nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.trained = trained
        self._loss_fn = (loss_fn,)

    def forward(self, *args) -> torch.Tensor:
        return self._loss_fn[0](*args)


def data_parallel(trained: nn.Module, loss_fn: Callable[..., torch.Tensor], info: DistInfo | None = None) -> nn.Module:
    """loss_fn behind a module whose backward all-reduces (averages) the gradients of `trained`'s parameters when
    several processes train together; a plain TrainedOnly in a single process. Constructing DDP broadcasts rank 0's
    parameters (and buffers) to every rank, so all start from the same point."""
    info = info or current()
    module = TrainedOnly(trained, loss_fn)
    if not info.distributed:
        return module
    device = next(trained.parameters()).device
    # buffers here are constants (SpinQuant's fixed R3/R4): no broadcast before every forward. torch >= 2.13
    # names that option forward_sync_buffers and deprecates broadcast_buffers; older releases know only the latter.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (every rank must call it; pickled); `obj` itself in a single process."""
    if not _several():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others name); nothing in a single process."""
    if _several():
        dist.barrier()
