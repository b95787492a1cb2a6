"""Where the papers' public code is clear, oscbench does what it does: one test per point
found by comparing the two line by line (each names the reference file)."""

import pytest
import torch
from torch import nn

from oscbench.oscillation.osc_reg import OscReg, OscRegConfig
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.quant.modules import quantized_layers
from oscbench.quant.qkr import QKRAttention
from oscbench.training.accel import Accel
from oscbench.training.loop import train_step
from oscbench.training.optim import build_optimizers
from tests.bounds import assert_within, sum_difference_bound, unit_roundoff
from tests.conftest import Observer, build_config, fit
from tests.test_qkr import DEIT

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths


def test_qkr_quantizes_w_qk_x_with_its_own_activation_quantizer():
    """OFQ, src/quantization/modules/attention.py, QAttention_qkreparam: the logits are
    x_q quan_a_qkx_fn(W_qk x_q^T), not x_q W_qk x_q^T."""
    spec, built = build_config(["method=ofq", "bits=2", *DEIT])
    attn = next(m for m in built.model.modules() if isinstance(m, QKRAttention))
    x = next(built.data.train_batches(0, 4))[0]
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    built.model(x)
    xq = attn.input_quantizer(seen["x"])
    wqk = attn.w_qk()
    wqk = attn.qk_quantizer(wqk.reshape(-1, wqk.shape[-1])).view_as(wqk)
    qkx = attn.qkx_quantizer(wqk @ xq.unsqueeze(1).transpose(-2, -1))
    assert attn.qkx_quantizer.ready and attn.qkx_quantizer.signed  # W_qk x^T has both signs
    assert len(torch.unique(qkx.detach())) <= 4  # 2-bit codes
    expected = xq.unsqueeze(1) @ qkx * attn.head_dim**-0.5
    assert torch.equal(attn.logits(xq), expected)
    unquantized = xq.unsqueeze(1) @ (wqk @ xq.unsqueeze(1).transpose(-2, -1))
    assert not torch.allclose(expected, unquantized * attn.head_dim**-0.5)


def test_freezing_code_ema_starts_with_freezing_and_moves_only_while_it_is_on():
    """oscillations-qat, utils/oscillation_tracking_utils.py: check_init creates ema_x_int
    from the current x_int at the first call with freeze_threshold > 0, and __call__
    updates it only while freeze_threshold > 0."""
    spec, built = build_config(["method=lsq_freeze", "bits=3", "trainer.epochs=4"])
    freeze = built.policies[0]
    st, tr = freeze.states[0], built.tracker.tracked()[0][1]
    steps = []

    def record(step, total):
        steps.append((freeze.f_th, st.ema_code.clone(), tr.code.clone()))

    fit(spec, built, [Observer(on_step_start=record)])
    first = next(i for i, (f_th, _, _) in enumerate(steps) if f_th > 0)
    assert first > 0
    assert all(torch.equal(ema, steps[0][1]) for _, ema, _ in steps[:first])  # not moving
    _, ema, codes = steps[first]
    assert not torch.equal(codes, steps[0][2])  # weights moved during the warm-up ...
    # ... and the EMA starts from the codes of this step: c (1 - m) + m c, two roundings
    assert_within(ema, codes.float(), 2 * unit_roundoff() * codes.float().abs())
    m = tr.momentum
    _, ema_next, codes_next = steps[first + 1]
    assert torch.equal(ema_next, ema * (1 - m) + codes_next * m)


def test_the_tracker_sees_frozen_weights_at_their_frozen_code():
    """oscillations-qat, utils/oscillation_tracking_utils.py: __call__ substitutes the
    frozen x_int before tracking, so a frozen weight never counts as switching, even when
    momentum or weight decay carry its latent value across a threshold."""
    spec, built = build_config(["method=lsq_freeze", "bits=3", "trainer.weight_decay=9.0"])
    freeze = built.policies[0]
    st, tr = freeze.states[0], built.tracker.tracked()[0][1]
    with torch.no_grad():  # half the layer frozen at its current codes
        st.frozen.view(-1)[::2] = True
        st.code.copy_(tr.code)
    opt = build_optimizers(built.model, spec.trainer, 100)  # lr 0.05 x decay 9: w -> 0.55 w
    x, y = next(built.data.train_batches(0, 64))
    tracker = built.tracker
    train_step(built.model, built.model, x, y, opt, [freeze], tracker, Accel(), step=0, total=100)
    assert freeze.f_th == 0  # no new freezing: only the step moved the weights
    moved = tr.direction != 0
    assert moved[~st.frozen].sum() > 100  # the decay carried many weights across thresholds
    assert not moved[st.frozen].any()  # but no frozen one, as far as the tracker can tell
    assert torch.equal(tr.code[st.frozen], st.code[st.frozen])


