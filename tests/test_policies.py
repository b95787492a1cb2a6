"""Each policy's mechanism, through the real training loop on digits (CPU, seeded)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oscbench.oscillation.freeze import Freeze
from oscbench.oscillation.osc_reg import OscReg, OscRegConfig
from oscbench.oscillation.policy import RunContext, Schedule
from oscbench.quant.base import clip_to_grid
from oscbench.quant.modules import quantized_layers
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from tests.bounds import assert_within, sum_difference_bound, unit_roundoff
from tests.conftest import Observer, aoq_coef, build_config, fit, run_config
from tests.learned import above, below

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths

# --- AOQ schedule ------------------------------------------------------------------


def test_aoq_alpha_goes_from_one_to_0_30_over_stage_one_with_inclusive_boundaries():
    """AOQ's code (muzenc/AOQ, quan/quantizer.py and the training loss): stage 1 while
    `epoch <= 50`, stage 3 once `epoch > 150` of 250: the boundaries belong to the earlier
    stage, and alpha reaches 0.30 on stage 1's last epoch."""
    spec, built = build_config(["method=aoq", "bits=2"])
    policy = built.policies[0]
    layer = policy.layers[0]
    q = layer.weight_quantizer
    alphas = []
    for step in range(0, 22):
        policy.on_step_start(step, 100)
        alphas.append(policy.alpha)
        assert policy.stage == (1 if step <= 20 else 2)
        torch.testing.assert_close(q.s_th, policy.alpha * q.s0)
    assert alphas[0] == 1.0
    assert all(a > b for a, b in zip(alphas[:21], alphas[1:21], strict=False))  # decreasing
    assert alphas[19] == pytest.approx(0.65 + 0.35 * math.cos(math.pi * 19 / 20))
    assert alphas[20] == 0.30 and alphas[21] == 0.30  # reached on stage 1's last step
    policy.on_step_start(60, 100)
    assert policy.stage == 2 and policy.alpha == 0.30
    policy.on_step_start(61, 100)
    assert policy.stage == 3


def _backward(spec, built, step, total=100):
    policy = built.policies[0]
    for t in range(step + 1):  # the schedule walks through every step
        policy.on_step_start(t, total)
    x, y = next(built.data.train_batches(0, 64))
    loss = F.cross_entropy(built.model(x), y)
    extra = policy.extra_loss(built.model)
    built.model.zero_grad(set_to_none=True)
    (loss + (extra if extra is not None else 0)).backward()
    policy.after_backward(built.model)
    return policy, extra


def test_aoq_stage_two_learns_level_step_not_thresholds_stage_three_dampens():
    spec, built = build_config(["method=aoq", "bits=2"])
    policy, extra = _backward(spec, built, step=5)  # stage 1: both spacings frozen
    q = policy.layers[0].weight_quantizer
    assert q.s_le.grad is None and extra is None
    policy, extra = _backward(spec, built, step=30)  # stage 2
    assert q.s_le.grad is not None and q.s_le.grad.abs().item() > 0
    assert not q.s_th.requires_grad and "s_th" not in dict(q.named_parameters())
    assert extra is None
    torch.testing.assert_close(q.s_le.detach(), 0.30 * q.s0)  # no jump at the stage boundary
    policy, extra = _backward(spec, built, step=70)  # stage 3
    expected = 0.01 * sum(
        torch.linalg.vector_norm(
            m.weight - aoq_coef(m.weight_quantizer, m.weight) * m.weight_quantizer.s_th
        )
        for m in policy.layers
    )
    assert torch.equal(extra.detach(), expected.detach())  # the same norms, added alike


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
@pytest.mark.learned
def test_aoq_crosses_more_thresholds_than_lsq_in_stage_one():
    """AOQ's claim: shrinking thresholds lets weights cross them. Same seed and epochs:
    157k-166k crossings in the first 20 % against LSQ's 38k on every CPU path."""
    crossings = {}
    for method in ("lsq", "aoq"):
        spec, built = build_config([f"method={method}", "bits=2", "trainer.epochs=10"])
        history = fit(spec, built)
        crossings[method] = sum(h["osc"]["crossings"] for h in history[:2])  # first 20%
    above("AOQ's crossings in stage 1, against twice LSQ's", crossings["aoq"], 2 * crossings["lsq"])


