"""The plugin contract, over the registries: every registered quantizer at every bit-width
it supports, every policy with every quantizer it declares compatible, every preset in
conf/method/. A new plugin is covered here without an edit to this file."""

import pytest
import torch

from oscbench.launch.compose import compose, presets
from oscbench.launch.config import Component, check_combination, validate
from oscbench.oscillation.policy import POLICIES
from oscbench.quant.base import (
    ACTIVATIONS,
    FIXED_GRID,
    FULL_PRECISION,
    PROXIMAL,
    QUANTIZED,
    QUANTIZERS,
    capabilities,
)
from oscbench.quant.modules import quantizer_factory
from oscbench.registry import ConfigError
from tests.bounds import unit_roundoff
from tests.conftest import build_config, fit

QUANTIZER_NAMES = [n for n in QUANTIZERS.names() if n != "none"]
TINY = [  # a run of ten optimizer steps: every schedule reaches its later stages
    "dataset=synthetic",
    "dataset.image_size=8",
    "dataset.channels=1",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "trainer.batch_size=32",
    "trainer.epochs=5",
    "trainer.bn_reestimate_batches=1",
]


def _quantizer(group: str, name: str, bits: int, x: torch.Tensor):
    """Quantizer `name` as its conf/<group>/<name>.yaml configures it, for tensor x (a
    weight of x.shape[0] output channels, or an activation), set up from x."""
    node = compose([f"{group}={name}"])[group]
    build = quantizer_factory(Component(name, QUANTIZERS.parse(node, group)))
    weight = group == "quantizer"
    q = build(bits, x.shape[0] if weight else None, weight)
    q.init_from(x)
    return q


def _cases(group: str):
    need = ACTIVATIONS if group == "act_quantizer" else QUANTIZED
    for name in QUANTIZER_NAMES:
        if need not in capabilities(name):
            continue
        for bits in QUANTIZERS.get(name).declares("bit_range", range(2, 9)):
            yield name, bits


def _data(group: str) -> torch.Tensor:
    return torch.randn(16, 8, 3, 3) * 0.1 if group == "quantizer" else torch.rand(16, 8, 3, 3)


def _activation_grid(q, x, codes, levels, thresholds, name, bits):  # noqa: ANN001
    """An activation-only quantizer (LTQ's levels are not in its input's units): codes in
    range, ascending levels and thresholds, one more level than thresholds, the code steps
    up where its input passes a threshold, and the forward lands on the code's level."""
    u = unit_roundoff()
    assert levels.shape[-1] == thresholds.shape[-1] + 1, (name, bits)
    assert (levels[1:] > levels[:-1]).all() and (thresholds[1:] > thresholds[:-1]).all()
    assert codes.min() >= 0 and codes.max() <= len(levels) - 1
    steps = (x[..., None] > thresholds).sum(-1).float()
    far = (x[..., None] - thresholds).abs() > 4 * u * (x[..., None].abs() + thresholds.abs())
    far = far.all(-1)  # codes may differ only within a few roundings of a threshold
    assert far.float().mean() > 0.9 and torch.equal(codes[far], steps[far]), (name, bits)
    centre = q.code_centre(codes, x)
    assert torch.equal(centre, levels[codes.long()]), (name, bits)
    out = q(x).detach()
    assert ((out - centre).abs() <= 4 * u * centre.abs()).all(), (name, bits)


