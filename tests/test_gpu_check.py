"""bench/gpu_check.py's report, on numbers made up here: a GPU machine's minutes are few, so
what it writes and which goals it counts as missed is checked on the CPU first."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def results(lsq_ratio: float, syncs: list[str], cuda_acc: float) -> dict:
    fp = {"eager": 20000.0, "compiled": 22000.0}
    throughput = {m: {"eager": 15000.0, "compiled": 16000.0} for m in gpu_check.METHODS}
    throughput["fp"] = fp
    throughput["lsq"] = {"eager": 20000.0 * lsq_ratio, "compiled": 20000.0 * lsq_ratio * 1.1}
    throughput["tracker_share"] = 0.03
    runs = {
        m: {"acc": 80.0, "osc_share": 0.01, "crossings_total": 1000.0} for m in gpu_check.METHODS
    }
    runs["lsq"]["acc"] = cuda_acc
    runs["fp"] = {"acc": 80.0}  # trained in full precision: no oscillation measured
    return {
        "device": "made up",
        "torch": "2.x",
        "date": "2026-12-06",
        "seconds": 1.0,
        "numeric": (0, "123 passed"),
        "throughput": throughput,
        "profile": {
            "lsq": {
                "launches_per_step": 900,
                "device_ms_per_step": 3.0,
                "top": [{"kernel": "k", "ms_per_step": 1.0}],
            }
        },
        "cuda": {"runs": runs, "syncs": syncs},
    }


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """CPU paths of 79-81 % accuracy: CUDA passes in [77, 83]."""
    table = {
        m: {
            p: {"acc": acc, "osc_share": 0.01, "crossings_total": 1000.0}
            for p, acc in (("native", 80.0), ("avx2", 81.0), ("default", 79.0))
        }
        for m in gpu_check.METHODS
    }
    path = tmp_path / "cpu_paths.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(gpu_check, "CPU_PATHS", path)


def test_every_goal_met_misses_none(paths, tmp_path):
    missed = []
    gpu_check.write(results(0.85, [], 82.9), missed, tmp_path / "gpu.md")
    text = (tmp_path / "gpu.md").read_text()
    assert missed == [] and "Goals missed: 0" in text
    assert "| lsq | 17,000 | 0.85 |" in text and "LSQ W4A4 eager 0.85x FP" in text


def test_each_missed_goal_is_counted_and_named(paths, tmp_path):
    missed = []
    gpu_check.write(results(0.5, ["train_step: synchronising"], 83.1), missed, tmp_path / "gpu.md")
    text = (tmp_path / "gpu.md").read_text()
    assert any("LSQ W4A4 eager 0.50x FP" in m for m in missed)
    assert any("1 host synchronisations" in m for m in missed)
    assert any(m.startswith("lsq: acc on CUDA 83.1 in [77, 83]") for m in missed)
    assert len(missed) == 3 and "Goals missed: 3" in text and "83.1 (out)" in text


def test_a_section_not_measured_is_a_missed_goal(paths, tmp_path):
    partial = results(0.9, [], 80.0)
    del partial["cuda"]
    missed = []
    gpu_check.write(partial, missed, tmp_path / "gpu.md")
    assert missed == ["cuda: not measured"]
