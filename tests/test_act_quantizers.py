"""The activation quantizers of the papers' recipes: LTQ (N2UQ, AOQ) and LSQ+ against their
formulas, and each in a run end to end."""

import pytest
import torch

from oscbench.quant.lsq import LSQConfig, LSQQuantizer, lsq_quantize
from oscbench.quant.lsq_plus import LSQPlusConfig, LSQPlusQuantizer
from oscbench.quant.ltq import LTQConfig, LTQQuantizer
from oscbench.records.checkpoint import FINAL_MODEL
from tests.bounds import assert_within, gamma
from tests.conftest import run_config
from tests.learned import above

QUICK = ["logger=none", "device=cpu", "bits=2"]


def _ltq(bits=2, **kw):
    cfg = {"init_range": 2.0, "learn_start": True, "eps": 1e-3, "scale_out": 1.0} | kw
    q = LTQQuantizer(LTQConfig(**cfg), bits, None, False)
    q.init_from(torch.zeros(1))
    return q


def _n2uq(x, a, start, s_in, s_out, u, eps):
    """N2UQ's LTQ (resnet/resnet.py), written out in float64: forward code k = #{i: z > f_i}
    with b_0 = start, b_(i+1) = b_i + a_i, f_i = b_i + a_i/2; the backward ramp
    j + (z - b_j)/a_j on (b_0, b_n], and its partial derivatives per element."""
    a = torch.where(a > eps, a, torch.full_like(a, eps))
    b = start + torch.cat([a.new_zeros(1), torch.cumsum(a, 0)])
    f = b[:-1] + a / 2
    z = x * s_in
    k = (z[..., None] > f).sum(-1).to(x.dtype)
    j = ((z[..., None] > b[:-1]).sum(-1) - 1).clamp(min=0)
    inside = (z > b[0]) & (z <= b[-1])
    aj, bj = a[j], b[j]
    d = {  # d ramp / d parameter, per element (zero outside)
        "x": s_in / aj,
        "scale_in": x / aj,
        "start": -1 / aj,
        "aj": -(z - bj) / aj**2,  # to its own interval
        "before": -1 / aj,  # to every interval below j
    }
    d = {key: torch.where(inside, v, torch.zeros_like(v)) for key, v in d.items()}
    return k * u * s_out, k, j, d, b