# --- Dampening ---------------------------------------------------------------------


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
@pytest.mark.learned
def test_dampening_lowers_oscillation_and_distance_to_grid(tmp_path):
    """The mechanism, with a strong pull (lambda_end 1.0): at the paper's 0.1 over 10 digits
    epochs the effect is smaller than the spread of one run over CPU code paths (oscillating
    share, lsq against lsq_dampen: 0.61 against 0.69 % with ATEN_CPU_CAPABILITY=default and
    one thread, 0.69 against 0.65 % natively); at 1.0 it about halves the share on every
    path (0.21-0.32 % against 0.61-0.69 %) and lowers the distance to the grid (0.2121-0.2134
    against 0.2164-0.2178 steps; native, avx2, default: bench/margins.md)."""
    base = ["bits=2", "trainer.epochs=10", "logger=none", "device=cpu"]
    lsq = run_config(["method=lsq", *base], tmp_path / "lsq")
    damp = run_config(
        ["method=lsq_dampen", "policy.dampen.lambda_end=1.0", *base], tmp_path / "dampen"
    )
    below(
        "oscillating share: dampened, against 0.75 LSQ's",
        damp["osc_share"],
        0.75 * lsq["osc_share"],
    )
    dist = [r["threshold_distance"]["mean_to_level"] for r in (damp, lsq)]
    below("distance to the grid (steps): dampened, against LSQ's", *dist)
    assert damp["dampen/lambda"] == 1.0  # reached lambda_end on the last step


