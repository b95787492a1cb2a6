"""Never train a run twice: a lock per configuration while it trains, a completed run of it
found and not trained again, a killed one resumed from its checkpoint, and a run it depends
on (the fp run that `init_from=fp` starts from) found or trained first. On several
processes rank 0 looks and decides, and every rank follows its answers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from oscbench.distributed import World, broadcast
from oscbench.records.checkpoint import CHECKPOINT, load_for_resume
from oscbench.records.runs import find_completed, run_key, run_lock


@dataclass
class Claim:
    """What a run finds when it takes its configuration's lock."""

    done: Path | None = None  # a completed run of the configuration: not trained again
    resume: dict | None = None  # the run directory's checkpoint of it: training continues


@contextlib.contextmanager
def claim(
    search_root: Path, run_dir: Path, config: dict, world: World, reuse: bool
) -> Iterator[Claim]:
    """Hold the lock of `config` below `search_root` while inside (rank 0 holds it). With
    `reuse` (trainer.resume=auto): a completed run of `config` anywhere below `search_root`,
    else the checkpoint in `run_dir` (refused if it belongs to another configuration)."""
    key = run_key(config)
    with run_lock(search_root, key) if world.main else contextlib.nullcontext():
        if not reuse:
            yield Claim()
            return
        done = broadcast(find_completed(search_root, key) if world.main else None, world)
        if done is not None:
            yield Claim(done=done)
            return
        saved = broadcast(world.main and (run_dir / CHECKPOINT).exists(), world)
        yield Claim(resume=load_for_resume(run_dir, config) if saved else None)


def dependency(root: Path, config: dict, train: Callable[[], None], world: World) -> Path:
    """The directory of the completed run of `config` below `root`; `train()` first if there
    is none (it trains it here, or waits on its lock while a parallel job finishes it)."""
    key = run_key(config)
    found = broadcast(find_completed(root, key) if world.main else None, world)
    if found is None:
        train()
        found = broadcast(find_completed(root, key) if world.main else None, world)
    return found
