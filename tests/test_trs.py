"""Transition-rate scheduling (oscbench/oscillation/trs.py): the measured transition rate
follows the scheduled one, through a learning rate of its own."""

import math

import pytest
import torch

from oscbench.records.record import load_results
from tests.bounds import assert_within, gamma
from tests.conftest import build_config, run_config
from tests.learned import below


def _second_half_error(history):
    """Mean |measured - target| per epoch over the second half, over the mean target."""
    half = history[len(history) // 2 :]
    error = sum(abs(h["trs/rate"] - h["trs/target"]) for h in half) / len(half)
    return error / (sum(h["trs/target"] for h in half) / len(half))


@pytest.mark.learned
@pytest.mark.parametrize(
    ("bits", "steer"),
    [(2, "latent"), (4, "latent_and_steps")],
)
def test_the_measured_transition_rate_follows_the_schedule(bits, steer, tmp_path):
    """12 epochs of digits: the error is 0.085, 0.083, 0.086 of the target at 2 bits, and
    0.094, 0.095, 0.092 at 4 bits with the steps steered too (native, avx2, default paths:
    bench/margins.md)."""
    args = ["method=lsq_trs", f"bits={bits}", "trainer.epochs=12", "logger=none"]
    run_config([*args, f"policy.trs.steer={steer}", "device=cpu"], tmp_path)
    history = load_results(tmp_path)["history"]
    below("second half's error, a share of the target", _second_half_error(history), 0.2)
    lrs = [h["trs/lr"] for h in history]  # the learning-rate trace that achieves it
    assert all(math.isfinite(v) and v >= 0 for v in lrs) and len(set(lrs)) > 1
    targets = [h["trs/target"] for h in history]
    assert targets == sorted(targets, reverse=True) and targets[0] <= 0.004


@pytest.mark.numeric
def test_talr_follows_its_update_rule_and_scales_the_latent_step():
    _, built = build_config(["method=lsq_trs", "bits=2", "trainer.epochs=2"])
    (trs,) = built.policies
    cfg, tracker = trs.cfg, built.tracker
    layer, _ = tracker.tracked()[0]
    opt = torch.optim.SGD(
        [
            {"name": "latent", "params": [layer.weight], "initial_lr": 0.05},
        ],
        lr=0.05,
        momentum=0.0,
    )
    shares = [0.0, 0.01, 0.0, 0.002, 0.004]
    mu, rate = 0.05, cfg.rate_start
    for t, share in enumerate(shares):
        # as if the last update had changed this share of codes
        tracker.switches.zero_()[0] = round(share * tracker.total)
        exact = int(tracker.switches.sum()) / tracker.total
        trs.on_step_start(t, 100)
        if t > 0:
            rate = cfg.momentum * rate + (1 - cfg.momentum) * exact
            mu = max(0.0, mu + cfg.gamma * (trs.scheduled(t) - rate))
        w0 = layer.weight.detach().double().clone()
        layer.weight.grad = torch.ones_like(layer.weight)
        trs.optimizer_step(opt, opt.step)
        assert abs(trs.mu.item() - mu) <= gamma(4 * (t + 1)) * (mu + 1)
        assert opt.param_groups[0]["lr"] == 0.05  # the scheduled rate is put back
        moved = w0 - layer.weight.detach().double()
        # SGD at learning rate mu_t: w - mu_t x 1. Computed as a step at rate 1 (p1 = w0 - 1,
        # rounded relative to |w0| + 1), then lerp back to w0 with weight 1 - mu_t (rounded
        # relative to 1: an absolute error of u in mu_t), and the products and differences
        # of torch.lerp, each rounded once: four roundings relative to 1 + |w0| + 2 mu_t.
        expected = torch.full_like(moved, trs.mu.item())
        assert_within(moved, expected, gamma(4) * (1 + w0.abs() + 2 * trs.mu.item()))


@pytest.mark.numeric
def test_the_8_bit_ends_are_neither_steered_nor_counted_when_tracked():
    """With `oscillation.track_first_last=true` the tracker also follows the 8-bit first and
    last layers; TRS still measures the low-bit layers' rate and steers only their weights:
    the ends take the scheduled learning rate."""
    args = ["method=lsq_trs", "bits=2", "trainer.epochs=2", "oscillation.track_first_last=true"]
    _, built = build_config(args)
    (trs,) = built.policies
    tracker, m = built.tracker, trs.cfg.momentum
    layers = [layer for layer, _ in tracker.tracked()]
    ends = [i for i, layer in enumerate(layers) if layer.is_first_or_last]
    assert len(ends) == 2
    low = [i for i in range(len(layers)) if i not in ends]
    lr = 0.05
    opt = torch.optim.SGD(
        [{"name": "latent", "params": [x.weight for x in layers], "initial_lr": lr}], lr=lr
    )
    for t in range(3):
        tracker.switches.zero_()
        for i in ends:  # every weight of the ends changed level; 3 of the low-bit ones
            tracker.switches[i] = layers[i].weight.numel()
        tracker.switches[low[0]] = 3
        trs.on_step_start(t, 100)
        w0 = [x.weight.detach().clone() for x in layers]
        for x in layers:
            x.weight.grad = torch.ones_like(x.weight)
        rate = trs.rate.item()
        trs.optimizer_step(opt, opt.step)
        if t > 0:
            measured = 3 / sum(layers[i].weight.numel() for i in low)
            expected = m * rate + (1 - m) * measured
            assert abs(trs.rate.item() - expected) <= gamma(4) * (rate + measured)
        assert trs.mu.item() != lr or t == 0
        for i, (x, before) in enumerate(zip(layers, w0, strict=True)):
            moved = before.double() - x.weight.detach().double()
            step = trs.mu.item() if i in low else lr
            bound = gamma(4) * (1 + before.abs().double() + 2 * max(step, lr))
            assert_within(moved, torch.full_like(moved, step), bound)