def test_cga_anneals_the_blocks_and_leaves_the_8_bit_ends_alone():
    """OFQ, cga.py, train_one_epoch: the confidence mask and the restore apply to the
    blocks' fc1, fc2, qkv/v and proj; the patch embedding and the head train as usual."""
    spec, built = build_config(
        ["method=ofq", "bits=2", "trainer.epochs=1", "trainer.extra_epochs=1"]
    )
    cga = built.policies[0]
    layers = [m for _, m in quantized_layers(built.model)]
    ends = [m for m in layers if m.is_first_or_last]
    before, moved = {}, {id(m): 0 for m in ends}

    def snapshot(model):
        if cga.active:
            before.update({id(m): m.weight.detach().clone() for m in ends})

    def compare(model):
        if cga.active:
            for m in ends:
                moved[id(m)] += int((m.weight.detach() != before[id(m)]).sum())

    fit(spec, built, [Observer(after_backward=snapshot, on_step_end=compare)])
    steps = built.data.steps_per_epoch(spec.trainer.batch_size)
    for m in ends:  # nearly every weight of the ends moves in every CGA step
        assert moved[id(m)] > 0.5 * steps * m.weight.numel()
    assert len(ends) == 2 and cga.layers == [m for m in layers if not m.is_first_or_last]


def test_regulariser_scale_takes_gradient_through_the_largest_weight():
    """saintslab/osc_reg, osciquant/quantizers.py, UniformQuantizer: s = max|w| / (2^(b-1)-1)
    is not detached, so d/dw of mean(q(w)^2 - w^2) has, at the largest |w|,
    sign(w) / p * sum_i 2 q_i (round(t_i) - t_i) / N beside 2 (q - w) / N (t = w / s)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5)).double()
    bits, lam = 3, 0.7
    p = 2 ** (bits - 1) - 1
    run = RunContext(model, None, 4, Schedule(total=1, main=1, per_epoch=1), "sgd")
    OscReg(OscRegConfig(lam=lam, bits=bits, detach_scale=False), run).extra_loss(model).backward()
    u = unit_roundoff(torch.float64)
    for layer in model:
        w = layer.weight.detach()
        n = w.numel()
        s = w.abs().max() / p
        t, q = w / s, torch.round(w / s) * s
        direct = lam * 2 * (q - w) / n
        scale_terms = lam * 2 * q * (torch.round(t) - t) / (n * p)
        top = w.abs().argmax()
        expected = direct.clone()
        expected.view(-1)[top] += torch.sign(w.view(-1)[top]) * scale_terms.sum()
        bound = 8 * u * lam * 2 * (q.abs() + w.abs()) / n
        bound.view(-1)[top] += sum_difference_bound(scale_terms.abs(), dtype=torch.float64) + (
            8 * u * (lam * 2 * q.abs() * (t.abs() + torch.round(t).abs()) / (n * p)).sum()
        )
        assert_within(layer.weight.grad, expected, bound)
        assert scale_terms.sum().abs() > 1e3 * bound.view(-1)[top]  # the path is visible


def test_nagel_schedules_count_iterations_from_one():
    """oscillations-qat, main.py: the dampening weight and the freezing threshold are set
    at ITERATION_STARTED from ignite's iteration counter, which starts at 1: the annealing
    starts at iteration 0.25 T (before it, the dampening weight is its start value and
    the freezing threshold 0) and ends on the last iteration at the final value."""
    _, built = build_config(["method=lsq_dampen", "policy.dampen.lambda_start=0.02"])
    dampen = built.policies[0]
    dampen.on_step_start(0, 100)
    assert dampen.lam == 0.02
    dampen.on_step_start(99, 100)
    assert dampen.lam == 0.1
    _, built = build_config(["method=lsq_freeze", "bits=3"])
    freeze = built.policies[0]
    freeze.on_step_start(23, 100)  # iteration 24 < 25
    assert freeze.f_th == 0
    freeze.on_step_start(24, 100)  # iteration 25: the annealing starts at its start value
    assert freeze.f_th == 0.1
    freeze.on_step_start(99, 100)
    assert freeze.f_th == 0.011
