"""LOTION (oscbench/oscillation/lotion.py): its noise, unbiased stochastic rounding with
variance s^2 d (1 - d), and its expected-loss term, exact to second order."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from oscbench.oscillation.lotion import Lotion, LotionConfig, rounding_variance, stochastic_round
from oscbench.oscillation.policy import RunContext, Schedule
from tests.bounds import assert_within, gamma

pytestmark = pytest.mark.numeric


def test_stochastic_rounding_is_unbiased_with_the_variance_the_term_uses():
    """200,000 draws for each of six weights (step 0.25): the sample mean within 5 standard
    errors of w, the sample variance within 2 % of s^2 d (1 - d) (its relative standard
    error is sqrt(2 / n) = 0.3 %, more for d near 0 or 1: kurtosis 1/(d(1-d)) - 3 <= 4.6
    here, so sqrt((kurt + 2) / n) <= 0.6 %)."""
    s = torch.tensor(0.25, dtype=torch.float64)
    w = torch.tensor([0.03, 0.1, 0.125, 0.2, -0.33, 0.49], dtype=torch.float64)
    draws = stochastic_round(w.expand(200_000, -1), s, torch.Generator().manual_seed(0))
    var = rounding_variance(w, s)
    assert torch.all(draws.sub(w).mean(0).abs() <= 5 * var.sqrt() / 200_000**0.5)
    assert torch.allclose(draws.var(0), var, rtol=0.02, atol=0)
    on_grid = draws / s
    assert torch.equal(on_grid, on_grid.round())  # every draw is a level


def test_the_term_is_the_expected_loss_of_a_quadratic_exactly():
    """For L(w) = 1/2 sum h_i (w_i - c_i)^2 the expectation over every stochastic rounding of
    three weights (eight outcomes, enumerated) is L(w) + 1/2 sum h_i sigma_i^2: the second-
    order form is exact. Float64, each side a sum of at most 8 x 3 products: gamma(32)."""
    s = torch.tensor(0.5, dtype=torch.float64)
    w = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    h = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    c = torch.tensor([0.1, -0.2, 0.4], dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (h * (v - c) ** 2).sum()

    low = torch.floor(w / s) * s
    d = w / s - torch.floor(w / s)
    expected = torch.zeros((), dtype=torch.float64)
    for ups in itertools.product((0, 1), repeat=3):
        up = torch.tensor(ups, dtype=torch.float64)
        prob = torch.prod(torch.where(up == 1, d, 1 - d))
        expected += prob * loss(low + up * s)
    form = loss(w) + 0.5 * (h * rounding_variance(w, s)).sum()
    assert abs(expected - form) <= gamma(32, torch.float64) * (expected.abs() + form.abs())


def test_the_terms_gradient_pulls_each_weight_to_its_nearer_level():
    """d sigma^2 / dw = s (1 - 2 d): positive below a bin's middle (descent lowers w to the
    level below), negative above it, zero at the middle and on the levels' far side."""
    s = torch.tensor(1.0)
    w = torch.tensor([0.2, 0.8, 1.3, 1.5, -0.4], requires_grad=True)
    rounding_variance(w, s).sum().backward()
    assert torch.equal(w.grad.sign(), torch.tensor([1.0, -1.0, 1.0, 0.0, -1.0]))


def test_the_policy_weighs_the_variance_by_the_batch_times_its_squared_task_gradient_ema():
    """Two steps as the loop takes them: the term's gradient by autograd plus a task gradient
    in w.grad; g_ii is 16 x the bias-corrected EMA of the task gradients' squares, the term's
    own gradient taken out (else it feeds itself: the claims runs diverged). Each task
    gradient comes back as (task + a) - b with a, b the term's gradient by autograd and by
    formula, a few roundings apart: |error| <= 4u (|task| + |a|), and its square's error
    2 |task| that."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    cfg = LotionConfig(lam=2.0, bits=3, fisher_decay=0.9)
    run = RunContext(model, None, 3, Schedule(total=10, main=10, per_epoch=10), "sgd", 16)
    policy = Lotion(cfg, run)
    w = model[0].weight
    assert policy.extra_loss(model).item() == 0  # no gradient seen yet: g = 0
    tasks, bound = [torch.randn_like(w) for _ in range(2)], torch.zeros_like(w)
    u = gamma(1)
    for k, task in enumerate(tasks):
        w.grad = None
        term = policy.extra_loss(model)
        if term.requires_grad:
            term.backward()
        own = w.grad if w.grad is not None else torch.zeros_like(w)
        w.grad = own + task
        weight = 0.1 * 0.9 ** (1 - k)  # each square's weight in the EMA at the end
        bound += weight * 2 * task.abs() * 4 * u * (task.abs() + own.abs())
        policy.after_backward(model)
    ema = 0.1 * 0.9 * tasks[0] ** 2 + 0.1 * tasks[1] ** 2
    assert_within(policy.fisher_0, ema, bound + gamma(4) * ema)
    g_ii = 16 * ema / (1 - 0.9**2)
    s = w.detach().abs().max() / 3  # RTN at 3 bits: max|w| / (2^2 - 1)
    expected = 0.5 * 2.0 * (g_ii * rounding_variance(w.detach(), s)).sum()
    got = policy.extra_loss(model)
    slack = 16 / (1 - 0.9**2) * (bound * rounding_variance(w.detach(), s)).sum()
    assert abs(got - expected) <= slack + gamma(w.numel() + 8) * expected
    assert got.requires_grad  # it trains the weights