@pytest.mark.numeric
@pytest.mark.parametrize("bits", [2, 3])
def test_ltq_codes_values_and_gradients_equal_n2uqs_formula(bits):
    """Random non-uniform intervals, start and scales; inputs kept at least 1e-4 from every
    threshold (the float32 thresholds are sums of at most n + 1 terms, within
    gamma_(n+2) sum|.| < 1e-5 of the float64 ones), so the codes are the formula's exactly.
    Each gradient sums N products of a few roundings: within gamma_(N+n+8) times the sum
    of the magnitudes of its terms."""
    torch.manual_seed(bits)
    q = _ltq(bits)
    n = 2**bits - 1
    with torch.no_grad():
        q.a.copy_(q.u * (0.3 + 1.4 * torch.rand(n)))
        q.start.fill_(-0.2)
        q.scale_in.fill_(1.3)
        q.scale_out.fill_(0.7)
    p = {k: getattr(q, k).detach().double() for k in ("a", "start", "scale_in", "scale_out")}
    x = 3 * torch.rand(40, 30) - 0.5
    _, _, _, _, b = _n2uq(x.double(), *p.values(), q.u, 1e-3)
    edges = torch.cat([b, b[:-1] + p["a"] / 2]) / p["scale_in"]  # in x's units
    near = (x.double()[..., None] - edges).abs().min(-1).values < 1e-4
    x = torch.where(near, x + 3e-4, x).requires_grad_()
    assert gamma(n + 2) * (b.abs().sum() + 2) < 1e-5
    out = q(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    value, k, j, d, _ = _n2uq(
        x.detach().double(), p["a"], p["start"], p["scale_in"], p["scale_out"], q.u, 1e-3
    )
    assert torch.equal(q.to_int(x.detach()).double(), k)  # codes 0..n
    assert len(torch.unique(k)) == n + 1  # the level: the code times one scale, u scale_out
    assert torch.equal(out.detach(), k.float() * (q.u * q.scale_out.detach()))
    assert_within(out.detach(), value, gamma(3) * value.abs())
    scale = g.double() * q.u * p["scale_out"]  # the ramp's gradient, times the output's scale
    N = x.numel()

    def check(grad, terms, magnitude):
        assert_within(grad, terms, gamma(N + n + 8) * magnitude)

    check(x.grad, scale * d["x"], gamma(8) / gamma(N + n + 8) * (scale * d["x"]).abs())
    for name in ("scale_in", "start"):
        t = scale * d[name]
        check(getattr(q, name).grad, t.sum(), t.abs().sum())
    own = [
        torch.where(j == i, d["aj"], 0.0) + torch.where(j > i, d["before"], 0.0) for i in range(n)
    ]
    terms = torch.stack([(scale * o).sum() for o in own])
    mags = torch.stack([(scale * o).abs().sum() for o in own])
    check(q.a.grad, terms, mags)
    t = g.double() * k * q.u
    check(q.scale_out.grad, t.sum(), t.abs().sum())
    assert (q.a.grad != 0).all() and q.start.grad != 0  # every threshold learns


def test_ltq_levels_are_uniform_and_aoqs_start_is_fixed():
    q = _ltq(3, learn_start=False, eps=1e-6, scale_out=2.0)
    levels = q.levels(None)
    k = torch.arange(8.0)
    assert_within(levels, k * levels[1], gamma(4) * levels.abs())  # k u scale_out
    assert levels[-1].item() == pytest.approx(4.0)  # 2.0 x AOQ's scale_out 2
    x = torch.rand(64).requires_grad_()
    q(x).sum().backward()
    assert q.start.grad is None and not q.start.requires_grad
    assert q.a.grad is not None


def _lsq_pair(x, init="lsq"):
    lsq = LSQQuantizer(LSQConfig(False, "lsq", True, "unsigned", False), 2, None, False)
    plus = LSQPlusQuantizer(LSQPlusConfig(init, True), 2, None, False)
    lsq.init_from(x)
    plus.init_from(x)
    return lsq, plus


def test_lsq_plus_at_offset_zero_is_lsq_exactly():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 4, 4)) * 2
    lsq, plus = _lsq_pair(x)
    assert plus.beta.item() == 0 and torch.equal(plus.s, lsq.s) and plus.g == lsq.g
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.rand_like(x) + 0.5  # one sign: the offset's sums do not cancel
    a, b = lsq(xa), plus(xb)
    assert torch.equal(a, b) and torch.equal(lsq.to_int(x), plus.to_int(x))
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(lsq.s.grad, plus.s.grad)
    clipped = x.double() / lsq.s.double() > lsq.p + 0.5  # LSQ's range: the rounded code's
    assert clipped.sum() > 10
    bound = 2 * gamma(x.numel()) * plus.g * g.abs().sum()  # two sums of N: +beta, x - beta
    assert_within(plus.beta.grad, plus.g * (g.double() * clipped).sum(), bound)


@pytest.mark.numeric
def test_lsq_plus_offset_gets_the_gradient_of_the_clipped_inputs():
    """d x_q / d beta = 1 where x - beta is clipped (below n s or above p s), 0 inside, times
    g; x_q = s round(clamp((x - beta)/s)) + beta (min-max init: beta = min x)."""
    torch.manual_seed(1)
    x = torch.randn(8, 16, 4, 4)
    _, plus = _lsq_pair(x, "minmax")
    assert plus.beta.item() == x.min().item()
    with torch.no_grad():
        plus.beta.fill_(-1.0)  # the grid spans [-1.25, 0.75]: a tenth clips below, a fifth above
        plus.s.fill_(0.5)
    xg = x.clone().requires_grad_()
    out = plus(xg)
    g = torch.rand_like(x) + 0.5  # one sign: the offset's sums do not cancel
    (out * g).sum().backward()
    t = (x.double() - plus.beta.double()) / plus.s.double()
    edges = torch.tensor([-0.5, plus.p + 0.5], dtype=torch.float64)
    assert (t[..., None] - edges).abs().min() > 1e-4  # no input at the range's rounding edge
    clipped = (t < -0.5) | (t > plus.p + 0.5)
    assert clipped.sum() > 50
    ref = plus.g * (g.double() * clipped).sum()
    assert_within(plus.beta.grad, ref, 2 * gamma(x.numel() + 2) * g.abs().sum() * plus.g)
    codes = plus.to_int(x)
    assert torch.equal(out.detach(), plus.s.detach() * codes + plus.beta.detach())
    assert codes.min() == 0 and codes.max() == plus.p


