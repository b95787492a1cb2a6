"""A run is what its record says: labels from what ran, reports that never merge different
configurations, records that survive a closed stdout, W&B and damaged files."""

import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oscbench.analysis import frame, report
from oscbench.launch.compose import CONF_DIR
from oscbench.launch.config import validate
from oscbench.records.checkpoint import CHECKPOINT, FINAL_MODEL
from oscbench.records.record import load_results
from oscbench.registry import ConfigError
from tests.conftest import build_config, compose_config, run_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["logger=none", "device=cpu"]


def cli(*args, env=None, cwd=ROOT):
    env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "oscbench.run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


# --- the report ----------------------------------------------------------------------


def test_the_report_never_averages_runs_that_differ_in_more_than_the_seed(tmp_path):
    """The issue's repro: two experiments with other epochs, and act_bits 2 and 8, in one
    directory. Each configuration is its own row; only seeds are averaged."""
    for seed in (0, 1):
        for extra in (
            ["trainer.epochs=1"],
            ["trainer.epochs=2"],
            ["trainer.epochs=1", "act_bits=8"],
        ):
            run_config(
                ["method=lsq", "bits=2", f"seed={seed}", *extra, *QUICK],
                tmp_path / f"{'-'.join(extra)}-s{seed}",
            )
    df = frame.runs_frame(frame.load_records(tmp_path))
    stats = frame.summary(df)
    assert list(stats.index.names) == ["method", "act_bits", "trainer.epochs", "bits"]
    assert set(stats.index) == {("lsq", 2, 1, 2), ("lsq", 2, 2, 2), ("lsq", 8, 1, 2)}
    assert (stats["acc_count"] == 2).all()  # two seeds each, nothing else merged
    cell = df[(df["settings"].map(lambda s: s["trainer.epochs"]) == 2)]
    assert stats.loc[("lsq", 2, 2, 2), "acc_mean"] == pytest.approx(cell["acc"].mean())
    table = report.markdown(stats, df)
    assert "| method | act_bits | trainer.epochs | 2-bit |" in table
    assert "| lsq | 8 | 1 |" in table


