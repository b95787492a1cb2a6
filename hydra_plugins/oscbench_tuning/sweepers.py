"""`TuneSweeper` (experiment=tune_methods) and `BestSweeper` (experiment=final_methods).

Hydra instantiates sweepers only from the hydra_plugins package, so they live here; the
studies' bookkeeping is oscbench.tune. Hydra imports every plugin module at start-up:
Optuna (over a second to import) is imported only when a sweep starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
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


class TuneSweeper(OptunaSweeper):
    """One Optuna study per cell of `grid` x the command line's sweeps (a method at a
    bit-width), each over the shared `params` (the learning rate) and its method preset's
    own `method.search_space`, with the same budget `n_trials` for every cell. The
    studies share one SQLite file in the sweep directory (oscbench.tune.STORAGE), each
    named by its cell. Relaunching the same command continues them: finished trials stay
    as they are, a trial a kill left running is marked failed and its parameters run again
    (the run resumes from its checkpoint), and only the trials missing from the budget
    run. A trial that raises is recorded as failed and its study goes on
    (`max_failure_rate: 1.0`). Each cell's result is in studies/<cell>.yaml, all of them in
    best.yaml."""

    def __init__(
        self,
        sampler: DictConfig,
        seed: int,
        grid: DictConfig,
        direction: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
    ) -> None:
        super().__init__(
            None, direction, None, None, n_trials, n_jobs, max_failure_rate, None, None, params
        )
        self.sampler_config, self.seed, self.grid = sampler, seed, grid
        self.n_trials, self.direction = n_trials, direction

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from oscbench.tune import cell_name, completed, reopen, sampler_seed, storage_url, summary

        impl = self.sweeper
        sweep_dir = Path(impl.config.hydra.sweep.dir)
        (sweep_dir / "studies").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(impl.config, sweep_dir / "multirun.yaml")
        shared = OmegaConf.to_container(self.sweeper.params or OmegaConf.create({}))
        loader = impl.hydra_context.config_loader
        cells, keys = _cells(loader, self.grid, arguments)
        for cell in cells:
            name = cell_name(cell, keys)
            job = loader.load_sweep_config(impl.config, list(cell))
            own = OmegaConf.to_container(job.method.get("search_space") or OmegaConf.create({}))
            study = optuna.create_study(
                study_name=name,
                storage=storage_url(sweep_dir),
                direction=self.direction,
                load_if_exists=True,
            )
            impl.study_name, impl.storage = name, storage_url(sweep_dir)
            impl.n_trials = reopen(study, self.n_trials)
            impl.params = OmegaConf.create({**shared, **own})
            impl.sampler = instantiate(self.sampler_config, seed=sampler_seed(self.seed, study))
            log.info(f"study {name}: {impl.n_trials} of {self.n_trials} trials to run")
            try:
                impl.sweep(list(cell))
            except ValueError as e:  # Optuna: no completed trial to take the best of
                if completed(study):
                    raise
                log.warning(f"study {name}: no trial completed ({e})")
            result = sweep_dir / "optimization_results.yaml"
            if result.exists():
                shutil.move(result, sweep_dir / "studies" / f"{name}.yaml")
        OmegaConf.save(OmegaConf.create(summary(sweep_dir)), sweep_dir / "best.yaml")


class BestSweeper(Sweeper):
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
        if use not in ("best", "defaults"):
            raise ValueError(f"hydra.sweeper.use={use}: use best or defaults")
        self.tuned, self.use, self.grid = tuned, use, grid
        self.cell_keys, self.max_batch_size = list(cell_keys), max_batch_size

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list:
        from oscbench.preflight import reject
        from oscbench.registry import ConfigError
        from oscbench.tune import best_params

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
            batch = jobs[start : start + size]
            results = self.launcher.launch(batch, initial_job_idx=start)
            for r in results:
                _ = r.return_value  # a failed job raises here, with its error
            returns.append(results)
        return returns

    def _cell(self, job: list[str]) -> str:
        from oscbench.tune import cell_name

        return cell_name(job, self.cell_keys)
