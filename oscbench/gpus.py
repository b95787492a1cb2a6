"""Which GPU a job of a sweep runs on. Parallel jobs on one machine (`hydra/launcher=joblib`)
would all land on cuda:0; instead each job of a sweep with `device=auto` holds a slot, one
of `jobs_per_gpu` per visible GPU, for its whole run, through a file lock per slot in the
sweep directory (released by the operating system if the job dies). Slots fill GPU by GPU
(the first slot of every GPU before the second of any), and a job that finds none free
waits for one."""

from __future__ import annotations

import dataclasses
import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from oscbench.config import RunSpec


@contextmanager
def gpu_slot(root: Path, count: int, jobs_per_gpu: int, poll_s: float = 0.5) -> Iterator[int]:
    """Hold a free slot of `count` GPUs x `jobs_per_gpu` below `root`; yields its GPU."""
    locks = Path(root) / ".gpus"
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for k in range(jobs_per_gpu):
            for gpu in range(count):
                with open(locks / f"gpu{gpu}-slot{k}.lock", "w") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    try:
                        yield gpu
                        return
                    finally:
                        fcntl.flock(f, fcntl.LOCK_UN)
        time.sleep(poll_s)


@contextmanager
def job_device(spec: RunSpec, root: Path, count: int | None = None) -> Iterator[RunSpec]:
    """The spec of one job of a sweep, pinned to a GPU slot while it runs when
    `device=auto` finds several GPUs (`count`: the visible GPUs, by default CUDA's count);
    otherwise the spec as it is."""
    count = torch.cuda.device_count() if count is None else count
    if spec.device != "auto" or count < 2:
        yield spec
        return
    with gpu_slot(root, count, spec.jobs_per_gpu) as gpu:
        if torch.cuda.is_available():
            torch.cuda.set_device(gpu)
        yield dataclasses.replace(spec, device=f"cuda:{gpu}")
