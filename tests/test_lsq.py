"""LSQ equals PyTorch's fused learnable fake-quantize ops, forward and backward."""

import math

import pytest
import torch

from oscbench.quant.base import int_range
from oscbench.quant.lsq import LSQConfig, LSQQuantizer, lsq_quantize
from tests.bounds import assert_within, gamma, sum_difference_bound, unit_roundoff

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths


def _grads(fn, x, s, go):
    x = x.clone().requires_grad_()
    s = s.clone().requires_grad_()
    y = fn(x, s)
    y.backward(go)
    return y.detach(), x.grad, s.grad


def _step_grad_terms(x, s, n, p, go, g):
    """The step gradient's summands g * go * (q - x/s) (n or p where clipped), as positive
    terms: `go` takes the sign of (q - x/s), so the sum is well conditioned and its error
    bound is a small fraction of it. Returns (terms, per-term rounding allowance): the
    summands themselves may be rounded differently (x/s as a product with 1/s or as a
    quotient): a few roundings of |go| (|q| + |x/s|) g each."""
    xs = x * s.reciprocal()
    q = torch.round(xs).clamp(n, p)
    ds = torch.where(torch.round(xs) == q, q - xs, q)
    go = go.abs() * torch.where(ds < 0, -1.0, 1.0)
    terms = go * ds * g
    return go, terms, 4 * unit_roundoff() * (go.abs() * (q.abs() + xs.abs()) * g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_matches_fused_op(bits, signed):
    torch.manual_seed(bits)
    n, p = int_range(bits, signed)
    x = torch.randn(32, 16, 3, 3)
    s = torch.tensor([1.0 / p])  # grid spans about +-1: clips at both ends at every bit-width
    g = 1 / math.sqrt(x.numel() * p)
    go, terms, rounding = _step_grad_terms(x, s, n, p, torch.randn_like(x), g)
    ref = _grads(
        lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(
            x, s, torch.zeros(1), n, p, g
        ),
        x,
        s,
        go,
    )
    ours = _grads(lambda x, s: lsq_quantize(x, s.reshape(()), n, p, g), x, s, go)
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], ref[1])
    # the step gradient is a sum over every element, added up in another order by the fused
    # op (and by each CPU's vector width): equal within the bound of that reordering
    assert_within(ours[2].reshape(1), ref[2], sum_difference_bound(terms) + rounding.sum())
    # the test is not vacuous: values are clipped at both ends and the step gradient is live
    codes = torch.round(x / s)
    assert (codes < n).any() and (codes > p).any() and ref[2].abs().item() > 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_matches_fused_op(bits):
    torch.manual_seed(100 + bits)
    n, p = int_range(bits, True)
    x = torch.randn(24, 8, 3, 3)
    s = torch.rand(24) * 0.5 + 0.05
    g = 1 / math.sqrt(x[0].numel() * p)
    go, terms, rounding = _step_grad_terms(x, s.view(-1, 1, 1, 1), n, p, torch.randn_like(x), g)
    ref = _grads(
        lambda x, s: torch._fake_quantize_learnable_per_channel_affine(
            x, s, torch.zeros(24), 0, n, p, g
        ),
        x,
        s,
        go,
    )
    ours = _grads(lambda x, s: lsq_quantize(x, s.view(-1, 1, 1, 1), n, p, g), x, s, go)
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], ref[1])
    bound = sum_difference_bound(terms.flatten(1), dim=1) + rounding.flatten(1).sum(1)
    assert_within(ours[2], ref[2], bound)  # one sum per output channel


def _cfg(**kw):
    base = dict(per_channel=False, init="lsq", grad_scale=True, signed="auto", keep_positive=False)
    return LSQConfig(**{**base, **kw})


def test_init_and_grad_scale_follow_esser():
    w = torch.randn(16, 8, 3, 3)
    q = LSQQuantizer(_cfg(), 4, 16, True)
    q.init_from(w)
    assert (q.n, q.p) == (-8, 7)
    torch.testing.assert_close(q.s.detach(), 2 * w.abs().mean() / math.sqrt(7))
    assert q.g == pytest.approx(1 / math.sqrt(w.numel() * 7))
    qc = LSQQuantizer(_cfg(per_channel=True), 4, 16, True)
    qc.init_from(w)
    torch.testing.assert_close(qc.s.detach(), 2 * w.abs().flatten(1).mean(1) / math.sqrt(7))
    assert qc.g == pytest.approx(1 / math.sqrt(w[0].numel() * 7))


