"""`python -m oscbench.run [overrides]`: compose -> validate -> build -> execute."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from oscbench.distributed import broadcast, from_env, start
from oscbench.launch.build import pick_device
from oscbench.launch.compose import (
    CONF_DIR,
    resolve_recipe,
)
from oscbench.launch.config import RunSpec, resolved, validate
from oscbench.launch.execute import execute
from oscbench.launch.gpus import job_device
from oscbench.launch.naming import result_key
from oscbench.launch.preflight import reject, remove_if_unused
from oscbench.records import interrupt
from oscbench.records.console import ClosedSafe, warn
from oscbench.registry import ConfigError


def objective(spec: RunSpec, final: dict) -> float:
    """What a run returns to a sweeper (Optuna's): its validation accuracy after BN
    re-estimation (a PTQ method's: with the weights rounded to `bits`), never a test
    number; NaN (Optuna: a failed trial) without a validation split."""
    return float(final.get(result_key(spec.ptq, spec.bits, "val_"), float("nan")))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """The task function: `python -m oscbench.run` calls it once, a multirun's launcher once
    per job (submitit's in a job process of its own: there its preemption signal ends the
    run as an interruption before submitit requeues the job)."""
    interrupt.defer_submitit()
    try:
        return _task(cfg)
    except interrupt.Preempted as e:
        warn(
            f"{interrupt.said(e, ' (submitit: preempted, or its time limit near)')}; "
            "submitit requeues the job where hydra.launcher.max_num_timeout allows, and the "
            "requeued job (or the same command) resumes from the last checkpoint"
        )
        e.hand_over()  # requeues and exits, or ends the job
        return float("nan")  # a process of a multi-process job but rank 0: requeued with it


def _task(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        cfg = resolve_recipe(cfg, overrides)
        spec = validate(cfg)
        world = from_env()
        if spec.trainer.batch_size % world.size:
            raise ConfigError(
                f"trainer.batch_size={spec.trainer.batch_size} is the global batch and must "
                f"divide among the {world.size} processes; pick a multiple of {world.size}"
            )
        start(world, pick_device(spec.device), spec.trainer.dist_timeout_s)
        config = resolved(cfg)
        own_dir = run_dir
        run_dir, sweep_dir = map(Path, broadcast((str(run_dir), str(hc.sweep.dir)), world))
        if own_dir != run_dir:  # Hydra's timestamp turned a second later here: rank 0's wins
            remove_if_unused(own_dir)
        if hc.mode == RunMode.MULTIRUN:  # one sweep: runs are shared across its jobs
            spec.logger.group = spec.logger.group or sweep_dir.name
            with job_device(spec, sweep_dir, world) as pinned:  # parallel jobs: GPU slots
                final = execute(pinned, config, run_dir, overrides, sweep_dir, sweep_dir)
                return objective(spec, final)
        return objective(spec, execute(spec, config, run_dir, overrides))
    except ConfigError as e:  # data not on disk, a damaged file: found before any training
        if hc.mode == RunMode.RUN:
            remove_if_unused(run_dir)
            reject(str(e))
        raise


def cli() -> int:
    """`python -m oscbench.run`: `main`, with SIGTERM raised as SIGINT is (an interrupted
    run's record says so), a closed stdout tolerated, and an interruption ended with one
    line and the shell's exit code for the signal."""
    interrupt.install()
    sys.stdout = ClosedSafe(sys.stdout)
    try:
        main()
    except interrupt.INTERRUPTS as e:
        warn(f"{interrupt.said(e)}; the same command resumes from the last checkpoint")
        return 128 + interrupt.signal_of(e).value
    return 0


if __name__ == "__main__":
    sys.exit(cli())