def test_dampening_term_follows_the_formula_and_gives_no_gradient_to_the_step():
    spec, built = build_config(["method=lsq_dampen", "bits=2"])
    policy = built.policies[0]
    policy.on_step_start(10, 100)
    assert policy.lam == 0.0 and policy.extra_loss(built.model) is None  # off before 25%
    policy.on_step_start(100, 100)
    assert policy.lam == pytest.approx(0.1)
    loss = policy.extra_loss(built.model)
    expected, bound = 0, 0
    for _, layer in quantized_layers(built.model):
        q, w = layer.weight_quantizer, layer.weight
        squares = (q(w).detach() - clip_to_grid(q, w)) ** 2
        expected += squares.sum(0).mean()  # Nagel et al.'s kernel_mean
        terms = squares / (w.numel() // w.shape[0])
        # the same squares, summed in another order, then one division
        bound += sum_difference_bound(terms.detach()) + 2 * unit_roundoff() * terms.sum()
    bound = 0.1 * bound + 4 * unit_roundoff() * 0.1 * expected.abs()  # sum of layers, lambda
    assert_within(loss.detach(), 0.1 * expected.detach(), bound.detach())
    built.model.zero_grad()
    loss.backward()
    layers = [m for _, m in quantized_layers(built.model)]
    assert all(m.weight_quantizer.s.grad is None for m in layers)
    assert any(m.weight.grad.abs().sum() > 0 for m in layers)


def test_dampening_gradient_is_bit_identical_to_autograd_of_the_formula():
    """The fused term (oscbench.oscillation.dampen._DampenTerm) against plain autograd."""
    spec, built = build_config(["method=lsq_dampen", "bits=2"])
    policy = built.policies[0]
    policy.on_step_start(80, 100)
    layers = [m for _, m in quantized_layers(built.model)]
    with torch.no_grad():  # some weights beyond the grid, where the gradient must be 0
        layers[1].weight[0].mul_(50)
    for layer in layers:
        layer.quantized_weight()
    built.model.zero_grad()
    policy.extra_loss(built.model).backward()
    fused = [m.weight.grad.clone() for m in layers]
    built.model.zero_grad()
    reference = 0
    for layer in layers:
        q, w = layer.weight_quantizer, layer.weight
        reference += ((layer.last_quantized_weight - clip_to_grid(q, w)) ** 2).sum(0).mean()
    (policy.lam * reference).backward()
    beyond = layers[1].weight[0].abs() > layers[1].weight_quantizer.s * 2
    assert beyond.any() and (fused[1][0][beyond] == 0).all()
    for got, layer in zip(fused, layers, strict=True):
        assert torch.equal(got, layer.weight.grad)


# --- Freezing ----------------------------------------------------------------------


def test_frozen_weights_keep_their_code_and_do_not_drift():
    spec, built = build_config(
        ["method=lsq_freeze", "bits=3", "trainer.epochs=6", "trainer.quant_lr=0"]
    )
    freeze = built.policies[0]
    seen: dict = {}
    violations = []

    def check(model):
        for i, (layer, st) in enumerate(zip(freeze.layers, freeze.states, strict=True)):
            codes = layer.weight_quantizer.to_int(layer.weight)
            w = layer.weight.detach()
            if i in seen:
                old_frozen, old_codes, old_w = seen[i]
                if not torch.equal(codes[old_frozen], old_codes[old_frozen]):
                    violations.append("code changed")
                if not torch.equal(w[old_frozen], old_w[old_frozen]):
                    violations.append("latent value drifted")
                if (old_frozen & ~st.frozen).any():
                    violations.append("unfrozen")
            seen[i] = (st.frozen.clone(), codes.clone(), w.clone())

    history = fit(spec, built, [Observer(on_step_end=check)])
    assert not violations, violations[:3]
    above("frozen share", history[-1]["freeze/frozen_share"], 0)
    assert history[0]["freeze/threshold"] == 0.0  # off in the first 25%
    assert history[-1]["freeze/threshold"] == 0.011  # 3-bit end value, on the last step


def test_freezing_takes_the_rounded_ema_code_and_keeps_earlier_codes():
    """Nagel et al.: a weight whose frequency passes f_th is frozen to round(EMA code),
    the EMA before this step's codes enter it; it still trains in this step and is frozen
    from the next forward on; frozen weights keep their code."""
    spec, built = build_config(["method=lsq_freeze", "bits=3"])
    policy = built.policies[0]
    policy.started = True  # the code EMAs exist: set them by hand
    layer = policy.layers[0]
    st, tr = policy.states[0], built.tracker.tracked()[0][1]
    flat = slice(0, 6)
    with torch.no_grad():
        st.ema_code.view(-1)[flat] = torch.tensor([1.4, 1.6, -2.5, -0.4, 3.0, 2.2])
        tr.freq.view(-1)[flat] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.5])
        st.frozen.view(-1)[5] = True  # frozen earlier, to code -3
        st.code.view(-1)[5] = -3
        untouched = st.code.view(-1)[6:].clone()
    policy.on_step_start(99, 100)  # late: f_th near its end value
    assert st.code.view(-1)[flat].tolist()[:4] == [1, 2, -2, 0]  # round half to even
    assert st.frozen.view(-1)[flat].tolist() == [False] * 5 + [True]  # not yet: next forward
    layer.weight.grad = torch.ones_like(layer.weight)
    policy.after_backward(built.model)
    assert layer.weight.grad.view(-1)[flat].tolist() == [1, 1, 1, 1, 1, 0]  # still trains
    policy.on_step_end(built.model)
    assert st.frozen.view(-1)[flat].tolist() == [True, True, True, True, False, True]
    assert st.code.view(-1)[5] == -3
    fresh = ~st.frozen.view(-1)[6:]
    assert torch.equal(st.code.view(-1)[6:][fresh], untouched[fresh])
    codes = layer.weight_quantizer.to_int(layer.weight).view(-1)
    assert codes[flat][:4].tolist() == [1, 2, -2, 0] and codes[5] == -3  # pinned to them


def test_freeze_state_is_the_policys_and_survives_save_and_load():
    spec, built = build_config(["method=lsq_freeze", "bits=3", "trainer.epochs=4"])
    fit(spec, built)
    state = copy.deepcopy(built.policies[0].state_dict())
    assert any(k.endswith(".frozen") and v.any() for k, v in state.items())
    assert state["_extra_state"] == {"started": True}
    assert not any("freeze" in k for k in built.model.state_dict())  # not the model's
    _, fresh = build_config(["method=lsq_freeze", "bits=3", "seed=3"])
    assert isinstance(fresh.policies[0], Freeze) and not fresh.policies[0].started
    fresh.policies[0].load_state_dict(state)
    for key, value in fresh.policies[0].state_dict().items():
        if key != "_extra_state":
            assert torch.equal(value, state[key]), key
    assert fresh.policies[0].started