@pytest.mark.learned
@pytest.mark.parametrize("act", ["ltq", "lsq_plus"])
def test_a_run_with_the_activation_quantizer_trains_end_to_end(act, tmp_path):
    """2 bits, 10 epochs (LTQ's fixed start range [0, 2] takes a few epochs to fit the
    activations: 51-76 % after epoch 2, 80-99 % after 6 on different CPU paths): LTQ 97.5-99.2
    %, LSQ+ 99.2-99.4 % on the native, avx2 and default paths (bench/margins.md)."""
    final = run_config([f"act_quantizer={act}", *QUICK, "trainer.epochs=10"], tmp_path)
    above("test accuracy after BN re-estimation (%)", final["acc_bn"], 50)  # chance: 10 %
    state = torch.load(tmp_path / FINAL_MODEL)
    learned = [
        v
        for k, v in state.items()
        if k.endswith(".input_quantizer.a" if act == "ltq" else ".input_quantizer.beta")
    ]
    assert learned
    if act == "ltq":  # the intervals, all u = 2/3 at the start, have learned
        assert all(not torch.allclose(a, torch.full_like(a, 2 / 3)) for a in learned)


@pytest.mark.numeric
def test_lsq_activations_per_channel_have_ofqs_steps_and_gradients():
    """One step per channel of dim 1, from the calibration batch; g = 1/sqrt(N p) with N the
    elements per channel (OFQ); each channel quantized exactly as per-tensor LSQ would with
    its own step; the step's gradient a sum over that channel's elements."""
    torch.manual_seed(3)
    q = LSQQuantizer(LSQConfig(True, "lsq", True, "auto", False), 3, None, False)
    x = torch.relu(torch.randn(8, 6, 5, 5)) * torch.arange(1.0, 7.0).view(1, 6, 1, 1)
    q.init_from(x)
    assert q.s.shape == (6,) and q.per_channel and not q.signed
    mean = x.double().transpose(0, 1).flatten(1).abs().mean(1)
    assert_within(q.s, 2 * mean / 7**0.5, gamma(200 + 4) * 2 * mean / 7**0.5)
    assert q.g == 1 / (8 * 25 * 7) ** 0.5
    xg = x.clone().requires_grad_()
    out = q(xg)
    g = torch.randn_like(x)
    (out * g).sum().backward()
    for c in range(6):
        xc = x[:, c].clone().requires_grad_()
        sc = q.s.detach()[c].clone().requires_grad_()
        ref = lsq_quantize(xc, sc, q.n, q.p, q.g)
        assert torch.equal(out[:, c].detach(), ref.detach())
        (ref * g[:, c]).sum().backward()
        assert torch.equal(xg.grad[:, c], xc.grad)
        t = x[:, c].double() / q.s.double()[c]
        ds = (t.round().clamp(q.n, q.p) - t * ((t.round() >= q.n) & (t.round() <= q.p))).abs()
        bound = gamma(x[:, c].numel() + 4) * q.g * (g[:, c].double().abs() * (ds + 1)).sum()
        assert_within(q.s.grad[c], sc.grad, bound)
    tokens = LSQQuantizer(LSQConfig(True, "lsq", True, "auto", False), 3, None, False)
    tokens.init_from(torch.rand(4, 9, 16))  # (batch, tokens, features): a step per token (OFQ)
    assert tokens.s.shape == (9,)
    head = LSQQuantizer(LSQConfig(True, "lsq", True, "auto", False), 3, None, False)
    head.init_from(torch.rand(4, 16))  # the classifier's input: one step
    assert head.s.shape == () and not head.per_channel


@pytest.mark.slow  # 25 s; resuming every preset is tests/test_resume.py's
def test_a_run_with_per_channel_lsq_activations_resumes(tmp_path, monkeypatch):
    from tests.test_resume import kill_and_resume

    args = ["act_quantizer.per_channel=true", *QUICK, "trainer.epochs=2"]
    kill_and_resume(args, tmp_path, monkeypatch)
