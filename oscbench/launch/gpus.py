"""Which GPU a job of a sweep runs on. Parallel jobs on one machine (`hydra/launcher=joblib`)
would all land on cuda:0; instead each job of a sweep with `device=auto` holds a slot, one
of `jobs_per_gpu` per visible GPU, for its whole run, through a file lock per slot in the
sweep directory (released by the operating system if the job dies). Slots fill GPU by GPU
(the first slot of every GPU before the second of any), and a job that finds none free
waits for one. A job that is one DDP run of N processes on the node takes N slots on N
different GPUs."""

from __future__ import annotations

import dataclasses
import fcntl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

from oscbench.distributed import World, broadcast
from oscbench.launch.config import RunSpec
from oscbench.registry import ConfigError


@contextmanager
def gpu_slot(
    root: Path, count: int, jobs_per_gpu: int, need: int = 1, poll_s: float = 0.5
) -> Iterator[list[int]]:
    """Hold `need` free slots on as many different GPUs, of `count` GPUs x `jobs_per_gpu`
    below `root`, all at once (a DDP run takes one GPU per process); yields their GPUs."""
    if need > count:
        raise ConfigError(
            f"a run of {need} processes needs {need} GPUs, but {count} are visible; "
            "run fewer processes per job (tasks_per_node) or pin the device"
        )
    locks = Path(root) / ".gpus"
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        with ExitStack() as held:
            gpus: list[int] = []
            for k in range(jobs_per_gpu):
                for gpu in range(count):
                    if gpu in gpus or len(gpus) == need:
                        continue
                    f = held.enter_context(open(locks / f"gpu{gpu}-slot{k}.lock", "w"))
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    held.callback(fcntl.flock, f, fcntl.LOCK_UN)
                    gpus.append(gpu)
            if len(gpus) == need:
                yield sorted(gpus)
                return
        time.sleep(poll_s)  # not enough free: release what was taken and wait


@contextmanager
def job_device(
    spec: RunSpec, root: Path, world: World | None = None, count: int | None = None
) -> Iterator[RunSpec]:
    """The spec of one job of a sweep, pinned while it runs to a GPU slot (one per process
    of `world`, taken by rank 0 and broadcast; each rank gets its local rank's) when
    `device=auto` finds several GPUs (`count`: the visible GPUs, by default CUDA's count)
    and the job's processes share one node; otherwise the spec as it is."""
    count = torch.cuda.device_count() if count is None else count
    world = world or World()
    if spec.device != "auto" or count < 2 or world.local_size != world.size:
        yield spec
        return
    with (
        gpu_slot(root, count, spec.jobs_per_gpu, world.size)
        if world.main
        else nullcontext(None) as mine
    ):
        gpu = broadcast(mine, world)[world.local_rank]
        if torch.cuda.is_available():
            torch.cuda.set_device(gpu)
        yield dataclasses.replace(spec, device=f"cuda:{gpu}")