def test_activation_sign_is_read_from_calibration_data():
    relu_out = torch.rand(8, 4, 5, 5)
    aq = LSQQuantizer(_cfg(), 4, None, False)
    aq.init_from(relu_out)
    assert (aq.signed, aq.n, aq.p) == (False, 0, 15)
    assert aq.g == pytest.approx(1 / math.sqrt(4 * 5 * 5 * 15))  # features per sample
    aq2 = LSQQuantizer(_cfg(), 4, None, False)
    aq2.init_from(relu_out - 0.5)
    assert (aq2.signed, aq2.n, aq2.p) == (True, -8, 7)


def test_mse_init_beats_lsq_init_on_mse():
    torch.manual_seed(0)
    w = torch.randn(4096)
    errs = {}
    for init in ("lsq", "mse"):
        q = LSQQuantizer(_cfg(init=init), 3, None, True)
        q.init_from(w)
        errs[init] = ((q(w) - w) ** 2).mean().item()
    assert errs["mse"] < errs["lsq"]


def test_keep_positive_revives_a_step_driven_below_zero():
    """With keep_positive a negative step acts as |s| (torch.ao's guard); without it an
    unsigned quantizer maps everything to 0."""
    x = torch.rand(8, 4, 5, 5) * 6
    for keep, expect_zero in ((True, False), (False, True)):
        q = LSQQuantizer(_cfg(keep_positive=keep), 2, None, False)
        q.init_from(x)
        s = q.s.detach().clone()
        q.s.data.neg_()
        y = q(x)
        if expect_zero:
            assert torch.equal(y, torch.zeros_like(y))
        else:
            torch.testing.assert_close(q.s.detach(), s, rtol=0, atol=0)
            torch.testing.assert_close(y, lsq_quantize(x, s, 0, 3, q.g), rtol=0, atol=0)


def test_levels_thresholds_and_codes_agree():
    q = LSQQuantizer(_cfg(), 2, None, True)
    q.init_from(torch.randn(100))
    s = q.s.item()
    x = torch.linspace(-3 * s, 3 * s, 101)
    torch.testing.assert_close(q.levels(x), torch.tensor([-2.0, -1.0, 0.0, 1.0]) * s)
    torch.testing.assert_close(q.thresholds(x), torch.tensor([-1.5, -0.5, 0.5]) * s)
    torch.testing.assert_close(q(x), q.to_int(x) * s)
    dist = q.threshold_distance(x)
    brute = (x[:, None] - q.thresholds(x)[None]).abs().min(1).values
    torch.testing.assert_close(dist, brute)


def test_state_dict_restores_data_dependent_state():
    a = LSQQuantizer(_cfg(), 3, None, False)
    a.init_from(torch.rand(4, 10))
    b = LSQQuantizer(_cfg(), 3, None, False)
    assert not b.ready
    b.load_state_dict(a.state_dict())
    assert b.ready and (b.signed, b.g, b.n, b.p) == (a.signed, a.g, a.n, a.p)
    assert torch.equal(b.s, a.s)


def test_uninitialised_quantizer_refuses_to_run():
    q = LSQQuantizer(_cfg(), 4, None, True)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.randn(3))


def test_live_bounds_equal_the_bounds_and_pass_g_times_n_and_p_to_the_step():
    torch.manual_seed(0)
    w = torch.randn(8, 4) * 0.1
    for per_channel in (False, True):
        cfg = LSQConfig(
            per_channel=per_channel, init="lsq", grad_scale=True, signed="auto", keep_positive=False
        )
        q = LSQQuantizer(cfg, 3, 8, True)
        q.init_from(w)
        lo, hi = q.live_bounds(w)
        dlo, dhi = q.bounds(w)
        assert torch.equal(lo.detach(), dlo) and torch.equal(hi.detach(), dhi)
        (lo.sum() + 2 * hi.sum()).backward()
        per = lo.numel() // q.s.numel()  # broadcast copies of each step
        expected = torch.full_like(q.s, (q.n + 2 * q.p) * q.g * per, dtype=torch.float64)
        # per broadcast copy a product with g, then a sum over the copies: gamma_(per + 1)
        bound = gamma(per + 1) * per * (abs(q.n) + 2 * q.p) * q.g
        assert_within(q.s.grad, expected, torch.full_like(expected, bound))
