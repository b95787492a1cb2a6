"""StatsQ, AOQ and round-to-nearest: grids, gradients, codes."""

import pytest
import torch

from oscbench.quant.aoq import AOQConfig, AOQQuantizer
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from oscbench.quant.statsq import StatsQConfig, StatsQQuantizer
from tests.conftest import aoq_coef

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths
RTN = RTNConfig(per_channel=False, scale_grad=False)


def test_statsq_2bit_levels_are_half_steps_of_mean_abs_per_row():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    q = StatsQQuantizer(StatsQConfig(), 2, None, True)
    q.init_from(w)
    wq = q(w)
    m = w.detach().abs().flatten(1).mean(1)
    grid = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    for row in range(6):
        values = torch.unique(wq[row].detach())
        torch.testing.assert_close(values, grid * m[row])  # exactly these four, all used
    torch.testing.assert_close(q.levels(w), m[:, None] * grid)
    torch.testing.assert_close(q.thresholds(w), m[:, None] * torch.tensor([-1.0, 0.0, 1.0]))
    assert list(q.parameters()) == []
    (wq * torch.arange(wq.numel()).reshape(wq.shape)).sum().backward()
    # identity straight-through: no gradient path through s = 2 mean|w|
    torch.testing.assert_close(w.grad, torch.arange(w.numel(), dtype=torch.float).reshape(w.shape))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_statsq_codes_and_levels_agree(bits):
    w = torch.randn(5, 40)
    q = StatsQQuantizer(StatsQConfig(), bits, None, True)
    k = q.to_int(w)
    assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1
    s = 2 * w.abs().mean(1, keepdim=True)
    torch.testing.assert_close(q(w), s * (k + 0.5) / 2 ** (bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aoq_at_init_is_a_uniform_mid_rise_quantizer(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 9) * 0.3
    q = AOQQuantizer(AOQConfig(grad_scale=True, keep_positive=False), bits, None, True)
    q.init_from(w)
    s = w.std() / 2 ** (bits - 2)
    half = 2 ** (bits - 1)
    expected = s * (torch.clamp(torch.floor(w / s), -half, half - 1) + 0.5)
    torch.testing.assert_close(q(w), expected)
    torch.testing.assert_close(q.thresholds(w), (torch.arange(2**bits - 1) - half + 1) * s)
    torch.testing.assert_close(q.levels(w), (torch.arange(2**bits) - (2**bits - 1) / 2) * s)
    # codes fit int8 and map back to their bin through code_centre
    codes = q.to_int(w)
    torch.testing.assert_close(q.to_int(q.code_centre(codes, w)), codes)


def test_aoq_gradients_identity_for_w_coefficient_for_level_step_none_for_thresholds():
    w = torch.tensor([-2.0, -0.7, 0.2, 0.9, 3.0], requires_grad=True)
    q = AOQQuantizer(AOQConfig(grad_scale=False, keep_positive=False), 2, None, True)
    q.init_from(torch.tensor([-1.0, 1.0]))  # std = sqrt(2)
    q.s_th.fill_(1.0)
    q.s_le.data.fill_(0.8)
    out = q(w)
    torch.testing.assert_close(out.detach(), torch.tensor([-1.5, -0.5, 0.5, 0.5, 1.5]) * 0.8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones(5))  # no clip mask
    assert q.s_le.grad.item() == pytest.approx(-1.5 - 0.5 + 0.5 + 0.5 + 1.5)
    assert [n for n, _ in q.named_parameters()] == ["s_le"]  # s_th is a buffer


def test_aoq_keep_positive_turns_a_negative_level_step_back():
    """A level step driven below 0 flips every weight's sign; keep_positive restores |s_le|
    first, so the output is the one at the positive step."""
    w = torch.tensor([-2.0, -0.7, 0.2, 0.9, 3.0])
    outputs = {}
    for keep in (False, True):
        q = AOQQuantizer(AOQConfig(grad_scale=False, keep_positive=keep), 2, None, True)
        q.init_from(torch.tensor([-1.0, 1.0]))
        q.s_th.fill_(1.0)
        q.s_le.data.fill_(-0.8)
        outputs[keep] = q(w)
    levels = torch.tensor([-1.5, -0.5, 0.5, 0.5, 1.5]) * 0.8
    torch.testing.assert_close(outputs[True], levels, rtol=0, atol=0)
    torch.testing.assert_close(outputs[False], -levels, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_aoq_fused_op_equals_autograd_of_its_formula(bits):
    """_AOQLevels and the stage-3 _DistanceNorm equal the plain autograd expressions
    bit for bit."""
    from oscbench.oscillation.aoq_schedule import _DistanceNorm

    torch.manual_seed(bits)
    w0 = torch.randn(32, 8, 3, 3) * 0.2
    q = AOQQuantizer(AOQConfig(grad_scale=True, keep_positive=False), bits, None, True)
    q.init_from(w0)
    q.s_th.mul_(0.7)  # thresholds and levels apart, as in stage 2
    go = torch.randn_like(w0)

    def reference(w):
        coef = aoq_coef(q, w)
        s_le = q.s_le * q.g + (q.s_le * (1 - q.g)).detach()
        return coef * s_le + (w - w.detach())

    results = []
    for fn in (q, reference):
        w = w0.clone().requires_grad_()
        q.s_le.grad = None
        out = fn(w)
        (out * go).sum().backward()
        results.append((out.detach(), w.grad, q.s_le.grad.clone()))
    (out_a, gw_a, gs_a), (out_b, gw_b, gs_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gw_a, gw_b) and torch.equal(gs_a, gs_b)

    q(w0)  # sets last_coef
    for fused in (True, False):
        w = w0.clone().requires_grad_()
        if fused:
            norm = _DistanceNorm.apply(w, q.last_coef * q.s_th)
        else:
            norm = torch.linalg.vector_norm(w - aoq_coef(q, w) * q.s_th)
        (0.01 * norm).backward()
        results.append((norm.detach(), w.grad))
    assert torch.equal(results[2][0], results[3][0]) and torch.equal(results[2][1], results[3][1])


def test_rtn_is_symmetric_max_scaled_with_straight_through_gradient():
    w = torch.tensor([-1.0, -0.4, 0.1, 0.26, 0.9], requires_grad=True)
    q = RTNQuantizer(RTN, 2, None, True)  # 2 bits: ternary {-1, 0, 1} * max|w|
    out = q(w)
    torch.testing.assert_close(out.detach(), torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones(5))
    q3 = RTNQuantizer(RTN, 3, None, True)  # s = 1/3
    torch.testing.assert_close(q3(w.detach()), torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]) / 3)
