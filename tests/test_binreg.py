"""The bin regulariser of VVTQ (oscbench/oscillation/binreg.py) against its formula, written
out as in HuangOwen/Quantization-Variation `util_loss.py: BinReg`."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from oscbench.launch.config import Component
from oscbench.oscillation.binreg import BinReg, BinRegConfig
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.quant.lsq import LSQConfig
from oscbench.quant.modules import QuantPlan, quantize_model, quantizer_factory
from tests.bounds import assert_within, gamma

pytestmark = pytest.mark.numeric


def _config(**kw):
    base = dict(
        lambda_start=0.0,
        lambda_end=0.01,
        start=0.25,
        per="epoch",
        aggregation="mean",
        detach_scale=False,
    )
    return BinRegConfig(**(base | kw))


def _model(bits=3, shape=(24, 40), seed=0, per_channel=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    model[0].weight.data.normal_(0, 0.1)
    lsq = LSQConfig(
        per_channel=per_channel, init="lsq", grad_scale=True, signed="auto", keep_positive=False
    )
    quantize_model(
        model,
        quantizer_factory(Component("lsq", lsq)),
        lambda *a: None,
        QuantPlan(bits, bits, None),
    )
    layer = model[0]
    layer.weight_quantizer.s.data.mul_(0.6)  # some weights beyond the grid: the end bins clip
    return model, layer


def _policy(model, epochs=8, per_epoch=10, **kw):
    steps = Schedule(total=epochs * per_epoch, main=epochs * per_epoch, per_epoch=per_epoch)
    return BinReg(_config(**kw), RunContext(model, None, 3, steps, "sgd"))


def _vvtq(w, s, g, n, p):
    """VVTQ's BinReg.forward for one layer: w_q = round(clamp(w/a, n, p)) a and
    c = clamp(w/a, n, p) a with a = grad_scale(s, g); mean((w_q.detach() - c)^2) plus, for
    each integer bin k with more than one weight, torch.var (unbiased) of c there."""
    a = (s - s * g).detach() + s * g
    wq = torch.round(torch.clamp(w / a, n, p)) * a
    c = torch.clamp(w / a, n, p) * a
    loss = ((wq.detach() - c) ** 2).mean()
    codes = torch.round(torch.clamp(w / a, n, p)).detach()  # VVTQ: (w_q / a).eq(k)
    for k in range(n, p + 1):
        inside = c[codes == k]
        if inside.numel() > 1:
            loss = loss + torch.var(inside)
    return loss


def _bounds(layer, w64, s64):
    """Error bounds of the float32 loss and gradient against the float64 formula, for the
    way binreg.py evaluates them (first order in u, every rounding counted). Per weight:
    v = c - r with r = code x mean step rounded once (w_q with one step per tensor: the same
    product); a_k = 1/(n_k - 1) rounded once.
    The variance part: dot(a v, v) over the N weights (gamma_(N+5) sum a v^2) minus
    sum_k a_k n_k mu_k^2, where mu_k is a sum of n_k float32 terms (off by
    delta_k = gamma_(n_k+2) sum_k |v|) over n_k; the dampening part: dot(d, d) / divisor."""
    q = layer.weight_quantizer
    c = w64.detach().clamp(q.n * s64.detach(), q.p * s64.detach()).flatten()
    wq = layer.last_quantized_weight.double().flatten()
    code = q.to_int(layer.weight).double().flatten()
    idx = (code - q.n).long()
    r = code * q.step(layer.weight).mean().double()  # the centre (its float32 rounding: u|r|)
    v_abs = (c - r).abs() + gamma(1) * r.abs()
    bins, n_w = q.p - q.n + 1, c.numel()
    count = torch.bincount(idx, minlength=bins).double()
    a = torch.where(count > 1, 1 / (count - 1).clamp(min=1), 0.0)
    mu_abs = torch.bincount(idx, weights=c - r, minlength=bins).abs() / count.clamp(min=1)
    mu_abs = mu_abs + gamma(1) * torch.bincount(idx, weights=r.abs(), minlength=bins) / count.clamp(
        min=1
    )
    delta = torch.tensor([gamma(int(k) + 2) for k in count.tolist()], dtype=torch.float64)
    delta = delta * torch.bincount(idx, weights=v_abs, minlength=bins)
    d_mu = (delta + gamma(1) * (mu_abs * count + delta)) / count.clamp(min=1)
    t1 = (a[idx] * v_abs**2).sum()
    t2 = (a * count * (mu_abs + d_mu) ** 2).sum()
    t0 = ((wq - c) ** 2).sum() / n_w
    loss = (
        gamma(n_w + 5) * t1
        + (a * count * (2 * mu_abs * d_mu + d_mu**2)).sum()
        + gamma(bins + 4) * t2
        + gamma(n_w + 4) * t0
        + gamma(2) * (t0 + t1 + t2)
    )
    per_weight = (
        2 * a[idx] * (gamma(5) * (v_abs + mu_abs[idx]) + (1 + gamma(3)) * d_mu[idx])
        + 2 * gamma(5) * (wq - c).abs() / n_w
    )
    return loss, per_weight.view_as(w64), c.view_as(w64), wq.view_as(w64), idx


@pytest.mark.parametrize("per_channel", [False, True])
def test_loss_and_gradients_equal_vvtqs_formula_with_the_within_bin_variance(per_channel):
    """Per channel, VVTQ's bins (one per integer code) gather the weights of every channel."""
    model, layer = _model(per_channel=per_channel)
    policy = _policy(model)
    q = layer.weight_quantizer
    layer(torch.randn(2, 40))  # the forward leaves this step's w_q
    term = policy.term(layer)
    term.backward()
    w64 = layer.weight.detach().double().requires_grad_()
    s64 = q.s.detach().double().requires_grad_()
    s_b = s64.view(-1, 1) if per_channel else s64  # broadcast against w (24 x 40)
    ref = _vvtq(w64, s_b, q.g, q.n, q.p)
    ref.backward()
    loss_bound, grad_bound, c, wq, _ = _bounds(layer, w64, s_b)
    assert_within(term.detach(), ref.detach(), loss_bound)
    assert ref.detach() - ((wq - c) ** 2).mean() > 0.5 * ref.detach()  # mostly the variance
    grad_bound = grad_bound + gamma(2) * w64.grad.abs()
    assert_within(layer.weight.grad, w64.grad, grad_bound)
    # the step's gradient: through the clipped weights only (n or p times LSQ's g each)
    clipped = (w64.detach() < q.n * s_b.detach()) | (w64.detach() > q.p * s_b.detach())
    assert clipped.any() and s64.grad.abs().sum() > 0
    terms = (w64.grad.abs() + grad_bound) * max(-q.n, q.p) * q.g * clipped
    extra = grad_bound * max(-q.n, q.p) * q.g * clipped
    dims = 1 if per_channel else None  # a step per row, or one for the tensor
    bound = gamma(clipped.sum().item() + 4) * terms.sum(dims) + extra.sum(dims)
    # the float64 formula's own rounding: c = (w / a) a gives each unclipped weight a step
    # gradient g_c w/a - g_c w/a, zero only in exact arithmetic (a few roundings each)
    ratio = (w64.grad.abs() * (w64.detach() / s_b.detach()).abs() * q.g).sum(dims)
    summed = w64.shape[1] if per_channel else w64.numel()
    bound = bound + 2 * gamma(summed + 6, torch.float64) * ratio
    assert_within(q.s.grad, s64.grad, bound.view_as(s64))