def test_the_same_run_found_twice_counts_once(tmp_path, capsys):
    run_config(["trainer.epochs=1", *QUICK], tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text((tmp_path / "a" / "results.json").read_text())
    stats = frame.summary(frame.runs_frame(frame.load_records(tmp_path)))
    assert stats["acc_count"].tolist() == [1]
    assert "repeats the run" in capsys.readouterr().err


def test_the_report_names_files_it_cannot_read_and_leaves_a_missing_path_alone(tmp_path, capsys):
    run_config(["trainer.epochs=1", *QUICK], tmp_path / "ok")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "results.json").write_text('{"status": "comp')
    (tmp_path / "dir" / "results.json").mkdir(parents=True)  # unreadable as a file
    records = frame.load_records(tmp_path)
    assert len(records) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cut' / 'results.json'} is damaged" in err
    assert f"cannot read {tmp_path / 'dir' / 'results.json'}" in err
    with pytest.raises(SystemExit, match="is not a directory"):
        report.main([str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


# --- labels ---------------------------------------------------------------------------


def test_every_preset_is_labelled_by_its_own_name():
    """Each preset declares its components (conf/method/*.yaml); composed alone it must
    have exactly those, or runs of it would be labelled by their components."""
    for path in sorted(Path(CONF_DIR, "method").glob("*.yaml")):
        spec = validate(compose_config([f"method={path.stem}"]))
        assert spec.method == spec.preset == path.stem


@pytest.mark.parametrize(
    ("overrides", "method", "bits"),
    [
        (["method=lsq", "policy=[dampen,freeze]"], "lsq+dampen+freeze", "w4a4"),
        (["method=lsq_dampen", "policy=[]"], "lsq", "w4a4"),
        (["method=ofq", "quantizer=lsq"], "lsq+cga", "w4a4"),
        (["method=lsq", "act_quantizer=none", "bits=2"], "lsq", "w2a32"),
        (["method=fp", "ptq=true", "bits=3"], "ptq", "w3a32"),
        (["method=osc_reg", "ptq=false"], "fp+osc_reg", "fp32"),
        (["method=fp", "bits=3"], "fp", "fp32"),
    ],
)
def test_labels_follow_the_components_that_run(overrides, method, bits):
    spec = validate(compose_config(overrides))
    assert (spec.method, spec.bits_label) == (method, bits)


def test_the_run_directory_and_the_record_carry_those_labels(tmp_path):
    proc = cli("act_quantizer=none", "bits=2", "trainer.epochs=1", "logger=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs" / "lsq").iterdir()
    assert run_dir.name.startswith("w2a32-cnn_small-digits-s0")
    record = load_results(run_dir)
    assert (record["method"], record["bits"]) == ("lsq", "w2a32")
    assert "oscbench: lsq W2A32," in proc.stdout


def test_a_full_precision_model_with_activation_quantization_is_refused():
    with pytest.raises(ConfigError, match="quantizer=none quantizes no layer"):
        validate(compose_config(["method=fp", "act_quantizer=lsq"]))
    with pytest.raises(ConfigError, match="ptq=true rounds a full-precision model"):
        validate(compose_config(["method=lsq", "ptq=true"]))


def test_ptq_without_cross_bits_reports_its_rounded_accuracy(tmp_path):
    final = run_config(
        ["method=ptq", "bits=2", "cross_bits=[]", "trainer.epochs=3", *QUICK], tmp_path
    )  # noqa: E501
    assert set(k for k in final if k.startswith("acc@")) == {"acc@2bit"}
    assert final["acc@2bit"] != final["acc_bn"]  # ternary weights lose accuracy on digits
    df = frame.runs_frame(frame.load_records(tmp_path))
    assert df["acc"].tolist() == [final["acc@2bit"]] and df["method"].tolist() == ["ptq"]


# --- printing, files, W&B -------------------------------------------------------------


def test_a_closed_stdout_never_changes_a_completed_record(tmp_path):
    """`python -m oscbench.run ... | head -1`: the reader goes away after one line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oscbench.run",
            "trainer.epochs=2",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],  # noqa: E501
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout.readline().startswith(b"epoch 1/2")
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert load_results(tmp_path)["status"] == "completed"
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_records_and_checkpoints_get_the_umask_mode(tmp_path):
    """mkstemp's 0600 would hide records from other users of a shared sweep directory."""
    proc = subprocess.run(
        f"umask 002 && {sys.executable} -m oscbench.run trainer.epochs=1 logger=none "
        f"hydra.run.dir={tmp_path}",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("results.json", CHECKPOINT, FINAL_MODEL):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def test_wandb_online_without_a_network_logs_offline_and_the_record_completes(tmp_path):
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "WANDB_API_KEY": "k" * 40}
    proc = cli("trainer.epochs=1", "logger.mode=online", f"hydra.run.dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr
    record = load_results(tmp_path)
    assert record["status"] == "completed" and record["wandb"]["mode"] == "offline"
    assert "cannot connect to http://127.0.0.1" in record["wandb"]["online_failed"]
    assert proc.stderr.count("logging offline instead") == 1
    assert f"wandb sync {record['wandb']['dir']}" in proc.stderr
    assert list(Path(record["wandb"]["dir"]).glob("*.wandb"))  # the offline run has the data
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_wandb_online_without_an_api_key_logs_offline(tmp_path):
    with socket.socket() as server:  # a server that accepts connections: the key is missing
        server.bind(("127.0.0.1", 0))
        server.listen()
        env = {
            "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
            "WANDB_API_KEY": "",
            "HOME": str(tmp_path),  # no ~/.netrc either
        }
        proc = cli(
            "trainer.epochs=1", "logger.mode=online", f"hydra.run.dir={tmp_path / 'r'}", env=env
        )  # noqa: E501
    assert proc.returncode == 0, proc.stderr
    record = load_results(tmp_path / "r")
    assert record["status"] == "completed" and record["wandb"]["mode"] == "offline"
    assert "API key" in record["wandb"]["online_failed"]


def test_a_wandb_failure_during_training_stops_the_mirror_not_the_run(
    tmp_path, monkeypatch, capsys
):
    import wandb.sdk.wandb_run

    def broken(*args, **kwargs):
        raise RuntimeError("the W&B service went away")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    run_config(["trainer.epochs=2", "device=cpu"], tmp_path)
    assert load_results(tmp_path)["status"] == "completed"
    assert capsys.readouterr().err.count("the W&B service went away") == 1


@pytest.mark.parametrize(
    ("env", "mode"), [("disabled", "disabled"), ("dryrun", "offline"), ("online", "online")]
)  # noqa: E501
def test_wandb_mode_comes_from_wandb_mode_as_wandb_users_expect(monkeypatch, env, mode):
    monkeypatch.setenv("WANDB_MODE", env)
    assert validate(compose_config([])).logger.mode == mode
    assert validate(compose_config(["logger.mode=offline"])).logger.mode == "offline"  # explicit


# --- damaged files ----------------------------------------------------------------------


def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path):
    run_config(["trainer.epochs=2", *QUICK], tmp_path)
    record = load_results(tmp_path)
    record["status"] = "running"  # as if killed
    (tmp_path / "results.json").write_text(json.dumps(record))
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])  # truncated
    proc = cli("trainer.epochs=2", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / CHECKPOINT} is damaged" in proc.stderr
    assert "trainer.resume=never" in proc.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / CHECKPOINT)  # a foreign file
    with pytest.raises(ConfigError, match="is not an oscbench checkpoint"):
        run_config(["trainer.epochs=2", *QUICK], tmp_path)
    run_config(["trainer.epochs=2", "trainer.resume=never", *QUICK], tmp_path)
    assert load_results(tmp_path)["status"] == "completed"


