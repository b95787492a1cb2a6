"""One run on several processes: PyTorch's own torch.distributed (DDP), started by torchrun
on one node or by submitit's SLURM tasks. A `World` says which process this is; rank 0
decides and writes, every rank trains its shard of each global batch.

Work in progress (issue 15): the process group, collectives with a timeout, and the
sharding of a global batch. The training loop does not use them yet.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size`, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items: the first n % size ranks take one more."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def from_env() -> World:
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process without."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return World()
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


def start(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU); every collective fails after
    `timeout_s` seconds instead of hanging when a rank is gone."""
    if world.active and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=world.rank,
            world_size=world.size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (a decision: skip, resume, a directory)."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BN statistics among them) on every rank."""
    if world.active:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the ranks, in place."""
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
