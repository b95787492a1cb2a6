"""A run killed mid-training and restarted with the same command ends exactly where an
uninterrupted run ends (CPU); checkpoints refuse another configuration."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from oscbench.launch.compose import presets
from oscbench.records.checkpoint import CHECKPOINT
from oscbench.records.record import load_results
from oscbench.registry import ConfigError
from tests.conftest import run_config

ARGS = ["method=lsq_freeze", "bits=3", "trainer.epochs=20", "logger=none", "device=cpu"]


def _command(run_dir):
    return [sys.executable, "-m", "oscbench.run", *ARGS, f"hydra.run.dir={run_dir}"]


def _epochs_done(run_dir):
    try:
        return len(json.loads((run_dir / "results.json").read_text())["history"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _comparable(final):
    return {k: v for k, v in final.items() if k != "wall_time_s"}


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_killed_run_resumes_to_the_same_final_numbers(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen(_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _epochs_done(killed) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _epochs_done(killed)
    assert 3 <= done_at_kill < 20, "the run was not killed mid-training"
    assert load_results(killed)["status"] == "running"
    assert (killed / CHECKPOINT).exists()

    elapsed_at_checkpoint = torch.load(killed / CHECKPOINT, weights_only=False)["elapsed_s"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    outputs = [
        subprocess.run(
            _command(run_dir), check=True, capture_output=True, text=True, timeout=300, env=env
        ).stdout
        for run_dir in (killed, whole)
    ]
    a, b = load_results(killed), load_results(whole)
    assert a["status"] == b["status"] == "completed"
    assert a["resumed_at_epoch"] >= done_at_kill and b["resumed_at_epoch"] is None
    assert (a["attempts"], b["attempts"]) == (2, 1)
    assert f"resuming {killed} after epoch {a['resumed_at_epoch']} of 20" in outputs[0]
    assert f"resumed              after epoch {a['resumed_at_epoch']}" in outputs[0]
    assert "resuming" not in outputs[1]
    # the wall time counts the killed attempt up to its checkpoint, then the second one
    assert a["final"]["wall_time_s"] > elapsed_at_checkpoint > 0
    assert a["history"] == b["history"]
    assert _comparable(a["final"]) == _comparable(b["final"])
    assert a["final"]["freeze/frozen_share"] > 0  # freeze state went through the checkpoint


def test_rerun_of_a_completed_run_trains_nothing(tmp_path, capsys):
    args = ["trainer.epochs=2", "logger=none", "device=cpu"]
    first = run_config(args, tmp_path)
    stamp = (tmp_path / CHECKPOINT).stat().st_mtime_ns
    second = run_config(args, tmp_path)
    assert second == first
    assert (tmp_path / CHECKPOINT).stat().st_mtime_ns == stamp
    assert "already holds this completed run" in capsys.readouterr().out


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    run_config(["trainer.epochs=2", "logger=none", "device=cpu"], tmp_path)
    record = load_results(tmp_path)
    record["status"] = "running"  # as if killed
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="trainer.lr: 0.05 -> 0.1"):
        run_config(["trainer.epochs=2", "trainer.lr=0.1", "logger=none", "device=cpu"], tmp_path)
    final = run_config(
        ["trainer.epochs=2", "trainer.lr=0.1", "logger=none", "device=cpu", "trainer.resume=never"],
        tmp_path,
    )
    assert load_results(tmp_path)["config"]["trainer"]["lr"] == 0.1 and final["acc"] > 0


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    run_config(["method=aoq", "bits=2", "trainer.epochs=2", "logger=none", "device=cpu"], tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert {
        "model",
        "optimizer",
        "ema",
        "policies",
        "tracker",
        "rng",
        "epoch",
        "step",
        "history",
        "fingerprint",
        "elapsed_s",
    } <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["policies"] == [{"_extra_state": {"stage": 3}}]
    assert any(k.endswith("freq") for k in ckpt["tracker"])
    keys = ckpt["model"].keys()
    assert any(k.endswith("weight_quantizer.s_th") for k in keys)
    assert any(k.endswith("input_quantizer._extra_state") for k in keys)


class _Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint (the subprocess test above kills for
    real, once; here every preset goes through the same path in-process)."""


def kill_and_resume(args: list[str], tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Run `args` whole, and again killed after its first epoch's checkpoint and resumed:
    the same history and final numbers."""
    from oscbench.training.loop import Trainer

    whole = run_config(args, tmp_path / "whole")
    real_fit = Trainer.fit

    def killed_after_the_first_epoch(self, on_epoch, save, measure=None):
        def save_then_die(state):
            save(state)
            if state["epoch"] == 1:
                raise _Killed

        return real_fit(self, on_epoch, save_then_die, measure)

    monkeypatch.setattr(Trainer, "fit", killed_after_the_first_epoch)
    with pytest.raises(_Killed):
        run_config(args, tmp_path / "killed")
    monkeypatch.undo()
    resumed = run_config(args, tmp_path / "killed")
    a, b = load_results(tmp_path / "killed"), load_results(tmp_path / "whole")
    assert a["resumed_at_epoch"] == 1 and a["status"] == "completed"
    assert a["history"] == b["history"]
    assert _comparable(resumed) == _comparable(whole)


@pytest.mark.parametrize("method", [p.name for p in presets()])
def test_every_preset_resumes_after_a_kill_to_the_same_final_numbers(method, tmp_path, monkeypatch):
    args = [f"method={method}", "bits=2", "trainer.epochs=2", "logger=none", "device=cpu"]
    kill_and_resume(args, tmp_path, monkeypatch)
