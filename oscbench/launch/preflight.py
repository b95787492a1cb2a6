"""Checks before Hydra creates a run's directory: bad input is rejected with a one-line
message (no traceback, nothing left on disk), and so is a run directory that cannot be
written. A Hydra callback (`hydra.callbacks.preflight` in conf/config.yaml)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

HYDRA_FILES = (".hydra", "run.log", ".locks")  # what Hydra (and the run lock) put in a run dir
CREATED: list[Path] = []  # the directories this process created for its run, deepest first


def reject(message: str) -> None:
    """Bad input: say what and how to fix it on stderr, exit 2 (Hydra lets SystemExit by).
    The directories created for the run or sweep are removed where they are still empty."""
    print(f"oscbench: {message}", file=sys.stderr, flush=True)
    for directory in CREATED:
        try:
            directory.rmdir()
        except OSError:
            break
    sys.exit(2)


def unwritable(directory: Path) -> OSError | None:
    """Why `directory` (created with its parents if missing) cannot be written, or None."""
    CREATED[:] = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # a name of its own: ranks probe at once
            pass
    except OSError as e:
        return e
    return None


def cannot_write(directory: Path, problem: OSError, key: str) -> str:
    return (
        f"cannot write the run directory {directory} ({problem.strerror or problem}); "
        f"choose another with {key}=PATH, or make it writable"
    )


def skip_if_completed(task: DictConfig, overrides: list[str], run_dir: Path) -> None:
    """A run directory that cannot be written but holds this completed run (a read-only
    copy of a study): say so and show its summary, as a rerun does, and exit 0 (Hydra
    would fail writing its own files there)."""
    from oscbench.launch.config import resolved, validate
    from oscbench.launch.execute import identified
    from oscbench.launch.summary import show_completed
    from oscbench.records.runs import find_completed, run_key

    key = run_key(identified(resolved(task), overrides))
    done = find_completed(run_dir, key)
    if done is not None:
        show_completed(validate(task), done, "read-only: nothing written")
        sys.exit(0)


def remove_if_unused(run_dir: Path) -> None:
    """Undo what a run rejected before it began left on disk: Hydra's files in its run
    directory, and the directories created for it, when nothing else is in them."""
    if not run_dir.is_dir() or any(p.name not in HYDRA_FILES for p in run_dir.iterdir()):
        return
    for name in HYDRA_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    for directory in CREATED:
        try:
            directory.rmdir()
        except OSError:
            return


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from oscbench.launch.compose import resolve_recipe
        from oscbench.launch.config import validate
        from oscbench.registry import ConfigError

        task = resolve_recipe(
            OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
            list(config.hydra.overrides.task),
        )
        try:
            validate(task)
        except ConfigError as e:
            reject(str(e))
        run_dir = Path(config.hydra.run.dir)
        problem = unwritable(run_dir)
        if problem is not None:
            skip_if_completed(task, list(config.hydra.overrides.task), run_dir)
            reject(cannot_write(run_dir, problem, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        problem = unwritable(sweep_dir)
        if problem is not None:
            reject(cannot_write(sweep_dir, problem, "hydra.sweep.dir"))
