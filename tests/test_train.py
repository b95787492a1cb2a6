"""The loop's parts: optimizer groups, schedule, BN re-estimation, state round-trip."""

import copy

import pytest
import torch
from torch import nn

from oscbench.config import validate
from oscbench.data.base import build_data
from oscbench.evaluation import reestimate_bn
from oscbench.models.base import build_model
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import QuantPlan, calibrate, quantize_model, quantizer_factory
from oscbench.train import build_optimizer, cosine_with_warmup, train
from tests.bounds import assert_within, sum_difference_bound, unit_roundoff
from tests.conftest import compose_config

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths


def _setup(overrides):
    spec = validate(compose_config(["device=cpu", "logger=none", *overrides]))
    torch.manual_seed(spec.seed)
    data = build_data(spec.dataset, seed=spec.seed, device=torch.device("cpu"))
    model = build_model(spec.model, data.num_classes, data.in_channels, data.image_size)
    plan = QuantPlan(spec.bits, spec.act_bits, spec.first_last_bits)
    quantize_model(
        model, quantizer_factory(spec.quantizer), quantizer_factory(spec.act_quantizer), plan
    )
    calibrate(model, data.x_train[:64])
    tracker = OscillationTracker(model, spec.oscillation, total_steps=100)
    return spec, data, model, tracker


def test_digits_split_is_stratified_normalised_and_fixed():
    spec = validate(compose_config([]))
    a = build_data(spec.dataset, seed=0, device=torch.device("cpu"))
    b = build_data(spec.dataset, seed=5, device=torch.device("cpu"))
    assert len(a.x_train) + len(a.x_test) == 1797 and a.x_train.shape[1:] == (1, 8, 8)
    assert torch.equal(a.x_test, b.x_test)  # the split does not depend on the run's seed
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-4
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 test images / 10 classes


def test_quantizer_parameters_have_their_own_group_without_weight_decay():
    spec, _, model, _ = _setup(["trainer.quant_lr=0.003"])
    opt = build_optimizer(model, spec.trainer)
    model_group, q_group = opt.param_groups
    assert q_group["lr"] == 0.003 and q_group["weight_decay"] == 0.0
    assert model_group["weight_decay"] == spec.trainer.weight_decay
    assert len(q_group["params"]) == 8  # 4 layers x (weight step + input step)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total=100, warmup=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-6) and lrs[-1] < 1e-3


def test_bn_reestimation_is_a_plain_average_of_batch_statistics():
    spec, data, model, _ = _setup([])
    bn = model[1]
    bn.running_mean.fill_(5.0)
    reestimate_bn(model, data, batches=3, batch_size=64)
    feats = []
    hook = model[0].register_forward_hook(lambda m, i, o: feats.append(o.transpose(0, 1)))
    batches = data.train_batches(epoch=-1, batch_size=64)
    with torch.no_grad():
        for _ in range(3):
            model.eval()
            model(next(batches)[0])
    hook.remove()
    per_channel = [o.flatten(1) for o in feats]  # (channels, batch x height x width)
    means = torch.stack([o.mean(1) for o in per_channel])
    # each batch mean is a sum over n values that BN adds up in its own order; then BN's
    # cumulative average (a few roundings per batch) against the plain mean of three
    n = per_channel[0].shape[1]
    bound = sum(sum_difference_bound(o.abs(), dim=1) / n for o in per_channel) / len(feats)
    bound = bound + 12 * unit_roundoff() * means.abs().amax(0)
    assert_within(bn.running_mean, means.mean(0), bound)
    assert bn.momentum == 0.1  # restored


def test_model_and_tracker_state_roundtrip_restores_them_exactly():
    spec, data, model, tracker = _setup(["bits=2", "trainer.epochs=2"])
    train(model, data, spec.trainer, [], tracker, 0.005, on_epoch=lambda r: None)
    state = copy.deepcopy(model.state_dict())
    tracked = copy.deepcopy(tracker.state_dict())
    assert {k.rsplit(".", 1)[1] for k in tracked} == {
        "code",
        "direction",
        "freq",
        "count",
        "epoch_switches",
        "epoch_oscillations",
    }
    assert tracked["states.0.count"].sum() > 0  # it has seen oscillations
    assert not any("tracker" in k for k in state)  # the tracker is not the model's

    _, _, fresh, fresh_tracker = _setup(["bits=2", "seed=7"])  # another init, overwritten
    fresh.load_state_dict(state)
    fresh_tracker.load_state_dict(tracked)
    for key, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    for key, value in fresh_tracker.state_dict().items():
        assert torch.equal(value, tracked[key]), key
    assert fresh[3].weight_quantizer.g == model[3].weight_quantizer.g
    assert fresh[3].input_quantizer.signed == model[3].input_quantizer.signed
    x = data.x_test[:32]
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
