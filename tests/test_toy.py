"""The papers' toy problems reproduce their published behaviour."""

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from oscbench.launch.compose import CONF_DIR
from oscbench.toy import run_problem


def _cfg(problem, *overrides):
    with initialize_config_dir(config_dir=f"{CONF_DIR}/toy", version_base="1.3"):
        return compose("toy", overrides=[f"problem={problem}", *overrides])


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_one_weight_qat_trajectory_is_the_papers(tmp_path):
    res = run_problem(_cfg("one_weight"), tmp_path)
    w, q = res["qat"]["w"], res["qat"]["q"]
    assert w[:5] == pytest.approx([0.1, 0.2125, 0.325, 0.4375, 0.55])  # up to 0.55 in four steps
    period = [0.5125, 0.475, 0.5875, 0.55]
    for start in range(5, 21, 4):  # then a sawtooth of period 4
        assert w[start : start + 4] == pytest.approx(period[: len(w[start : start + 4])])
    assert q[5:9] == [1.0, 0.0, 1.0, 1.0] and sum(q[5:9]) / 4 == 0.75
    # lambda = 1/2: the regulariser's gradient is QAT's, so full precision oscillates the same
    assert res["fp_regulariser"]["w"] == pytest.approx(w)
    # dampening from step 8 on holds the weight at one level: no more oscillation
    assert set(res["qat_dampen"]["q"][9:]) == {1.0}
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["problem"] == "one_weight"
    _png(tmp_path / "one_weight.png")


def test_regression_time_average_converges_to_w_star(tmp_path):
    res = run_problem(_cfg("regression", "problem.steps=2000", "problem.sweep_points=7"), tmp_path)
    main = res["main"]
    assert abs(main["mean_q_second_half"] - 0.71) < 0.01
    assert all(abs(q - 0.71) > 1e-3 for q in main["q"])  # q(w) itself is never w*
    freq = [r["oscillations_per_step"] for r in res["sweep"]]
    assert freq[len(freq) // 2] == max(freq) > freq[0]  # fastest with w* midway between levels
    _png(tmp_path / "regression.png")


def test_linear_recovery_records_counts_and_figure(tmp_path):
    res = run_problem(
        _cfg(
            "linear_recovery",
            "problem.num_weights=500",
            "problem.num_samples=200",
            "problem.epochs=3",
            "problem.methods=[lsq,aoq]",
        ),
        tmp_path,
    )
    for name in ("lsq", "aoq"):
        r = res["methods"][name]
        assert 0 <= r["recovered"] <= 500 and r["final_loss"] == r["final_loss"]  # finite
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["results"]["methods"]) == {"lsq", "aoq"}
    _png(tmp_path / "linear_recovery.png")


def test_toy_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oscbench.toy", "problem=one_weight", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one_weight.png").exists() and (tmp_path / "results.json").exists()