@pytest.mark.parametrize("group", ["quantizer", "act_quantizer"])
def test_every_quantizer_describes_its_grid_consistently(group):
    torch.manual_seed(0)
    u = unit_roundoff()
    for name, bits in _cases(group):
        x = _data(group)
        q = _quantizer(group, name, bits, x)
        codes = q.to_int(x)
        levels, thresholds = q.levels(x), q.thresholds(x)
        if QUANTIZED not in capabilities(name):  # activations only: levels, codes, forward
            _activation_grid(q, x, codes, levels, thresholds, name, bits)
            continue
        index = (codes - q.grid(x).n).long()  # a code's centre is its level
        rows = levels if levels.dim() == 1 else levels.gather(1, index.flatten(1))
        level = rows[index] if levels.dim() == 1 else rows.view_as(codes)
        assert torch.equal(q.code_centre(codes, x), level), (name, bits)
        if FIXED_GRID in capabilities(name):  # a grid of its own (not x's statistics):
            assert torch.equal(q.to_int(q.code_centre(codes, x)), codes)  # codes round-trip
        assert levels.shape[-1] == thresholds.shape[-1] + 1
        assert (levels[..., :-1] < thresholds).all() and (thresholds < levels[..., 1:]).all()
        lo, hi = q.bounds(x)
        inside = (x >= lo) & (x <= hi)
        step = q.step(x).expand_as(x)
        dist = q.threshold_distance(x)  # x / step - offset, less an integer, times step:
        bound = 0.5 * step + 4 * u * (x.abs() + step)  # a few roundings of x and of step
        assert (dist[inside] <= bound[inside]).all(), (name, bits)
        out = q(x).detach()  # the forward lands on the levels, inside the bounds
        if PROXIMAL in capabilities(name):  # no rounding: a policy maps the weights (PARQ)
            assert torch.equal(out, x), (name, bits)
            continue
        centre = q.code_centre(codes, x)
        assert ((out - centre).abs() <= 4 * u * centre.abs()).all(), (name, bits)
        assert (out >= lo - 4 * u * lo.abs()).all() and (out <= hi + 4 * u * hi.abs()).all()


@pytest.mark.parametrize("group", ["quantizer", "act_quantizer"])
def test_every_quantizer_restores_itself_from_its_state(group):
    torch.manual_seed(1)
    for name, bits in _cases(group):
        x = _data(group) * 30  # another scale than a fresh quantizer's
        q = _quantizer(group, name, bits, x)
        fresh = _quantizer(group, name, bits, _data(group))
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh(x), q(x)) and torch.equal(fresh.to_int(x), q.to_int(x))


def _compatible():
    """(policy, weight quantizer, whether they run together): the policy's requirements met
    by the quantizer's capabilities, and the quantizer not driven by another policy
    (`Quantizer.driven_by`, which refuses the run naming that policy)."""
    weights = [n for n in QUANTIZERS.names() if capabilities(n) & {QUANTIZED, FULL_PRECISION}]
    for policy in POLICIES.entries():
        needs = policy.declares("requires", frozenset())
        for quantizer in weights:
            driver = QUANTIZERS.get(quantizer).declares("driven_by", None)
            fits = needs <= capabilities(quantizer) and driver in (None, policy.name)
            yield policy.name, quantizer, fits


@pytest.mark.parametrize(("policy", "quantizer", "compatible"), list(_compatible()))
def test_every_policy_runs_with_each_quantizer_it_declares_compatible(
    policy, quantizer, compatible
):
    bits = QUANTIZERS.get(quantizer).declares("bit_range", range(2, 9))[0] + 1
    act = "lsq" if quantizer != "none" else "none"
    overrides = [
        f"quantizer={quantizer}",
        f"act_quantizer={act}",
        f"policy=[{policy}]",
        f"bits={bits}",
    ]
    if not compatible:  # refused before any training, naming the policy (or its driver's)
        needs = POLICIES.get(policy).declares("requires", frozenset())
        driver = QUANTIZERS.get(quantizer).declares("driven_by", None)
        named = policy if not needs <= capabilities(quantizer) else driver
        with pytest.raises(ConfigError, match=f"policy={named} "):
            validate(compose([*overrides, "logger=none"]))
        return
    spec, built = build_config([*overrides, *TINY])
    history = fit(spec, built)
    assert len(history) == 5 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    (p,) = built.policies
    metrics = history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "/" in k)
    fresh = build_config([*overrides, *TINY, "seed=1"])[1].policies[0]
    fresh.load_state_dict(p.state_dict())  # its state is its own, and restores
    for key, value in p.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.slow  # test_methods trains every preset 10 epochs in the fast suite
@pytest.mark.parametrize("preset", [p.name for p in presets()])
def test_every_preset_composes_validates_and_trains_one_step(preset):
    spec, built = build_config([f"method={preset}", *TINY[:-2], "trainer.epochs=1"])
    assert spec.method == preset
    check_combination(spec)
    history = fit(spec, built)
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))
