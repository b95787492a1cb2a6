"""End to end: the app trains, records and mirrors to W&B; runs are deterministic."""

import json
import math
import subprocess
import sys

import pytest

from oscbench.records.files import write_json_atomic
from oscbench.records.record import Recorder, load_results, machine
from oscbench.records.wandb import LoggerConfig
from tests.conftest import run_config
from tests.learned import above, at_least


def _finite(history):
    for rec in history:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert math.isfinite(rec[key]), key
        osc = rec.get("osc")
        if osc:
            assert all(math.isfinite(osc[k]) for k in ("osc_share", "mean_freq", "crossings"))


@pytest.mark.learned
def test_default_run_reaches_95_percent(tmp_path):
    """`make run`'s configuration (LSQ W4A4, cnn_small, digits), without W&B: 99.4-99.7 %
    after BN re-estimation on every CPU path (bench/margins.md)."""
    final = run_config(["logger=none", "device=cpu"], tmp_path)
    at_least("test accuracy after BN re-estimation (%)", final["acc_bn"], 95.0)
    at_least("test accuracy (%)", final["acc"], 95.0)


def test_command_line_run_writes_record_and_offline_wandb_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oscbench.run",
            "method=lsq",
            "bits=2",
            "trainer.epochs=3",
            "device=cpu",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr
    res = load_results(tmp_path)
    assert res["status"] == "completed"
    assert len(res["history"]) == 3
    _finite(res["history"])
    assert res["config"]["bits"] == 2 and res["config"]["act_bits"] == 2  # resolved
    assert res["final"]["osc_share"] > 0 and res["final"]["crossings_total"] > 0
    assert "torch" in res["versions"] and res["wall_time_s"] > 0
    # the summary printed for the user
    assert "oscillating weights" in proc.stdout and "crossings" in proc.stdout
    assert "d_Q / d_w" in proc.stdout and res["final"]["dq_dw"] > 0
    assert all(h["osc"]["dq_dw"] > 0 for h in res["history"])  # logged every epoch
    # W&B offline: the run directory holds the run's data file under the recorded id
    run_id = res["wandb"]["id"]
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    data_file = offline[0] / f"run-{run_id}.wandb"
    assert data_file.stat().st_size > 1000


@pytest.mark.learned
def test_full_precision_run_has_no_tracker(tmp_path, quick, capsys):
    """3 epochs: 98.9 % on every CPU path (bench/margins.md)."""
    final = run_config(["method=fp", *quick], tmp_path)
    assert "osc_share" not in final
    above("test accuracy (%)", final["acc"], 80)
    res = load_results(tmp_path)
    assert all("osc" not in h for h in res["history"])
    assert "not tracked" in capsys.readouterr().out


def test_the_summary_counts_every_epoch_that_ran(tmp_path, capsys):
    """OFQ's CGA phase runs after the main epochs: the summary says so."""
    run_config(
        ["method=ofq", "trainer.epochs=2", "trainer.extra_epochs=1", "logger=none"], tmp_path
    )
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "2 epochs + 1 extra at lr 0.000915 in" in out


def test_two_bit_lsq_oscillates(tmp_path, quick):
    final = run_config(["bits=2", *quick], tmp_path)
    hist = load_results(tmp_path)["history"]
    assert final["osc_share"] > 0 and final["oscillations_total"] > 0
    assert all(h["osc"]["crossings"] > 0 for h in hist)
    assert sum(final["osc_count_hist"]) == final["tracked_weights"]


def test_same_seed_gives_identical_runs(tmp_path, quick):
    a = run_config(["bits=2", *quick], tmp_path / "a")
    b = run_config(["bits=2", *quick], tmp_path / "b")
    ha, hb = load_results(tmp_path / "a")["history"], load_results(tmp_path / "b")["history"]
    assert ha == hb
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {
        k: v for k, v in b.items() if k != "wall_time_s"
    }
    c = run_config(["bits=2", "seed=1", *quick], tmp_path / "c")
    assert (
        load_results(tmp_path / "c")["history"] != ha
        and c["crossings_total"] != a["crossings_total"]
    )


def test_sequential_wandb_runs_in_one_process_stay_separate(tmp_path):
    ids = []
    for i in range(2):
        run_config(["trainer.epochs=1", "device=cpu", f"seed={i}"], tmp_path / str(i))
        ids.append(load_results(tmp_path / str(i))["wandb"]["id"])
    assert ids[0] != ids[1]
    for i, run_id in enumerate(ids):
        assert list((tmp_path / str(i) / "wandb").glob(f"offline-run-*-{run_id}"))


def test_failed_run_is_recorded_as_failed(tmp_path):
    logger = LoggerConfig(name="none", mode="disabled", project="x")
    labels = {"method": "lsq", "bits": "w4a4"}
    rec = Recorder(tmp_path, {"a": 1}, logger, labels, "r", machine("cpu"))
    with pytest.raises(RuntimeError), rec:
        rec.log_epoch({"epoch": 1, "val_acc": 50.0})
        raise RuntimeError("diverged")
    res = load_results(tmp_path)
    assert res["status"] == "failed" and "diverged" in res["error"] and len(res["history"]) == 1


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left
