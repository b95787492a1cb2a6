"""One run on several processes: PyTorch's own torch.distributed (DistributedDataParallel),
started by torchrun on one node or by submitit's tasks (SLURM, or its local executor). A
`World` says which process this is; rank 0 decides and writes, every rank trains its shard
of each global batch. Every collective fails after `trainer.dist_timeout_s` instead of
hanging when a rank is gone."""

from __future__ import annotations

import datetime
import hashlib
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
    local_size: int = 1  # this node's processes

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
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or a
    submitit job of several tasks (its JobEnvironment, exported to those variables with the
    first host as the rendezvous, as submitit's TorchDistributedEnvironment does); one
    process without either."""
    env = os.environ
    if "WORLD_SIZE" not in env and env.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "WORLD_SIZE" not in env:
        return World()
    size = int(env["WORLD_SIZE"])
    return World(
        int(env["RANK"]),
        size,
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", size)),
    )


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


def _digests(state: Any, name: str = "") -> dict[str, str]:
    """Each tensor (and other value) below `state`, by its dotted name: a hash of its bytes."""
    if isinstance(state, dict | list | tuple):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        return {k: v for key, sub in items for k, v in _digests(sub, f"{name}.{key}").items()}
    if isinstance(state, torch.Tensor):
        raw = state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return {
            name.lstrip("."): f"{state.dtype}{tuple(state.shape)}:{hashlib.sha1(raw).hexdigest()}"
        }
    return {name.lstrip("."): repr(state)}


def check_sync(state: dict, world: World, epoch: int) -> None:
    """Fail on every rank unless `state` (weights, optimizer, tracker, policies, EMA: the
    run's checkpoint less its RNG) is bit-identical on every rank (`trainer.check_sync`)."""
    if not world.active:
        return
    mine = _digests(state)
    every: list[dict[str, str]] = [{} for _ in range(world.size)]
    dist.all_gather_object(every, mine)
    differ = {
        f"rank {r}: {k}"
        for r, theirs in enumerate(every[1:], start=1)
        for k in sorted(set(every[0]) | set(theirs))
        if every[0].get(k) != theirs.get(k)
    }
    if differ:
        shown = ", ".join(sorted(differ)[:8]) + (" ..." if len(differ) > 8 else "")
        raise RuntimeError(
            f"trainer.check_sync: after epoch {epoch} the ranks' states differ from rank 0's "
            f"({len(differ)} entries: {shown}); something rank-local leaks into the "
            "training state"
        )
