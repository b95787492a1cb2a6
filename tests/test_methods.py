"""Every method preset runs end to end and records its own metrics; bad combinations fail."""

import math

import pytest

from oscbench.config import validate
from oscbench.record import load_results
from oscbench.registry import ConfigError
from tests.conftest import compose_config, run_config

OWN_METRICS = {
    "fp": [],
    "ptq": ["acc@2bit", "acc@3bit", "acc@4bit", "acc@8bit"],
    "lsq": ["osc_share", "crossings_total"],
    "lsq_dampen": ["osc_share", "dampen/lambda", "dampen/loss"],
    "lsq_freeze": ["osc_share", "freeze/threshold", "freeze/frozen_share"],
    "ofq": ["osc_share", "cga/frozen_share", "cga/active"],
    "aoq": ["osc_share", "aoq/alpha", "aoq/stage", "aoq/dampen_loss"],
    "osc_reg": ["osc_reg/loss", "acc@2bit", "acc@3bit", "acc@4bit", "acc@8bit"],
}


@pytest.mark.parametrize("method", sorted(OWN_METRICS))
def test_every_preset_records_its_own_metrics(method, tmp_path):
    extra = ["policy.cga.extra_epochs=1"] if method == "ofq" else []
    final = run_config(
        [f"method={method}", "bits=3", "trainer.epochs=3", "logger=none", "device=cpu", *extra],
        tmp_path,
    )
    res = load_results(tmp_path)
    assert res["status"] == "completed" and res["config"]["method"]["name"] == method
    for key in OWN_METRICS[method]:
        assert key in final and math.isfinite(final[key]), key
    for key in ("acc", "acc_bn", "val_loss"):
        assert math.isfinite(final[key])
    hist = final["threshold_distance"]
    assert sum(hist["counts"]) > 0 and math.isfinite(hist["mean_to_level"])
    policy_keys = [k for k in OWN_METRICS[method] if "/" in k]
    for record in res["history"]:
        for key in policy_keys:  # schedule values and loss terms in every epoch's record
            assert math.isfinite(record[key]), key
    assert final["acc_bn"] > 50  # every method learns digits in 3 epochs (chance: 10 %)


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
        (["method=lsq", "policy=[aoq_schedule]"], "policy=aoq_schedule needs quantizer=aoq"),
        (["method=ofq", "policy=[freeze]"], "quantizer=statsq recomputes its grid"),
        (["method=lsq", "policy=[osc_reg]"], "use quantizer=none (method=osc_reg)"),
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