def test_a_checkpoint_that_does_not_fit_the_run_is_named_with_the_fix(tmp_path):
    """A checkpoint of an older oscbench: here, without the tracker's d_Q/d_w state."""
    run_config(["trainer.epochs=2", *QUICK], tmp_path)
    record = load_results(tmp_path)
    record["status"] = "running"  # as if killed
    (tmp_path / "results.json").write_text(json.dumps(record))
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    ckpt["tracker"] = {k: v for k, v in ckpt["tracker"].items() if not k.startswith("moves.")}
    torch.save(ckpt, tmp_path / CHECKPOINT)
    proc = cli("trainer.epochs=2", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{CHECKPOINT} does not fit this run" in proc.stderr
    assert "moves.0.previous" in proc.stderr and "trainer.resume=never" in proc.stderr


def test_a_damaged_record_is_set_aside_and_said_so(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"status": "runn')
    run_config(["trainer.epochs=1", *QUICK], tmp_path)
    assert load_results(tmp_path)["status"] == "completed"
    assert (tmp_path / "results.json.damaged").read_text() == '{"status": "runn'
    assert "results.json is damaged" in capsys.readouterr().err


def test_a_damaged_or_foreign_init_from_file_is_named(tmp_path):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ConfigError, match=r"cut.pth cannot be read as PyTorch or safetensors"):
        build_config([f"init_from={tmp_path / 'cut.pth'}"])
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="holds a list, not a state dict"):
        build_config([f"init_from={tmp_path / 'list.pth'}"])


def test_init_from_that_fills_part_of_the_model_is_refused_unless_told(tmp_path, capsys):
    run_config(["method=fp", "trainer.epochs=1", *QUICK], tmp_path / "fp")
    state = torch.load(tmp_path / "fp" / FINAL_MODEL)
    part = dict(list(state.items())[:6])  # 6 of 20 tensors, the classifier missing
    torch.save(part, tmp_path / "part.pth")
    with pytest.raises(ConfigError, match="fills only 6 of the model's 20 tensors") as err:
        build_config([f"init_from={tmp_path / 'part.pth'}"])
    assert "not filled: 3, 4, 7, 8, 12 (classifier)" in str(err.value)
    assert "init_strict=false" in str(err.value)
    _, built = build_config([f"init_from={tmp_path / 'part.pth'}", "init_strict=false"])
    assert built.init["loaded"] == 6
    assert "loaded 6 of 20 tensors; not filled: " in capsys.readouterr().out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_run_is_recorded_as_interrupted_and_resumes(sig, code, tmp_path):
    """SIGTERM (SLURM at a time limit, before its SIGKILL) and Ctrl-C after the first epoch:
    the record says `interrupted` and when (not `running` for ever, not `failed` with a
    traceback), one line says so, the exit code is the shell's for the signal, and the same
    command continues from the checkpoint."""
    cmd = [sys.executable, "-m", "oscbench.run", "trainer.epochs=8", "logger=none"]
    cmd += [f"hydra.run.dir={tmp_path}"]
    # SIGINT as a terminal delivers it: a job started in the background (`pytest ... &`)
    # inherits SIGINT ignored, and Python then keeps it ignored
    default = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, preexec_fn=default
    )
    assert proc.stdout.readline().startswith(b"epoch 1/8")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    record = load_results(tmp_path)
    epoch = len(record["history"])
    assert proc.returncode == code, err.decode()[-2000:]
    assert record["status"] == "interrupted" and 1 <= epoch < 8
    assert record["error"] == f"interrupted by {sig.name} after epoch {epoch}"
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.decode(), lines
    assert lines[0].startswith(f"oscbench: interrupted by {sig.name}; {tmp_path / 'results.json'}")
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {tmp_path} after epoch {epoch} of 8" in again.stdout
    assert load_results(tmp_path)["status"] == "completed"


