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
    """Bad input: say what and how to fix it on stderr, exit 2 (Hydra lets SystemExit by)."""
    print(f"oscbench: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_writable(directory: Path, key: str) -> None:
    CREATED[:] = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # a name of its own: ranks probe at once
            pass
    except OSError as e:
        reject(
            f"cannot write the run directory {directory} ({e.strerror or e}); "
            f"choose another with {key}=PATH, or make it writable"
        )


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
        from oscbench.compose import resolve_recipe
        from oscbench.config import validate
        from oscbench.registry import ConfigError

        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(resolve_recipe(task, list(config.hydra.overrides.task)))
        except ConfigError as e:
            reject(str(e))
        check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
