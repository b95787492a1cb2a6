"""Bad configurations fail before any training, naming the bad value and what is allowed."""

import subprocess
import sys
import threading

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError

from oscbench.launch.config import validate
from oscbench.launch.preflight import unwritable
from oscbench.registry import ConfigError
from tests.conftest import compose_config, unprivileged


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bits=1", "bits=1 is invalid; allowed: an integer 2..8"),
        ("bits=9", "bits=9 is invalid; allowed: an integer 2..8"),
        ("act_bits=16", "act_bits=16 is invalid; allowed: an integer 2..8"),
        ("trainer.lr=-1", "trainer.lr=-1.0 is invalid; allowed: a number > 0"),
        ("trainer.optimizer=lamb", "allowed: sgd, adam, adamw"),
        ("distill.loss=hard", "allowed: none, soft, soft+hard"),
        ("trainer.schedule=step", "allowed: cosine, linear"),
        ("trainer.epochs=0", "trainer.epochs=0 is invalid"),
        ("trainer.warmup_fraction=1.5", "trainer.warmup_fraction=1.5"),
        ("quantizer.init=median", "init='median' is invalid; allowed: lsq, mse, max"),
        ("oscillation.momentum=2", "oscillation.momentum=2"),
        ("+model.widht=3", "model: unknown key(s) widht; allowed: width"),
        ("trainer.epochs=abc", "trainer.epochs"),
        ("device=tpu", "allowed: auto, cpu, cuda, cuda:N"),
        ("cross_bits=abc", "cross_bits='abc' is invalid; allowed: a list of integers 2..8"),
        ("ptq=maybe", "ptq='maybe' is invalid; allowed: true, false"),
        ("logger.mode=live", "logger.mode='live' is invalid; allowed: offline, online, disabled"),
    ],
)
def test_bad_values_are_rejected_with_the_allowed_ones(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]))
    assert message in str(err.value)


def test_typo_in_a_key_is_rejected_by_hydra():
    with pytest.raises((HydraException, ConfigKeyError), match="lrr"):
        compose_config(["trainer.lrr=0.1"])


def test_weight_only_quantizer_is_not_offered_for_activations():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["act_quantizer=statsq"])
    assert "act_quantizer/statsq" in str(err.value)


def test_a_quantizer_driven_by_a_policy_is_refused_without_it(monkeypatch):
    """`Quantizer.driven_by`: a weight quantizer whose forward leaves the weights where a
    policy puts them (PARQ's) would train in full precision without that policy."""
    from oscbench.quant.lsq import LSQQuantizer

    monkeypatch.setattr(LSQQuantizer, "driven_by", "dampen", raising=False)
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["method=lsq"]))
    assert "add policy=dampen or use method=lsq_dampen" in str(err.value)
    validate(compose_config(["method=lsq_dampen"]))  # with it: accepted


@pytest.mark.parametrize("name", ["ltq", "lsq_plus"])
def test_activation_only_quantizers_are_not_offered_for_weights(name):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"quantizer={name}"])
    assert f"quantizer/{name}" in str(err.value)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["method=nosuch"])
    assert "nosuch" in str(err.value) and "fp" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bits=9"], "oscbench: bits=9 is invalid; allowed: an integer 2..8"),
        (["trainer.lr=-1"], "trainer.lr=-1.0 is invalid"),
        (["method=nosuch"], "Could not find 'method/nosuch'"),
        (["dataset=cifar10", "data_dir=/nonexistent"], "dataset cifar10: nothing at /nonexistent"),
        (["model=deit_tiny"], "model.img_size=32, but the dataset's images are 8x8"),
    ],
)
def test_command_line_exits_non_zero_before_training_and_leaves_nothing(args, needle, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oscbench.run", *args, f"hydra.run.dir={tmp_path / 'a' / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory left behind


def test_an_unwritable_run_directory_is_named_without_a_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "oscbench.run", f"hydra.run.dir={tmp_path / 'file' / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot write the run directory {tmp_path / 'file' / 'run'}" in proc.stderr
    assert "hydra.run.dir=PATH" in proc.stderr


def test_a_completed_run_in_a_read_only_directory_is_skipped_and_another_refused(tmp_path):
    """A read-only copy of a study: rerunning a run it holds shows the run and writes
    nothing; a run it does not hold cannot be written there and is refused with the fix."""
    run_dir = tmp_path / "run"
    args = ["trainer.epochs=1", "logger=none", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "oscbench.run", *args]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    run_dir.chmod(0o555)
    try:
        again = subprocess.run(unprivileged(cmd), capture_output=True, text=True, timeout=300)
        other = subprocess.run(
            unprivileged([*cmd, "trainer.lr=0.1"]), capture_output=True, text=True, timeout=300
        )
    finally:
        run_dir.chmod(0o755)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{run_dir} already holds this completed run" in again.stdout
    assert "test accuracy" in again.stdout
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert f"cannot write the run directory {run_dir}" in other.stderr


def test_small_input_slips_are_caught_or_understood():
    assert validate(compose_config(["cross_bits=3"])).cross_bits == [3]
    with pytest.raises(ConfigError, match="policy.dampen.lambda_end=-1.0 is invalid"):
        validate(compose_config(["method=lsq_dampen", "policy.dampen.lambda_end=-1"]))


def test_method_presets_set_the_quantizer_and_can_be_overridden():
    assert compose_config(["method=fp"]).quantizer.name == "none"
    assert compose_config(["method=lsq"]).quantizer.name == "lsq"
    cfg = compose_config(["method=lsq", "quantizer.per_channel=true", "bits=3"])
    spec = validate(cfg)
    assert spec.quantizer.options.per_channel and spec.bits == 3 and spec.act_bits == 3
    assert validate(compose_config(["bits=3", "act_bits=8"])).act_bits == 8


def test_processes_probing_one_run_directory_at_once_do_not_trip_over_each_other(tmp_path):
    """The ranks of a DDP run check the same run directory at the same moment: each probes
    with a file of its own (a shared probe name was removed under another rank's feet)."""
    failures: list[OSError] = []

    def probe() -> None:
        for _ in range(200):
            problem = unwritable(tmp_path / "run")
            if problem is not None:
                failures.append(problem)

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and list((tmp_path / "run").iterdir()) == []
