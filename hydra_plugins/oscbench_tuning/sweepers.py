"""`TuneSweeper` (experiment=tune_methods) and `BestSweeper` (experiment=final_methods).

Hydra instantiates sweepers only from the hydra_plugins package, so they live here; the
studies' bookkeeping is oscbench.launch.tune. Hydra imports every plugin module at start-up:
Optuna (over a second to import) is imported only when a sweep starts.

oscbench's own sweeper on current Optuna, not hydra-optuna-sweeper: that plugin pins
optuna<3 (2021's Optuna, SQLAlchemy 1), without the file journal that NFS needs. Hydra's
sweeper interface is small (setup, sweep), and a study per cell, resumed after a kill, was
most of what oscbench had built around the plugin anyway.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _cells(config_loader: Any, grid: DictConfig, arguments: list[str]) -> tuple[list, list]:
    """Every combination of the grid's and the command line's values (Hydra's own parser
    and product, as the basic sweeper's), and the keys that name a cell: the grid's and
    any swept on the command line."""
    parser = OverridesParser.create(config_loader=config_loader)
    parsed = parser.parse_overrides([*(f"{k}={v}" for k, v in grid.items()), *arguments])
    keys = list(grid) + [
        o.get_key_element() for o in parsed if o.is_sweep_override() and o.key_or_group not in grid
    ]
    (cells,) = BasicSweeper.split_arguments(parsed, None)
    return cells, keys


class _Launching(Sweeper):
    """A sweeper that launches its jobs through the configured Hydra launcher."""

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    def launch(self, jobs: list[list[str]]) -> list:
        results = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        self.job_idx += len(results)
        return results


class TuneSweeper(_Launching):
    """One Optuna study per cell of `grid` x the command line's sweeps (a method at a
    bit-width), each over the shared `params` (the learning rate) and its method preset's
    own `method.search_space`, with the same budget `n_trials` for every cell, asked and
    told `n_jobs` trials at a time (the launcher's parallel jobs). The studies share one
    file in the sweep directory (`storage`: sqlite, or journal for NFS), each named by its
    cell. Relaunching the same command continues them: finished trials stay as they are, a
    trial a kill left running is marked failed and its parameters run again (the run
    resumes from its checkpoint), and only the trials missing from the budget run. A trial
    that raises, or returns no number, is recorded as failed and its study goes on, up to
    `max_failure_rate` of a batch; a study left without a completed trial fails the sweep
    (exit 1). Each cell's result is in studies/<cell>.yaml, all of them in best.yaml."""

    def __init__(
        self,
        sampler: DictConfig,
        seed: int,
        grid: DictConfig,
        direction: str,
        n_trials: Any,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        storage: str,
    ) -> None:
        self.sampler_config, self.seed, self.grid = sampler, seed, grid
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.max_failure_rate, self.params, self.storage = max_failure_rate, params, storage

    def _check(self) -> None:
        """Bad settings, refused before the storage is touched."""
        from oscbench.launch.preflight import reject

        trials = self.n_trials
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            reject(
                f"tune.trials={trials} is invalid; allowed: an integer >= 1 (trials per method "
                "and bit-width)"
            )
        if self.storage not in ("sqlite", "journal"):
            reject(f"hydra.sweeper.storage={self.storage} is invalid; allowed: sqlite, journal")
        if not (isinstance(self.n_jobs, int) and self.n_jobs >= 1):
            reject(f"hydra.sweeper.n_jobs={self.n_jobs} is invalid; allowed: an integer >= 1")

    def sweep(self, arguments: list[str]) -> None:
        from oscbench.launch.preflight import reject
        from oscbench.launch.tune import cell_name, distributions, open_study, summary
        from oscbench.registry import ConfigError

        self._check()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        loader = self.hydra_context.config_loader
        shared = OmegaConf.to_container(self.params or OmegaConf.create({}))
        cells, keys = _cells(loader, self.grid, arguments)
        plans = []
        try:  # every search space read, then every study opened, before any trial runs
            for cell in cells:
                job = loader.load_sweep_config(self.config, list(cell))
                own = OmegaConf.to_container(job.method.get("search_space") or OmegaConf.create())
                plans.append((list(cell), distributions({**shared, **own})))
            names = [cell_name(cell, keys) for cell, _ in plans]
            for name in names:
                open_study(sweep_dir, self.storage, name, self.direction)
        except ConfigError as e:  # a damaged storage file, a fixed value in a search space
            reject(str(e))
        (sweep_dir / "studies").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        for (cell, space), name in zip(plans, names, strict=True):
            self._tune(sweep_dir, name, cell, space)
        rows = summary(sweep_dir)
        OmegaConf.save(OmegaConf.create(rows), sweep_dir / "best.yaml")
        empty = [r["study"] for r in rows if r["study"] in names and r["complete"] == 0]
        if empty:
            print(
                f"oscbench: tuning: no trial completed in {', '.join(empty)} (every one failed; "
                f"the runs' records below {sweep_dir} say why)",
                file=sys.stderr,
            )
            sys.exit(1)

    def _tune(self, sweep_dir: Path, name: str, cell: list[str], space: dict) -> None:
        import optuna

        from oscbench.launch.tune import completed, open_study, reopen, sampler_seed

        study = open_study(sweep_dir, self.storage, name, self.direction)
        study.sampler = instantiate(self.sampler_config, seed=sampler_seed(self.seed, study))
        left = reopen(study, self.n_trials)
        log.info(f"study {name}: {left} of {self.n_trials} trials to run")
        values = dict(o.split("=", 1) for o in cell)
        while left > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            for t in trials:
                for key, value in values.items():
                    t.set_user_attr(key, value)
            jobs = [[*cell, *(f"{k}={v}" for k, v in t.params.items())] for t in trials]
            failed = 0
            for t, result in zip(trials, self.launch(jobs), strict=True):
                try:
                    value = float(result.return_value)  # a failed job raises its error here
                except Exception as e:
                    value, why = math.nan, f"{type(e).__name__}: {e}"
                else:
                    why = "no validation accuracy (NaN)"
                if math.isfinite(value):
                    study.tell(t, value)
                    continue
                study.tell(t, state=optuna.trial.TrialState.FAIL)
                log.warning(f"study {name}: trial {t.number} failed ({why.splitlines()[-1]})")
                failed += 1
            if failed / len(trials) > self.max_failure_rate:
                raise RuntimeError(
                    f"study {name}: {failed} of {len(trials)} trials failed, more than "
                    f"max_failure_rate={self.max_failure_rate}"
                )
            left -= len(trials)
        if completed(study):
            best = study.best_trial
            result = {"best_params": best.params, "best_value": best.value, "trial": best.number}
            OmegaConf.save(OmegaConf.create(result), sweep_dir / "studies" / f"{name}.yaml")


class BestSweeper(_Launching):
    """Every combination of `grid` x the command line's sweeps (methods, bit-widths, fresh
    seeds), each run with its cell's best parameters from the tuning sweep in `tuned`
    (`use: best`) or with its preset's own values (`use: defaults`: the untuned baseline).
    A cell is named by `cell_keys` (method, bits), as the tuning sweep named its study."""

    def __init__(
        self,
        tuned: str,
        use: str,
        grid: DictConfig,
        cell_keys: list[str],
        max_batch_size: int | None = None,
    ) -> None:
        self.tuned, self.use, self.grid = tuned, use, grid
        self.cell_keys, self.max_batch_size = list(cell_keys), max_batch_size

    def sweep(self, arguments: list[str]) -> list:
        from oscbench.launch.preflight import reject
        from oscbench.launch.tune import best_params
        from oscbench.registry import ConfigError

        if self.use not in ("best", "defaults"):
            reject(f"hydra.sweeper.use={self.use} is invalid; allowed: best, defaults")
        jobs, _ = _cells(self.hydra_context.config_loader, self.grid, arguments)
        if self.use == "best":
            try:
                best = {self._cell(job): best_params(self.tuned, self._cell(job)) for job in jobs}
            except ConfigError as e:
                reject(str(e))
            jobs = [[*job, *(f"{k}={v}" for k, v in best[self._cell(job)].items())] for job in jobs]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, size = [], self.max_batch_size or len(jobs)
        for start in range(0, len(jobs), size):
            results = self.launch(jobs[start : start + size])
            for r in results:
                _ = r.return_value  # a failed job raises here, with its error
            returns.append(results)
        return returns

    def _cell(self, job: list[str]) -> str:
        from oscbench.launch.tune import cell_name

        return cell_name(job, self.cell_keys)
