"""Every method preset runs end to end and records its own metrics; bad combinations fail."""

import math

import pytest

from oscbench.launch.compose import presets
from oscbench.launch.config import validate
from oscbench.records.record import load_results
from oscbench.registry import ConfigError
from tests.conftest import compose_config, run_config
from tests.learned import above


@pytest.mark.learned
@pytest.mark.parametrize("method", [p.name for p in presets()])
def test_every_preset_learns_and_records_its_own_metrics(method, tmp_path):
    """Every preset in conf/method/ (none listed here): 10 epochs of digits, every metric its
    policies report in every epoch's record and in the final one, finite, and the test
    accuracy far from chance: 97.5-99.7 % on every CPU path (bench/margins.md). AOQ's staged
    schedule needs the 10: after 5 it had 81.9, 43.9 and 33.6 % (native, avx2, default)."""
    final = run_config(
        [f"method={method}", "bits=3", "trainer.epochs=10", "logger=none", "device=cpu"],
        tmp_path,
    )
    res = load_results(tmp_path)
    assert res["status"] == "completed" and res["method"] == method
    spec = validate(compose_config([f"method={method}", "bits=3"]))
    policy_keys = {k for k in res["history"][-1] if "/" in k}
    assert len(policy_keys) >= len(spec.policies)  # each policy reports something
    for key in policy_keys:
        assert math.isfinite(final[key]), key
        for record in res["history"]:  # schedule values and loss terms in every epoch
            assert math.isfinite(record[key]), key
    for key in ("acc", "acc_bn", "loss", "val_acc", "val_acc_bn", "val_loss"):
        assert math.isfinite(final[key])
    if spec.quantized:
        assert final["osc_share"] >= 0 and final["crossings_total"] > 0
    for b in spec.cross_bits + ([spec.bits] if spec.ptq else []):
        assert math.isfinite(final[f"acc@{b}bit"])
    hist = final["threshold_distance"]
    assert sum(hist["counts"]) > 0 and math.isfinite(hist["mean_to_level"])
    above("test accuracy after BN re-estimation (%)", final["acc_bn"], 50)  # chance: 10 %


@pytest.mark.slow
@pytest.mark.oldest
@pytest.mark.parametrize("method", [p.name for p in presets()])
def test_every_preset_trains_two_epochs(method, tmp_path):
    """On the oldest supported torch (.ci/oldest; the 10-epoch test above covers the newest):
    every preset completes two epochs of digits with finite losses, metrics and policy
    values, and a quantized one moves its codes."""
    final = run_config(
        [f"method={method}", "bits=3", "trainer.epochs=2", "logger=none", "device=cpu"],
        tmp_path,
    )
    res = load_results(tmp_path)
    assert res["status"] == "completed" and res["method"] == method
    for record in res["history"]:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
    for key in ("acc", "acc_bn", "loss", "val_acc", "val_loss"):
        assert math.isfinite(final[key]), key
    if validate(compose_config([f"method={method}", "bits=3"])).quantized:
        assert final["crossings_total"] > 0


def test_preset_values_are_overridable():
    cfg = compose_config(["method=lsq_dampen", "policy.dampen.lambda_end=0.05"])
    assert validate(cfg).policies[0].options.lambda_end == 0.05
    spec = validate(compose_config(["method=lsq", "policy=[dampen,freeze]"]))
    assert [p.name for p in spec.policies] == ["dampen", "freeze"]
    spec = validate(compose_config(["method=ofq", "quantizer=lsq"]))
    assert spec.quantizer.name == "lsq" and spec.policies[0].name == "cga"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=aoq", "bits=8"], "quantizer=aoq with bits=8"),
        (
            ["method=fp", "policy=[freeze]"],
            "policy=freeze acts on quantized weights, but quantizer=none",
        ),
        (["quantizer=none", "policy=[cga]"], "policy=cga acts on quantized weights"),
        (
            ["method=lsq", "policy=[aoq_schedule]"],
            "policy=aoq_schedule schedules the thresholds' and the levels' steps apart, but "
            "quantizer=lsq has one step for thresholds and levels; use quantizer=aoq",
        ),
        (["method=ofq", "policy=[freeze]"], "quantizer=statsq recomputes its grid"),
        (
            ["method=lsq", "policy=[osc_reg]"],
            "use quantizer=none, or a preset such as method=osc_reg",
        ),
        (["cross_bits=[2,16]"], "cross_bits=16 is invalid"),
        (
            ["method=lsq_freeze", "policy.freeze.threshold_start=-1"],
            "policy.freeze.threshold_start",
        ),
    ],
)
def test_invalid_combinations_name_the_problem_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)
