"""Q-Ramping (oscbench/oscillation/ramping.py): periods from a calibration, and the update,
against TetraJet's `BSRamping_calib_update_period` and `_single_tensor_adamwNew` written
out plainly."""

import math

import pytest
import torch
from torch import nn

from oscbench.launch.config import Component
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.oscillation.ramping import Ramping, RampingConfig
from oscbench.quant.lsq import LSQConfig
from oscbench.quant.modules import QuantPlan, quantize_model, quantizer_factory
from tests.bounds import assert_within, gamma

pytestmark = pytest.mark.numeric

TRAJECTORY = [  # one column per weight, the weights after each calibration step
    [0.49, 0.1, 0.3, 1.46, 2.48],
    [0.51, 0.4, 0.3, 1.54, 2.52],
    [0.49, 0.7, 0.3, 1.46, 2.48],
    [0.51, 1.0, 0.3, 1.46, 2.52],
]
# d_w, d_Q (levels 1 apart) and floor(d_Q / 16 / d_w) * 5 + 1, at most 10:
# w0: 0.06, 3 -> floor(3.125) = 3 -> 16 -> 10; w1: 0.9, 1 -> 0 -> 1; w2: 0, 0 -> 1;
# w3: 0.16, 2 -> floor(0.78) = 0 -> 1; w4: 0.12, 3 -> floor(1.56) = 1 -> 6
PERIODS = [10, 1, 1, 1, 6]


def _setup(optimizer="sgd", steps=4):
    model = nn.Sequential(nn.Linear(5, 1, bias=False))
    lsq = LSQConfig(
        per_channel=False, init="lsq", grad_scale=True, signed="auto", keep_positive=False
    )
    quantize_model(
        model, quantizer_factory(Component("lsq", lsq)), lambda *a: None, QuantPlan(3, 3, None)
    )
    layer = model[0]
    layer.weight_quantizer.s.data.fill_(1.0)
    layer.weight.data.copy_(torch.tensor([TRAJECTORY[0]]))
    cfg = RampingConfig(alpha=16, beta=5, calibration_steps=steps - 1, max_period=10, eps=1e-8)
    run = RunContext(model, None, 3, Schedule(total=100, main=100, per_epoch=20), optimizer)
    return model, layer, Ramping(cfg, run)


def _probe(layer):
    """A stand-in for the loop's probe: the calibration's steps move the weights along
    TRAJECTORY; afterwards the weights are put back."""

    def probe(n, policy):
        before = layer.weight.detach().clone()
        for i in range(n):
            layer.weight.data.copy_(torch.tensor([TRAJECTORY[i]]))
            yield i
        layer.weight.data.copy_(before)

    return probe


def test_periods_follow_the_formula_on_a_hand_made_trajectory():
    model, layer, policy = _setup()
    policy.on_epoch_start(0, _probe(layer))
    assert policy.states[0].period[0].tolist() == PERIODS
    assert torch.equal(layer.weight[0], torch.tensor(TRAJECTORY[0]))  # put back
    assert policy.metrics()["ramping/ramped_share"] == torch.tensor(2 / 5).item()  # float32


def test_weights_with_a_high_ratio_are_updated_less_often():
    model, layer, policy = _setup()
    policy.on_epoch_start(0, _probe(layer))
    opt = torch.optim.SGD(
        [{"name": "latent", "params": [layer.weight], "weight_decay": 0.0}],
        lr=0.01,
        momentum=0.0,
        nesterov=False,
    )
    updates = torch.zeros(5)
    for _ in range(30):
        before = layer.weight.detach().clone()
        layer.weight.grad = torch.ones_like(layer.weight)
        policy.optimizer_step(opt, opt.step)
        updates += (layer.weight.detach() != before)[0]
    assert updates.tolist() == [3, 30, 30, 30, 5]  # every 10th, every step, every 6th
    # an update applies the mean of the accumulated gradients at lr x the steps: each
    # weight moved by 30 x lr x 1 over the 30 steps, whatever its period
    moved = torch.tensor(TRAJECTORY[0]) - layer.weight.detach()[0]
    assert_within(moved, torch.full((5,), 0.3, dtype=torch.float64), gamma(60) * 3.5)


def _adamw_bs_ramping(p, grads, period, lr, betas, eps, wd):
    """TetraJet's `_single_tensor_adamwNew`, transcribed in float64 (boolean indexing and
    all)."""
    p = p.double().clone()
    exp_avg, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
    step_acc, grad_acc = torch.zeros_like(p), torch.zeros_like(p)
    beta1, beta2 = betas
    for step, grad in enumerate(grads, start=1):
        step_acc += 1
        grad_acc += grad.double()
        mask = step_acc % period == 0
        p.mul_(1 - lr * wd)
        t_grad = grad_acc[mask] / step_acc[mask]
        exp_avg[mask] = exp_avg[mask] * beta1 + t_grad * (1 - beta1)
        exp_avg_sq[mask] = exp_avg_sq[mask] * beta2 + (t_grad * t_grad) * (1 - beta2)
        step_size = lr * step_acc / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)) + eps
        p[mask] -= (exp_avg / denom * step_size)[mask]
        step_acc[mask] = 0
        grad_acc[mask] = 0
    return p


def test_adamw_update_equals_tetrajets_optimizer():
    model, layer, policy = _setup("adamw")
    policy.on_epoch_start(0, _probe(layer))
    w0 = layer.weight.detach().clone()
    opt = torch.optim.AdamW(
        [{"name": "latent", "params": [layer.weight]}], lr=0.01, weight_decay=0.05
    )
    torch.manual_seed(0)
    grads = [torch.randn(1, 5) for _ in range(25)]
    for g in grads:
        layer.weight.grad = g.clone()
        policy.optimizer_step(opt, opt.step)
    period = torch.tensor([PERIODS], dtype=torch.float64)
    expected = _adamw_bs_ramping(w0, grads, period, 0.01, (0.9, 0.999), 1e-8, 0.05)
    # 25 steps of a dozen roundings each, on values of the size of the weights plus their
    # updates (at most lr x period x ~1 per update)
    assert_within(layer.weight.detach(), expected, gamma(25 * 12) * (expected.abs() + 1.0))


def test_sgd_update_is_the_documented_transfer():
    """Where due: g = mean gradient + weight decay x w, buffer = momentum x buffer + g,
    w -= lr x steps x (g + momentum x buffer) (Nesterov)."""
    model, layer, policy = _setup("sgd")
    policy.on_epoch_start(0, _probe(layer))
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD(
        [{"name": "latent", "params": [layer.weight]}],
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
    )
    torch.manual_seed(0)
    grads = [torch.randn(1, 5) for _ in range(25)]
    for g in grads:
        layer.weight.grad = g.clone()
        policy.optimizer_step(opt, opt.step)
    p, buf = w0.double().clone(), torch.zeros(1, 5, dtype=torch.float64)
    step_acc, grad_acc = torch.zeros_like(p), torch.zeros_like(p)
    period = torch.tensor([PERIODS], dtype=torch.float64)
    for g in grads:
        step_acc += 1
        grad_acc += g.double()
        due = step_acc % period == 0
        mean = grad_acc / step_acc + 5e-4 * p
        buf = torch.where(due, 0.9 * buf + mean, buf)
        p = torch.where(due, p - 0.05 * step_acc * (mean + 0.9 * buf), p)
        step_acc[due], grad_acc[due] = 0, 0
    assert_within(layer.weight.detach(), p, gamma(25 * 12) * (p.abs() + 1.0))
