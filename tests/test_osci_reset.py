"""OsciReset (oscbench/oscillation/osci_reset.py) on hand-made trajectories."""

import copy

import pytest
import torch
from torch import nn

from oscbench.launch.config import Component
from oscbench.oscillation.osci_reset import OsciReset, OsciResetConfig
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.quant.lsq import LSQConfig
from oscbench.quant.modules import QuantPlan, quantize_model, quantizer_factory
from tests.bounds import assert_within, gamma
from tests.learned import above

pytestmark = pytest.mark.numeric


def _layer(values):
    """A 1 x n linear layer quantized by LSQ at 3 bits (codes -4..3) with its step at 1,
    as the only (low-bit) layer of a model."""
    model = nn.Sequential(nn.Linear(len(values), 1, bias=False))
    lsq = LSQConfig(
        per_channel=False, init="lsq", grad_scale=True, signed="auto", keep_positive=False
    )
    factory = quantizer_factory(Component("lsq", lsq))
    quantize_model(model, factory, lambda *a: None, QuantPlan(3, 3, None))
    layer = model[0]
    layer.weight_quantizer.s.data.fill_(1.0)
    layer.weight.data.copy_(torch.tensor([values]))
    return model, layer


def _policy(model, detect, period=4, track=2, start=0.0, strength=1.0, noise=0.0):
    cfg = OsciResetConfig(
        detect=detect,
        start=start,
        period=period,
        track_steps=track,
        ratio_threshold=16.0,
        edge_threshold=0.495,
        strength=strength,
        noise=noise,
    )
    run = RunContext(model, None, 3, Schedule(total=100, main=100, per_epoch=10), "sgd")
    return OsciReset(cfg, run)


def _after_step(policy, model, i, values=None):
    """As the loop does: on_step_start(i), the optimizer step (here: set by hand),
    on_step_end."""
    policy.on_step_start(i, 100)
    if values is not None:
        model[0].weight.data.copy_(torch.tensor([values]))
    policy.on_step_end(model)


def test_ratio_rule_resets_exactly_the_weights_with_a_high_d_q_over_d_w():
    # per weight over the window (steps 1 and 2): d_w, d_Q (levels 1 apart), ratio
    trajectory = [
        [0.49, 0.10, 0.70, 1.48, -2.2],  # step 0: snapshot
        [0.51, 0.30, 0.70, 1.52, -2.6],  # step 1
        [0.49, 0.60, 0.70, 1.53, -2.4],  # step 2
    ]
    # w0: 0.04, 2 -> 50 (reset); w1: 0.5, 1 -> 2; w2: 0, 0 -> 0 (did not move);
    # w3: 0.05, 1 -> 20 (reset); w4: 0.6, 2 -> 3.3
    model, layer = _layer(trajectory[0])
    policy = _policy(model, "ratio")
    for i, values in enumerate(trajectory):
        _after_step(policy, model, i, values)
    assert policy.window is not None
    ratio = policy.ratio(policy.window[0])[0]
    w32 = torch.tensor(trajectory, dtype=torch.float32).double()  # the values as stored
    dw = (w32[1] - w32[0]).abs() + (w32[2] - w32[1]).abs()
    expected = torch.where(dw > 0, torch.tensor([2.0, 1, 0, 1, 2], dtype=torch.float64) / dw, 0)
    # two rounded differences, their sum, the quotient: at most 4 roundings each
    assert_within(ratio, expected, gamma(4) * expected)
    step3 = [0.485, 0.62, 0.70, 1.531, -2.41]  # the step of the reset
    _after_step(policy, model, 3, step3)
    w = layer.weight.detach()[0]
    assert w[0].item() == 0.0 and w[3].item() == 2.0  # their bins' centres, exactly
    for k in (1, 2, 4):
        assert w[k].item() == torch.tensor(step3[k]).item()  # untouched
    assert policy.window is None
    metrics = policy.metrics()
    assert metrics["osci_reset/resets"] == 1 and metrics["osci_reset/reset_share"] == 2 / 5


def test_ratio_rule_waits_for_start_and_repeats_every_period():
    model, layer = _layer([0.49, 0.1])
    policy = _policy(model, "ratio", period=4, track=1, start=0.05)  # first step 5
    for i in range(5):
        _after_step(policy, model, i, [0.49 if i % 2 else 0.51, 0.1])
        assert policy.window is None  # nothing before step 5
    for i in range(5, 11):  # 5-7: a window opens only at a multiple of the period
        _after_step(policy, model, i, [0.49 if i % 2 else 0.51, 0.1])
        assert (policy.window is not None) == (i in (8, 9)), i
    # snapshot at 8 (0.51), tracked at 9 (0.49): ratio 1 / 0.02; reset at 10, where the
    # step left it at 0.51: the centre of code 1
    assert layer.weight[0, 0].item() == 1.0
    assert layer.weight[0, 1].item() == torch.tensor(0.1).item()


def test_bin_edge_resets_weights_within_half_a_percent_of_a_threshold():
    values = [0.4951, 0.49, -0.7, 3.9, 1.504, -0.5049]
    model, layer = _layer(values)
    policy = _policy(model, "bin_edge", period=4)
    _after_step(policy, model, 1)  # not a multiple of the period: nothing
    assert torch.equal(layer.weight[0], torch.tensor(values))
    _after_step(policy, model, 4)
    # 0.4951: 0.4951 from code 0's centre, more than 0.495 -> 0; 0.49: stays; -0.7: 0.3
    # from -1 -> stays; 3.9: beyond the grid, 0.9 from its last level 3 -> 3; 1.504: 0.496
    # from 2 -> 2; -0.5049: 0.4951 from -1 -> -1
    expected = torch.tensor([0.0, 0.49, -0.7, 3.0, 2.0, -1.0])
    assert torch.equal(layer.weight.detach()[0], expected)


