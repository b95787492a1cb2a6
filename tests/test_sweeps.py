"""Sweeps through Hydra's real launchers, idempotent relaunches, failures, W&B grouping,
the report and the notebook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from oscbench.analysis import frame, report
from oscbench.records.runs import RESULTS
from tests.conftest import check_latex

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=compare_methods",
    "method=fp,lsq",
    "bits=2",
    "seed=0",
    "trainer.epochs=1",
    "logger=none",
]


def sweep(sweep_dir, *args, check=True):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "oscbench.run", *args, f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def records(sweep_dir):
    return {
        p.parent.relative_to(sweep_dir).as_posix(): json.loads(p.read_text())
        for p in Path(sweep_dir).rglob(RESULTS)
    }


def check_report(sweep_dir, methods, bits):
    records = frame.load_records(sweep_dir)
    paths = report.write_report(records, sweep_dir / "report")
    table = (sweep_dir / "report" / "table.md").read_text()
    columns = " | ".join(f"{b}-bit" for b in bits) + " |"
    runs = frame.runs_frame(records)
    present = [m for m in frame.METRICS if runs[m].notna().any()]  # a table each
    assert "acc_exported" not in present  # nothing exported: no table of '-'
    accuracies = [m for m in present if m.startswith("acc")]  # with deployability
    assert table.count(f"| method | deployable | {columns}") == len(accuracies) == 1
    assert table.count(f"| method | {columns}") == len(present) - len(accuracies)
    assert "d_Q/d_w" in table
    for m in methods:
        assert f"| {m} |" in table
    stats = frame.summary(frame.runs_frame(frame.load_records(sweep_dir)))
    assert set(stats.index) == {(m, b) for m in methods for b in bits}
    pngs = [p for name, p in paths.items() if name.endswith(".png")]
    names = ("accuracy_vs_bits", "oscillation_over_training", "oscillation_by_layer")
    assert {f"{n}.png" for n in (*names, "oscillation_histograms")} <= {p.name for p in pngs}
    check_latex(paths["table.tex"].read_text(), sweep_dir)
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    return stats


@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_tiny_compare_methods_through_a_real_launcher_then_report(tmp_path, launcher):
    extra = (
        ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    )
    sweep(tmp_path, *TINY, f"hydra/launcher={launcher}", *extra)
    recs = records(tmp_path)
    assert sorted(r["config"]["method"]["name"] for r in recs.values()) == ["fp", "lsq"]
    assert all(r["status"] == "completed" for r in recs.values())
    lsq = next(r for r in recs.values() if r["config"]["method"]["name"] == "lsq")
    fp_dir = next(k for k, r in recs.items() if r["config"]["method"]["name"] == "fp")
    assert lsq["final"]["init"]["from"] == str(tmp_path / fp_dir)  # QAT started from the fp run
    stats = check_report(tmp_path, ["fp", "lsq"], [2])
    assert stats.loc[("lsq", 2), "acc_count"] == 1


def test_relaunching_a_sweep_trains_nothing_and_fp_is_trained_once(tmp_path):
    args = [
        "experiment=compare_methods",
        "method=fp,lsq",
        "bits=2,3",
        "seed=0",
        "trainer.epochs=1",
        "logger=none",
    ]
    sweep(tmp_path, *args)
    first = {k: (v["wall_time_s"], v["key"]) for k, v in records(tmp_path).items()}
    fp_runs = [k for k in first if k.startswith("fp/")]
    assert len(fp_runs) == 1  # fp at bits 2 and 3 is one run
    assert len(first) == 3
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")}
    out = sweep(tmp_path, *args).stdout
    assert out.count("already holds this completed run") == 4
    assert {k: (v["wall_time_s"], v["key"]) for k, v in records(tmp_path).items()} == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")} == stamps
    stats = frame.summary(frame.runs_frame(frame.load_records(tmp_path)))
    assert stats.loc[("fp", 2), "acc_mean"] == stats.loc[("fp", 3), "acc_mean"]


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    args = ["-m", "method=lsq", "trainer.lr=1e30,0.05", "trainer.epochs=1", "logger=none"]
    proc = sweep(tmp_path, *args, check=False)
    assert proc.returncode != 0  # Hydra reports the failure at the end
    status = {r["config"]["trainer"]["lr"]: r for r in records(tmp_path).values()}
    assert status[1e30]["status"] == "failed" and "diverged" in status[1e30]["error"]
    assert status[0.05]["status"] == "completed"  # launched after the failure
    report.write_report(frame.load_records(tmp_path), tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "(1 failed)" in table and "Runs that did not complete" in table
    assert "training diverged" in table
    # relaunching retries the failed run only
    out = sweep(tmp_path, *args, check=False).stdout
    assert out.count("already holds this completed run") == 1


def test_wandb_runs_are_one_per_job_grouped_by_sweep(tmp_path):
    sweep(tmp_path, "-m", "method=lsq,aoq", "bits=2", "trainer.epochs=2")
    recs = list(records(tmp_path).values())
    ids = {r["wandb"]["id"] for r in recs}
    assert len(ids) == 2  # sequential jobs in one process did not merge
    for r in recs:
        files = list(Path(r["run_dir"]).glob(f"wandb/offline-run-*-{r['wandb']['id']}/*.wandb"))
        data = files[0].read_bytes()
        assert tmp_path.name.encode() in data  # group = the sweep's name
        assert r["config"]["method"]["name"].encode() in data  # job_type = method
        assert b"w2a2" in data and b"osc/count_hist" in data and b"acc_bn" in data


def _execute_notebook(sweep_dir):
    nb = nbformat.read(ROOT / "notebooks" / "compare_methods.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped in git
    os.environ["OSCBENCH_SWEEP"] = str(sweep_dir)
    try:
        NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    finally:
        del os.environ["OSCBENCH_SWEEP"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return text, images


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_notebook_executes_against_a_sweep(tmp_path):
    sweep(tmp_path, *TINY)
    text, images = _execute_notebook(tmp_path)
    assert "2 runs in" in text and "| lsq |" in text
    assert len(images) >= 3


def test_notebook_without_a_sweep_says_how_to_make_one(tmp_path):
    text, images = _execute_notebook(tmp_path / "nothing")
    assert "No runs in" in text and "make sweep" in text and not images