class _HydraLikeJob:
    """A job as Hydra's submitit launchers submit one: oscbench's task function (here through
    its command line) in a task process where submitit handles its own signal (SIGUSR2),
    checkpointable as their launcher is (`checkpoint`: the same job again, which submitit
    requeues). The task process writes its id to `pid`."""

    def __init__(self, args: list[str], pid: Path) -> None:
        self.args, self.pid = args, pid

    def __call__(self) -> None:
        from oscbench.run import main

        self.pid.write_text(str(os.getpid()))
        sys.argv = ["oscbench.run", *self.args]
        main()

    def checkpoint(self):  # noqa: ANN201
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def test_a_preempted_submitit_job_is_recorded_as_interrupted_requeued_and_resumed(
    tmp_path, monkeypatch
):
    """submitit's signal sent to the job's task process, as submitit's local controller
    sends it near the time limit (in a job of under 10 minutes every such signal is a time
    limit): the first requeues the job (one such requeue allowed), which resumes from the
    checkpoint; the second ends it. Each time the record
    says `interrupted` by SIGUSR2, not `failed` with submitit's exit as its traceback, and
    the same command then completes the run."""
    import submitit

    # the job process unpickles _HydraLikeJob from this module, by pytest's name for it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(map(str, (ROOT, ROOT / "tests"))))
    run_dir = tmp_path / "run"
    args = ["trainer.epochs=8", "logger=none", f"hydra.run.dir={run_dir}"]
    executor = submitit.LocalExecutor(tmp_path / "submitit", max_num_timeout=1)
    executor.update_parameters(timeout_min=1)
    pid = tmp_path / "pid"
    job = executor.submit(_HydraLikeJob(args, pid))

    def record_once(done) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not job.done():
            record = load_results(run_dir) if (run_dir / "results.json").exists() else None
            if record is not None and done(record):
                return record
            time.sleep(0.02)
        raise AssertionError(job.stderr())

    record_once(lambda r: len(r["history"]) >= 1)
    os.kill(int(pid.read_text()), signal.SIGUSR2)
    first = record_once(lambda r: r["status"] == "interrupted")
    epoch = len(first["history"])
    assert first["error"] == f"interrupted by SIGUSR2 after epoch {epoch}"
    record_once(lambda r: r["attempts"] == 2 and len(r["history"]) > epoch)
    os.kill(int(pid.read_text()), signal.SIGUSR2)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="timed-out too many times"):
        job.result()
    last = load_results(run_dir)
    epoch = len(last["history"])
    assert last["status"] == "interrupted" and last["attempts"] == 2 and epoch < 8
    assert last["error"] == f"interrupted by SIGUSR2 after epoch {epoch}"
    assert "Requeued job" in job.stderr() + job.stdout()
    assert job.stderr().count("oscbench: interrupted by SIGUSR2 (submitit: preempted") == 2
    cmd = [sys.executable, "-m", "oscbench.run", *args]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {run_dir} after epoch {epoch} of 8" in again.stdout
    assert load_results(run_dir)["status"] == "completed"


def test_help_into_a_closed_pipe_exits_quietly():
    """`python -m oscbench.run --help | head -1`: the reader is gone before Hydra prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "oscbench.run", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""
