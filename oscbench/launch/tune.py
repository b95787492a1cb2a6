"""Tuning studies: one Optuna study per cell of a tuning sweep (a method at a bit-width),
all kept in one file in the sweep directory, and what later steps read back from them.

`experiment=tune_methods` runs them through `TuneSweeper` and `experiment=final_methods`
takes each cell's best parameters through `BestSweeper` (hydra_plugins/oscbench_tuning:
Hydra instantiates sweepers only from the hydra_plugins package). The storage is SQLite
(`optuna.db`) or, for a sweep directory on NFS where SQLite's locks fail, Optuna's file
journal (`optuna.journal`, `hydra.sweeper.storage=journal`), which many processes can share.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from oscbench.records.files import DamagedFile
from oscbench.registry import ConfigError

STORAGES = {"sqlite": "optuna.db", "journal": "optuna.journal"}  # file in the sweep directory
INTERRUPTED = "interrupted"  # user attribute of a trial a kill left running (run again)
log = logging.getLogger(__name__)


def storage_url(sweep_dir: Path | str) -> str:
    """The SQLite storage of a sweep directory, as Optuna takes it."""
    return f"sqlite:///{Path(sweep_dir).resolve() / STORAGES['sqlite']}"


def _file(sweep_dir: Path | str, kind: str | None) -> tuple[str, Path]:
    """The storage kind and its file: `kind`, or whichever the directory holds."""
    if kind is None:
        held = [k for k, name in STORAGES.items() if (Path(sweep_dir) / name).is_file()]
        if not held:
            raise ConfigError(
                f"no tuning study at {sweep_dir} (neither {' nor '.join(STORAGES.values())}); "
                "run experiment=tune_methods first, or point tune.dir at its sweep directory"
            )
        kind = held[0]
    return kind, Path(sweep_dir) / STORAGES[kind]


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Any error of the storage's file (SQLAlchemy's, the journal's JSON) as one that names
    it and the fix."""
    try:
        yield
    except (ConfigError, KeyError):
        raise
    except Exception as e:  # the database driver raises many kinds; none may pass as it is
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DamagedFile(
            f"{path} is damaged ({first}); move it aside and run the tuning command again: the "
            "trials start over, and every run already completed is found in its record and "
            "not trained again"
        ) from None


def storage(sweep_dir: Path | str, kind: str | None = None) -> optuna.storages.BaseStorage:
    """The studies of a tuning sweep: its `kind` of storage (sqlite, journal), or, to read
    a finished sweep, whichever it holds."""
    kind, path = _file(sweep_dir, kind)
    with _readable(path):
        if kind == "journal":
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        return optuna.storages.RDBStorage(storage_url(sweep_dir))


def open_study(sweep_dir: Path | str, kind: str, name: str, direction: str) -> optuna.Study:
    """Study `name` of the sweep, created if new (its sampler is set per run)."""
    store = storage(sweep_dir, kind)
    with _readable(_file(sweep_dir, kind)[1]):
        study = optuna.create_study(
            study_name=name, storage=store, direction=direction, load_if_exists=True
        )
        study.get_trials(deepcopy=False)  # read the file now: damage shows here, not mid-sweep
    return study


def distributions(space: dict[str, Any]) -> dict[str, BaseDistribution]:
    """A search space in Hydra's sweep syntax (what presets declare in `method.search_space`)
    as Optuna distributions: `interval(a, b)` uniform (integers if both ends are, as with
    `int(interval(1, 6))`), `tag(log, interval(a, b))` log-uniform, `range(a, b[, step])`
    the integers (or floats) a, a + step, ... below b, `choice(x, y, ...)` categorical. A
    fixed value is refused: it would be a setting, not a search."""
    out: dict[str, BaseDistribution] = {}
    for o in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in space.items()]):
        key, value = o.get_key_element(), o.value()
        if isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                out[key] = IntDistribution(value.start, value.end, log=log_scale)
            else:
                out[key] = FloatDistribution(value.start, value.end, log=log_scale)
        elif isinstance(value, RangeSweep):
            values = list(o.sweep_iterator())
            step = value.step if len(values) > 1 else 1
            kind = IntDistribution if all(isinstance(x, int) for x in values) else FloatDistribution
            out[key] = kind(values[0], values[-1], step=step)
        elif isinstance(value, ChoiceSweep):
            out[key] = CategoricalDistribution(list(o.sweep_iterator()))
        else:
            raise ConfigError(
                f"search space: {key}={o.get_value_element_as_str()} is a fixed value; give a "
                "range (interval(a, b), tag(log, interval(a, b)), range(a, b), choice(x, y)) "
                "or set it as an override"
            )
    return out


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


def load(sweep_dir: Path | str, name: str) -> optuna.Study:
    """A tuning sweep's study `name`; a clear error if the sweep or the study is missing, or
    its file is damaged."""
    store = storage(sweep_dir)
    with _readable(_file(sweep_dir, None)[1]):
        names = optuna.get_all_study_names(store)
        if name not in names:
            raise ConfigError(
                f"{_file(sweep_dir, None)[1]} holds no study {name!r} (it holds: "
                f"{', '.join(names)}); tune that cell first"
            )
        study = optuna.load_study(study_name=name, storage=store)
        study.get_trials(deepcopy=False)  # read now, where damage is reported
    return study


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
    store = storage(sweep_dir)
    rows = []
    with _readable(_file(sweep_dir, None)[1]):
        for name in optuna.get_all_study_names(store):
            study = optuna.load_study(study_name=name, storage=store)
            trials = study.trials
            best = study.best_trial if completed(study) else None  # as best_params takes it
            rows.append(
                {
                    "study": name,
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
