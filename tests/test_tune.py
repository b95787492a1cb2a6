"""Tuning: every preset's own search space, Optuna studies that never see the test split,
survive a kill and a failing trial, and final runs at the best parameters on fresh seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from oscbench.analysis import frame, report
from oscbench.launch.compose import presets
from oscbench.launch.config import validate
from oscbench.launch.tune import INTERRUPTED, distributions, storage_url
from tests.conftest import check_latex, compose_config

QUICK = ["trainer.epochs=3", "logger=none", "device=cpu"]


@pytest.mark.parametrize("method", [p.name for p in presets()])
def test_every_preset_declares_a_search_space_over_its_own_settings(method):
    """Beside each preset (conf/method/<name>.yaml): keys of the composed run config, each a
    distribution for Optuna (the sweeper's own parser), none a fixed value."""
    cfg = compose_config([f"method={method}"])
    space = OmegaConf.to_container(cfg.method.search_space)
    for key in space:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    found = distributions(space)  # the sweeper's own parser; it refuses a fixed value
    assert len(found) == len(space)
    for key, dist in found.items():  # both ends of every range are valid runs
        for value in (dist.low, dist.high):
            validate(compose_config([f"method={method}", f"{key}={value}"]))


def _script(tmp_path: Path, code: str) -> Path:
    """A script that runs oscbench.run after `code` (a test's patch)."""
    script = tmp_path / "patched_run.py"
    script.write_text(f"import os, signal\n{code}\nfrom oscbench.run import main\nmain()\n")
    return script


def _run(script: Path | None, *overrides: str) -> subprocess.CompletedProcess:
    head = [str(script)] if script else ["-m", "oscbench.run"]
    env = os.environ | {"WANDB_SILENT": "true"}
    cmd = [sys.executable, *head, *overrides, *QUICK]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


NO_TEST = """
import oscbench.data.base as base
def refuse(self, split, batch_size, _orig=base.TensorData.eval_batches):
    if split == "test":
        raise RuntimeError("tuning read the test split")
    return _orig(self, split, batch_size)
base.TensorData.eval_batches = refuse
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A tuning sweep of two methods at 2 bits, 3 trials each, with the test split made
    unreadable."""
    root = tmp_path_factory.mktemp("tune")
    sweep = root / "sweep"
    script = _script(root, NO_TEST)
    args = ["experiment=tune_methods", "method=lsq,lsq_dampen", "bits=2", "tune.trials=3"]
    proc = _run(script, *args, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_tuning_never_reads_the_test_split_and_optimises_the_records_validation_accuracy(tuned):
    url = storage_url(tuned)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == ["lsq-bits2", "lsq_dampen-bits2"]
    records = _records(tuned)
    assert len(records) == 6
    by_lr = {r["config"]["trainer"]["lr"]: r for r in records}
    for name in names:
        trials = optuna.load_study(study_name=name, storage=url).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
        for t in trials:
            record = by_lr[t.params["trainer.lr"]]
            assert record["method"] == name.split("-")[0]
            assert t.value == record["final"]["val_acc_bn"]  # the objective, as recorded
            assert "acc" not in record["final"] and record["splits"]["sizes"]["test"] is None
    best = OmegaConf.load(tuned / "best.yaml")
    assert {b.study for b in best} == set(names) and all(b.complete == 3 for b in best)


@pytest.mark.slow  # 30 s
def test_final_runs_take_each_cells_best_parameters_on_fresh_seeds(tuned, tmp_path):
    args = ["experiment=final_methods", "method=lsq,lsq_dampen", "bits=2", "seed=1,2"]
    proc = _run(None, *args, f"tune.dir={tuned}", f"hydra.sweep.dir={tmp_path / 'final'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = storage_url(tuned)
    records = _records(tmp_path / "final")
    assert sorted((r["method"], r["config"]["seed"]) for r in records) == [
        ("lsq", 1),
        ("lsq", 2),
        ("lsq_dampen", 1),
        ("lsq_dampen", 2),
    ]
    for r in records:
        best = optuna.load_study(study_name=f"{r['method']}-bits2", storage=url).best_trial
        flat = OmegaConf.create(r["config"])
        for key, value in best.params.items():
            assert OmegaConf.select(flat, key) == value
        assert r["final"]["acc_bn"] > 0 and r["splits"]["sizes"]["test"] == 360
    untuned = tmp_path / "untuned"  # the presets' own values on the same seeds
    proc = _run(None, *args, "hydra.sweeper.use=defaults", f"hydra.sweep.dir={untuned}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["config"]["trainer"]["lr"] for r in _records(untuned)} == {0.05}
    finals = frame.load_records(tmp_path / "final")
    paths = report.write_report(finals, tmp_path / "r", "lsq", tuned, untuned)
    table = paths["table.md"].read_text()
    versus = pd.read_csv(paths["versus.csv"])
    assert sorted(versus["label"]) == ["lsq", "lsq_dampen"] and (versus["n"] == 2).all()
    assert "### Against untuned" in table
    for r in OmegaConf.to_container(OmegaConf.load(tuned / "best.yaml")):
        lr = r["params"]["trainer.lr"]
        assert f"| {r['study']} | 3 (0) | {r['best_trial']} | {r['best_value']:.2f} |" in table
        assert f"trainer.lr={lr:.4g}" in table
    assert {"oscillation_over_training.png", "oscillation_by_layer.png"} <= set(paths)
    check_latex(paths["table.tex"].read_text(), tmp_path)
    proc = _run(None, *args[:3], "seed=1", "tune.dir=/nonexistent", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no tuning study at /nonexistent" in proc.stderr


KILL_AND_FAIL = """
import oscbench.records.record as record, oscbench.run as run
calls = {"execute": 0, "epochs": 0}
_execute, _log = run.execute, record.Recorder.log_epoch
def execute(*args, **kwargs):
    calls["execute"] += 1
    if calls["execute"] == 2:
        raise RuntimeError("trial 1 fails")
    return _execute(*args, **kwargs)
def log_epoch(self, rec):
    _log(self, rec)
    calls["epochs"] += 1
    if calls["epochs"] == 8:  # trial 3's second epoch (trials 0 and 2 ran 3 each)
        os.kill(os.getpid(), signal.SIGKILL)
run.execute, record.Recorder.log_epoch = execute, log_epoch
"""


def test_a_killed_study_keeps_its_trials_reruns_the_interrupted_one_and_a_failure_is_recorded(
    tmp_path,
):
    """Trial 1 raises (recorded as failed, the study goes on); the process is killed after
    trial 3's second epoch. The same command again keeps trials 0-3 as they were, runs
    trial 3's parameters again as trial 4, resuming its run from the checkpoint (not
    trained twice), and runs the one trial left of the budget of 5."""
    sweep = tmp_path / "sweep"
    args = ["experiment=tune_methods", "method=lsq", "bits=2", "tune.trials=5"]
    args += [f"hydra.sweep.dir={sweep}"]
    killed = _run(_script(tmp_path, KILL_AND_FAIL), *args)
    assert killed.returncode == -9
    study = optuna.load_study(study_name="lsq-bits2", storage=storage_url(sweep))
    before = [(t.number, t.state, t.value) for t in study.trials]
    states = [s for _, s, _ in before]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING]
    again = _run(None, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="lsq-bits2", storage=storage_url(sweep)).trials
    assert [(t.number, t.state, t.value) for t in trials[:3]] == before[:3]
    assert trials[3].state == TrialState.FAIL and trials[3].user_attrs[INTERRUPTED]
    assert trials[4].params == trials[3].params and trials[4].state == TrialState.COMPLETE
    assert len(trials) == 6 and trials[5].state == TrialState.COMPLETE
    records = {r["config"]["trainer"]["lr"]: r for r in _records(sweep)}
    assert len(records) == 4  # trials 0, 2, 3 = 4 (one run) and 5; 1 failed before its run
    resumed = records[trials[4].params["trainer.lr"]]
    assert resumed["resumed_at_epoch"] == 2 and resumed["attempts"] == 2
    assert resumed["final"]["val_acc_bn"] == trials[4].value
    assert all(r["attempts"] == 1 for r in records.values() if r is not resumed)


@pytest.mark.parametrize("trials", ["abc", "0", "-1", "2.5"])
def test_a_budget_that_is_not_a_positive_count_is_refused_before_anything_is_written(
    trials, tmp_path
):
    sweep = tmp_path / "sweep"
    proc = _run(
        None,
        "experiment=tune_methods",
        "method=lsq",
        "bits=2",
        f"tune.trials={trials}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"tune.trials={trials} is invalid; allowed: an integer >= 1" in proc.stderr
    assert not sweep.exists()  # no optuna.db, no empty studies, no directory


ALWAYS_FAILS = """
import oscbench.run as run
def execute(*args, **kwargs):
    raise RuntimeError("this run fails")
run.execute = execute
"""


def test_a_tuning_sweep_in_which_every_trial_fails_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["experiment=tune_methods", "method=lsq", "bits=2", "tune.trials=2"]
    proc = _run(_script(tmp_path, ALWAYS_FAILS), *args, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "no trial completed in lsq-bits2" in proc.stderr
    trials = optuna.load_study(study_name="lsq-bits2", storage=storage_url(sweep)).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2


def test_a_damaged_study_file_is_named_with_the_fix_by_every_command_that_reads_it(tmp_path):
    """tune_methods (continuing), final_methods and the report's --tuned: one line that
    names the file and what to do, no SQLAlchemy traceback."""
    sweep = tmp_path / "tuned"
    tune = ["experiment=tune_methods", "method=lsq", "bits=2", "tune.trials=1"]
    proc = _run(None, *tune, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sweep / "optuna.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])  # a disk that filled up
    final = ["experiment=final_methods", "method=lsq", "bits=2", "seed=1", f"tune.dir={sweep}"]
    report_cmd = [sys.executable, "-m", "oscbench.report", str(sweep), "--tuned", str(sweep)]
    procs = [
        _run(None, *tune, f"hydra.sweep.dir={sweep}"),
        _run(None, *final, f"hydra.sweep.dir={tmp_path / 'final'}"),
        subprocess.run(report_cmd, capture_output=True, text=True, timeout=600),
    ]
    for proc in procs:
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"{db} is damaged" in proc.stderr and "move it aside" in proc.stderr
    assert not (tmp_path / "final").exists()  # a rejected command leaves no sweep directory


def test_the_journal_storage_tunes_and_final_runs_read_it(tmp_path):
    """Optuna's file journal (for sweep directories on NFS): the studies live in
    optuna.journal, and final_methods finds them there."""
    sweep = tmp_path / "sweep"
    args = ["experiment=tune_methods", "method=lsq", "bits=2", "tune.trials=2"]
    proc = _run(None, *args, "hydra.sweeper.storage=journal", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "optuna.journal").is_file() and not (sweep / "optuna.db").exists()
    best = OmegaConf.load(sweep / "best.yaml")
    assert [(b.study, b.complete) for b in best] == [("lsq-bits2", 2)]
    final = ["experiment=final_methods", "method=lsq", "bits=2", "seed=1", f"tune.dir={sweep}"]
    proc = _run(None, *final, f"hydra.sweep.dir={tmp_path / 'final'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _records(tmp_path / "final")
    assert record["config"]["trainer"]["lr"] == best[0].params["trainer.lr"]