def test_a_detached_scale_takes_no_gradient():
    model, layer = _model()
    policy = _policy(model, detach_scale=True)
    layer(torch.randn(2, 40))
    policy.term(layer).backward()
    assert layer.weight_quantizer.s.grad is None and layer.weight.grad.abs().sum() > 0


def test_a_nan_weight_gives_a_nan_term_not_an_index_error():
    """Diverged training (a folded run whose BatchNorm scale crossed 0) reaches the
    regulariser before the loop sees the NaN loss: the term is NaN, and the loop says why."""
    model, layer = _model()
    policy = _policy(model)
    layer(torch.randn(2, 40))
    layer.weight.data[0, :3] = float("nan")
    assert torch.isnan(policy.term(layer))


def test_lambda_is_vvtqs_cosine_from_a_quarter_of_the_epochs_per_epoch():
    model, _ = _model()
    epochs, per_epoch = 8, 10
    policy = _policy(model, epochs=epochs, per_epoch=per_epoch)

    def cosine_temp_decay(t):  # util_loss.CosineTempDecay(epochs, (0, 0.01), 0.25)(t)
        start, end, decay_start = 0.0, 0.01, 0.25 * epochs
        if t < decay_start:
            return start
        rel = (t - decay_start) / (epochs - decay_start)
        return end + 0.5 * (start - end) * (1 + np.cos(rel * np.pi))

    for step in range(epochs * per_epoch):
        policy.on_step_start(step, epochs * per_epoch)
        expected = cosine_temp_decay(step // per_epoch)
        assert math.isclose(policy.lam, expected, rel_tol=4 * 2.0**-52, abs_tol=1e-18)
    assert policy.lam < 0.01  # the last epoch nearly reaches lambda_end, as in VVTQ
    stepwise = _policy(model, epochs=epochs, per_epoch=per_epoch, per="step")
    stepwise.on_step_start(45, 80)
    assert 0 < stepwise.lam != policy.lam