def test_an_open_window_is_saved_with_the_policy_and_resumes_exactly():
    trajectory = [[0.49, 0.1], [0.51, 0.3], [0.49, 0.6], [0.485, 0.62]]
    model, _ = _layer(trajectory[0])
    policy = _policy(model, "ratio")
    for i in range(2):
        _after_step(policy, model, i, trajectory[i])
    state = copy.deepcopy(policy.state_dict())
    model2, layer2 = _layer(trajectory[1])
    fresh = _policy(model2, "ratio")
    fresh.load_state_dict(state)
    for i in range(2, 4):
        _after_step(policy, model, i, trajectory[i])
        _after_step(fresh, model2, i, trajectory[i])
    assert torch.equal(model[0].weight, layer2.weight) and layer2.weight[0, 0].item() == 0.0


@pytest.mark.learned
def test_the_preset_resets_weights_in_a_digits_run(tmp_path):
    """One reset event (the schedule's); it moves 1.26, 1.17, 1.18 % of the weights on the
    native, avx2 and default paths (bench/margins.md)."""
    from oscbench.records.record import load_results
    from tests.conftest import run_config

    args = ["method=lsq_oscireset", "bits=2", "logger=none", "device=cpu"]
    args += ["trainer.epochs=6", "policy.osci_reset.period=40", "policy.osci_reset.track_steps=10"]
    run_config(args, tmp_path)
    history = load_results(tmp_path)["history"]
    assert sum(h["osci_reset/resets"] for h in history) >= 1  # the schedule's
    above("share of weights reset", sum(h["osci_reset/reset_share"] for h in history), 0)


@pytest.mark.parametrize(
    ("detect", "period", "first"),
    [("ratio", 40, 89), ("ratio", 50, 109), ("bin_edge", 40, 80), ("bin_edge", 50, 100)],
)
def test_a_run_too_short_for_any_reset_is_warned_about(detect, period, first, capsys):
    """100 steps from 60 %, windows of 8 steps: the first window opens at the first
    multiple of the period from step 60; bin_edge resets there, the ratio rule 9 steps on."""
    model, _ = _layer([0.1])
    policy = _policy(model, detect, period=period, track=8, start=0.6)
    assert policy.first_reset() == first
    assert ("no reset happens" in capsys.readouterr().err) == (first >= 100)


def test_winq_moves_every_weight_part_of_the_way_to_its_level_each_period():
    """detect=all with strength 0.25: w + 0.25 (centre - w) at steps 0, 4, 8 (period 4);
    the values are dyadic, so the interpolation is exact."""
    values = [0.5, 0.125, -1.75, 2.25, -3.5]
    model, layer = _layer(values)
    policy = _policy(model, "all", strength=0.25)
    w = torch.tensor([values])
    centre = torch.tensor([[1.0, 0.0, -2.0, 2.0, -4.0]])  # round half to even: 0.5 -> 0
    centre[0, 0] = 0.0
    for i in range(9):
        _after_step(policy, model, i)
        if i % 4 == 0:
            w = w + 0.25 * (centre - w)
            centre = torch.round(w).clamp(-4, 3)
        assert torch.equal(layer.weight.data, w), i
    assert policy.metrics()["osci_reset/resets"] == 3


def test_winq_noise_moves_the_forward_and_leaves_the_weights_to_the_optimizer():
    """noise 0.5: each step's forward runs at w + N(0, (0.5 s)^2) (s = 1 here): the
    gradient is the noisy weights' (LSQ's clipping mask: some weights near the range's ends
    cross it) and after backward the weights are the clean ones again.
    The noise's spread over 20,000 weights lies within 4 % of 0.5 (the sample standard
    deviation's relative error is about 1 / sqrt(2 n) = 0.5 %: eight of those)."""
    torch.manual_seed(0)
    values = (torch.rand(20_000) * 6 - 3).tolist()
    model, layer = _layer(values)
    policy = _policy(model, "all", period=1000, start=0.0, noise=0.5)
    clean = layer.weight.detach().clone()
    policy.on_step_start(1, 100)
    noisy = layer.weight.detach().clone()
    spread = (noisy - clean).std().item()
    assert abs(spread - 0.5) < 0.04 * 0.5
    x = torch.randn(3, 20_000)
    model(x).sum().backward()
    grad = layer.weight.grad.clone()
    policy.after_backward(model)
    assert torch.equal(layer.weight.data, clean)
    # the gradient is the one a forward at the noisy weights takes, not the clean weights'
    for weights, same in ((noisy, True), (clean, False)):
        twin = copy.deepcopy(model)
        twin[0].weight.data.copy_(weights)
        twin[0].weight.grad = None
        twin(x).sum().backward()
        assert torch.equal(grad, twin[0].weight.grad) == same


def test_runs_from_before_winqs_options_are_found_again():
    """A record of an OsciReset run made before `strength` and `noise` existed has the key
    a run now has at their neutral values (1, 0), so its sweep skips it; WinQ's do not."""
    from oscbench.launch.config import resolved
    from oscbench.records.runs import run_key
    from tests.conftest import compose_config

    now = resolved(compose_config(["method=lsq_oscireset"]))
    before = copy.deepcopy(now)
    for key in ("strength", "noise"):
        del before["policy"]["osci_reset"][key]
    assert run_key(before) == run_key(now)
    assert run_key(resolved(compose_config(["method=lsq_winq"]))) != run_key(now)
