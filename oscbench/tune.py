"""Tuning studies: one Optuna study per cell of a tuning sweep (a method at a bit-width),
kept in one SQLite file in the sweep directory, and what later steps read back from them.

`experiment=tune_methods` runs them through `TuneSweeper` and `experiment=final_methods`
takes each cell's best parameters through `BestSweeper` (hydra_plugins/oscbench_tuning:
Hydra instantiates sweepers only from the hydra_plugins package).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from oscbench.registry import ConfigError

STORAGE = "optuna.db"  # in the tuning sweep's directory
INTERRUPTED = "interrupted"  # user attribute of a trial a kill left running (run again)
log = logging.getLogger(__name__)


def storage_url(sweep_dir: Path | str) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / STORAGE}"


def cell_name(overrides: Iterable[str], keys: Iterable[str]) -> str:
    """A study's name: the cell's values of `keys` (e.g. method, bits) in its overrides, as
    in `lsq_dampen-bits2`."""
    values = dict(o.split("=", 1) for o in overrides)
    return "-".join(values[k] if k == "method" else f"{k}{values[k]}" for k in keys)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial spends the budget: finished, or failed by its own error (not by a kill
    of the study, whose trial runs again)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED)


def reopen(study: optuna.Study, n_trials: int) -> int:
    """Continue a study after a kill: a trial left running is marked failed (`interrupted`)
    and its parameters are queued to run first (the run resumes from its checkpoint).
    Returns how many trials remain of the budget `n_trials`."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        optuna.trial.Trial(study, t._trial_id).set_user_attr(INTERRUPTED, True)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        log.info(f"study {study.study_name}: trial {t.number} was interrupted; running it again")
    return max(0, n_trials - sum(counted(t) for t in study.get_trials(deepcopy=False)))


def sampler_seed(seed: int, study: optuna.Study) -> int:
    """A study's sampler seed: from the sweep's seed, the study and how many trials it
    holds, so that a relaunched study draws new points, the same on every relaunch."""
    return zlib.crc32(f"{seed}:{study.study_name}:{len(study.trials)}".encode())


def _require(sweep_dir: Path | str) -> None:
    if not (Path(sweep_dir) / STORAGE).is_file():
        raise ConfigError(
            f"no tuning study at {sweep_dir} (no {STORAGE}); run experiment=tune_methods "
            "first, or point tune.dir at its sweep directory"
        )


def load(sweep_dir: Path | str, name: str) -> optuna.Study:
    """A tuning sweep's study `name`; a clear error if the sweep or the study is missing."""
    _require(sweep_dir)
    try:
        return optuna.load_study(study_name=name, storage=storage_url(sweep_dir))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage_url(sweep_dir))]
        raise ConfigError(
            f"{sweep_dir}/{STORAGE} holds no study {name!r} (it holds: {', '.join(names)}); "
            "tune that cell first"
        ) from None


def completed(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.trials)


def best_params(sweep_dir: Path | str, name: str) -> dict:
    """The parameters of the best completed trial of study `name`."""
    study = load(sweep_dir, name)
    if not completed(study):
        raise ConfigError(f"study {name!r} in {sweep_dir} has no completed trial")
    return dict(study.best_trial.params)


def summary(sweep_dir: Path | str) -> list[dict]:
    """One row per study of a tuning sweep: its best value and parameters, and its trials
    by state."""
    _require(sweep_dir)
    rows = []
    url = storage_url(sweep_dir)
    for s in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=s.study_name, storage=url)
        trials = study.trials
        best = study.best_trial if completed(study) else None  # as best_params takes it
        rows.append(
            {
                "study": s.study_name,
                "complete": sum(t.state == TrialState.COMPLETE for t in trials),
                "failed": sum(t.state == TrialState.FAIL and counted(t) for t in trials),
                "interrupted": sum(bool(t.user_attrs.get(INTERRUPTED)) for t in trials),
                "best_trial": best.number if best else None,
                "best_value": best.value if best else None,
                "params": dict(best.params) if best else {},
                "cell": dict(best.user_attrs) if best else {},
            }
        )
    return rows