# --- CGA ---------------------------------------------------------------------------


def test_cga_keeps_confident_weights_bit_identical_during_the_phase():
    spec, built = build_config(
        ["method=ofq", "bits=2", "trainer.epochs=2", "trainer.extra_epochs=1"]
    )
    cga = built.policies[0]
    steps = {"phase": 0, "moved": 0}
    snapshot = {}
    broken = []

    def before(model):
        if cga.active:
            snapshot["w"] = [m.weight.detach().clone() for m in cga.layers]

    def after(model):
        if not cga.active:
            return
        steps["phase"] += 1
        for layer, frozen, old in zip(cga.layers, cga.frozen, snapshot["w"], strict=True):
            w = layer.weight.detach()
            if not torch.equal(w[frozen], old[frozen]):
                broken.append(1)
            steps["moved"] += int((w[~frozen] != old[~frozen]).sum())

    history = fit(spec, built, [Observer(after_backward=before, on_step_end=after)])
    assert len(history) == 3  # 2 epochs + 1 CGA epoch
    assert steps["phase"] == built.data.steps_per_epoch(64) and not broken
    assert steps["moved"] > 0  # the not-confident weights did train
    # OFQ's min_lr over its peak (1e-5 / 5.47e-4), of this run's peak
    assert history[-1]["lr"] == 0.0183 * spec.trainer.lr and history[-1]["cga/active"] == 1.0
    # the rate of each epoch's first and last step: falling in the cosine, constant in CGA
    assert history[1]["lr_last"] < history[1]["lr"] and history[-1]["lr_last"] == history[-1]["lr"]
    above("frozen share in the CGA epoch", history[-1]["cga/frozen_share"], 0.9)
    below("frozen share in the CGA epoch", history[-1]["cga/frozen_share"], 1.0)
    assert history[0]["cga/active"] == 0.0


# --- Oscillation regulariser ---------------------------------------------------------


def test_regulariser_with_a_detached_scale_has_gradient_two_lambda_q_minus_w_over_numel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.BatchNorm1d(20), nn.Linear(20, 5))
    run = RunContext(model, None, 4, Schedule(total=1, main=1, per_epoch=1), "sgd")
    policy = OscReg(OscRegConfig(lam=0.7, bits=3, detach_scale=True), run)
    policy.extra_loss(model).backward()
    q = RTNQuantizer(RTNConfig(per_channel=False, scale_grad=False), 3, None, True)
    for layer in (model[0], model[2]):
        w = layer.weight.detach()
        qw = q(w)
        # elementwise: autograd forms 2 q g - 2 w g (g = 0.7 / numel), a few roundings each
        bound = 8 * unit_roundoff() * 0.7 * 2 * (qw.abs() + w.abs()) / w.numel()
        assert_within(layer.weight.grad, 0.7 * 2 * (qw - w) / w.numel(), bound)
        assert layer.bias.grad is None
    assert model[1].weight.grad is None  # norm layers excluded


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
@pytest.mark.learned
def test_regulariser_moves_weights_towards_thresholds(tmp_path):
    """The share of weights near a threshold: 21.6-21.7 % with the regulariser against
    13.7-15.0 % without, on every CPU path (bench/margins.md)."""
    near = {}
    for lam in (0, 1):
        final = run_config(
            [
                "method=osc_reg",
                "bits=2",
                f"policy.osc_reg.lam={lam}",
                "trainer.epochs=10",
                "logger=none",
                "device=cpu",
            ],
            tmp_path / str(lam),
        )
        near[lam] = final["threshold_distance"]["near_share"]
        assert {"acc@2bit", "acc@3bit", "acc@4bit", "acc@8bit"} <= set(final)
    above("share near a threshold: regularised, against not", near[1], near[0])
