"""The loop's parts: optimizer groups, schedule, BN re-estimation, state round-trip."""

import copy

import pytest
import torch

from oscbench.data.base import build_data
from oscbench.launch.config import validate
from oscbench.models.base import build_model
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import calibrate, quantize_model, quantizer_factory
from oscbench.training.evaluation import reestimate_bn
from oscbench.training.loop import Trainer
from oscbench.training.optim import build_optimizers, lr_factor
from tests.bounds import assert_within, sum_difference_bound, unit_roundoff
from tests.conftest import compose_config

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths


def _setup(overrides):
    spec = validate(compose_config(["device=cpu", "logger=none", *overrides]))
    torch.manual_seed(spec.seed)
    data = build_data(spec.dataset, seed=spec.seed, device=torch.device("cpu"))
    model = build_model(spec.model, data.num_classes, data.in_channels, data.image_size)
    plan = spec.plan
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
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (1293, 144, 360)
    assert a.x_train.shape[1:] == (1, 8, 8)
    for split in ("x_train", "x_val", "x_test"):  # the splits do not depend on the run's seed
        assert torch.equal(getattr(a, split), getattr(b, split))
    train_and_val = torch.cat([a.x_train, a.x_val])
    assert abs(train_and_val.mean().item()) < 1e-5 and abs(train_and_val.std().item() - 1) < 1e-4
    images = {tuple(x.flatten().tolist()) for x in a.x_val}
    assert not images & {tuple(x.flatten().tolist()) for x in a.x_train}  # held out
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 test images / 10 classes
    counts = torch.bincount(a.y_val, minlength=10)
    assert counts.min() >= 14 and counts.max() <= 15  # stratified: 144 held out / 10 classes


def test_optimizer_groups_are_named_and_quantizer_steps_have_no_weight_decay():
    spec, _, model, _ = _setup(["trainer.quant_lr=0.003"])
    opt = build_optimizers(model, spec.trainer, 100)
    other, latent, q_group = opt.param_groups
    assert [g["name"] for g in opt.param_groups] == ["other", "latent", "quantizer"]
    assert q_group["initial_lr"] == 0.003 and q_group["weight_decay"] == 0.0  # before warm-up
    assert other["weight_decay"] == latent["weight_decay"] == spec.trainer.weight_decay
    assert len(q_group["params"]) == 8  # 4 layers x (weight step + input step)
    quantized = [m.weight for m in model.modules() if hasattr(m, "weight_quantizer")]
    assert [id(p) for p in latent["params"]] == [id(p) for p in quantized]
    every = {id(p) for g in opt.param_groups for p in g["params"]}
    assert every == {id(p) for p in model.parameters()}  # each parameter in one group
    assert sum(len(g["params"]) for g in opt.param_groups) == len(every)


@pytest.mark.parametrize("rule", ["biases", "1d"])
def test_no_weight_decay_spares_the_biases_or_every_1d_parameter(rule):
    """biases: PARQ's split_param_groups (norms' weights decay); 1d: timm's rule."""
    spec, _, model, _ = _setup([f"trainer.no_weight_decay={rule}"])
    groups = {g["name"]: g for g in build_optimizers(model, spec.trainer, 100).param_groups}
    assert groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    spared = sorted(names[id(p)] for p in groups["no_decay"]["params"])
    decayed = sorted(names[id(p)] for p in groups.get("other", {"params": []})["params"])
    biases = sorted(n for n in names.values() if n.endswith(".bias"))
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and biases  # cnn_small: conv-BN blocks and a linear head
    if rule == "biases":
        assert list(groups) == ["other", "no_decay", "latent", "quantizer"]
        assert spared == biases
        assert decayed == sorted(f"{n}.weight" for n in norms)
    else:
        assert spared == sorted(biases + [f"{n}.weight" for n in norms])
        assert list(groups) == ["no_decay", "latent", "quantizer"]  # an empty group is left out


def test_no_weight_decay_1d_also_spares_the_models_own_names():
    """timm's DeiT names pos_embed, cls_token and dist_token in no_weight_decay()."""
    spec, _, model, _ = _setup(
        ["model=deit_tiny", "model.img_size=8", "model.patch_size=2", "trainer.no_weight_decay=1d"]
    )
    groups = {g["name"]: g for g in build_optimizers(model, spec.trainer, 100).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"pos_embed", "cls_token"} <= spared
    one_d = {n for n, p in model.named_parameters() if p.ndim <= 1 and "quantizer" not in n}
    assert one_d <= spared


def test_input_quantizers_take_their_own_rate_with_act_quant_lr():
    spec, _, model, _ = _setup(["trainer.quant_lr=0.003", "trainer.act_quant_lr=0.3"])
    groups = {g["name"]: g for g in build_optimizers(model, spec.trainer, 100).param_groups}
    assert list(groups) == ["other", "latent", "quantizer", "act_quantizer"]
    layers = [m for m in model.modules() if hasattr(m, "weight_quantizer")]
    assert [id(p) for p in groups["quantizer"]["params"]] == [
        id(m.weight_quantizer.s) for m in layers
    ]
    assert [id(p) for p in groups["act_quantizer"]["params"]] == [
        id(m.input_quantizer.s) for m in layers
    ]
    assert (
        groups["act_quantizer"]["initial_lr"] == 0.3 and groups["quantizer"]["initial_lr"] == 0.003
    )


def test_cosine_schedule_with_warmup():
    lrs = [lr_factor("cosine", 100, 10)(t) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-6) and lrs[-1] < 1e-3


def test_linear_schedule_decays_to_zero_after_the_warmup():
    lrs = [lr_factor("linear", 100, 10)(t) for t in range(101)]
    assert lrs[9] == 1.0 and lrs[10] == 1.0 and lrs[55] == 0.5 and lrs[100] == 0.0
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_multistep_schedule_is_torchs_multisteplr():
    """PARQ's ResNet-20 recipe (facebookresearch/parq, examples/qat_resnet_cifar10.py):
    MultiStepLR at epochs 80, 120 and 150 of 200, gamma 0.1, stepped once an epoch; here the
    milestones are shares of the steps (200 steps: one an epoch). With k milestones passed,
    oscbench raises gamma to k (C's pow: within 2 u of gamma^k, u double's unit roundoff;
    LambdaLR's factors are Python floats), torch multiplies by gamma at each (k - 1
    roundings): within (k + 1) u of each other, asserted within twice that."""
    ours = lr_factor("multistep", 200, 0, [0.4, 0.6, 0.75], 0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = torch.optim.lr_scheduler.MultiStepLR(opt, [80, 120, 150], gamma=0.1)
    for epoch in range(200):
        passed = sum(epoch >= m for m in (80, 120, 150))
        lr = opt.param_groups[0]["lr"]
        assert ours(epoch) == 0.1**passed
        assert abs(ours(epoch) - lr) <= 2 * (passed + 1) * 2.0**-53 * lr
        opt.step()
        theirs.step()
    warm = [lr_factor("multistep", 100, 10, [0.5], 0.5)(t) for t in range(100)]
    assert warm[0] == 0.1 and warm[9:50] == [1.0] * 41 and warm[50:] == [0.5] * 50


def test_a_multistep_run_steps_its_rate_at_the_milestones():
    """trainer.schedule=multistep in a run: each epoch's last rate (`lr_last`) is lr times
    gamma to the milestones passed (a quarter and a half of 4 epochs: at epochs 2 and 3);
    the milestones and gamma are part of the run's identity where they are not the
    defaults, which leave earlier runs' identities as they were."""
    from oscbench.launch.config import resolved
    from oscbench.records.runs import fingerprint
    from tests.conftest import build_config, fit

    args = ["trainer.schedule=multistep", "trainer.warmup_fraction=0", "trainer.epochs=4"]
    custom = [*args, "trainer.milestones=[0.25,0.5]", "trainer.gamma=0.5"]
    spec, built = build_config(custom)
    lr = spec.trainer.lr
    assert [h["lr_last"] for h in fit(spec, built)] == [lr, lr / 2, lr / 4, lr / 4]
    assert {"trainer.milestones", "trainer.gamma"} <= set(
        fingerprint(resolved(compose_config(custom)))
    )
    assert not {"trainer.milestones", "trainer.gamma"} & set(
        fingerprint(resolved(compose_config(args)))
    )


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_quantizer_steps_get_an_optimizer_of_their_own(kind):
    """Nagel et al.'s --sep-quant-optimizer: the steps in their own optimizer at quant_lr,
    with a constant learning rate (quant_schedule=constant) or the main schedule."""
    overrides = [f"trainer.quant_optimizer={kind}", "trainer.quant_lr=1e-5"]
    spec, _, model, _ = _setup([*overrides, "trainer.quant_schedule=constant"])
    opt = build_optimizers(model, spec.trainer, 100)
    main, quant = opt.optimizers
    assert isinstance(main, torch.optim.SGD)
    assert isinstance(quant, torch.optim.Adam if kind == "adam" else torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["other", "latent", "quantizer"]
    for _ in range(50):
        opt.step()  # no gradients: nothing moves
        opt.schedule_step()
    assert quant.param_groups[0]["lr"] == 1e-5  # quant_schedule=constant
    assert main.param_groups[0]["lr"] < spec.trainer.lr
    spec, _, model, _ = _setup([*overrides, "trainer.quant_schedule=main"])
    opt = build_optimizers(model, spec.trainer, 100)
    for _ in range(50):
        opt.step()
        opt.schedule_step()
    ratio = opt.optimizers[1].param_groups[0]["lr"] / 1e-5
    assert ratio == pytest.approx(opt.optimizers[0].param_groups[0]["lr"] / spec.trainer.lr)
    saved = opt.state_dict()
    again = build_optimizers(model, spec.trainer, 100)
    again.load_state_dict(saved)
    assert again.optimizers[1].param_groups[0]["lr"] == opt.optimizers[1].param_groups[0]["lr"]


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
    Trainer(model, data, spec.trainer, [], tracker).fit(on_epoch=lambda r: None)
    state = copy.deepcopy(model.state_dict())
    tracked = copy.deepcopy(tracker.state_dict())
    assert {k.rsplit(".", 1)[-1] for k in tracked} == {
        "code",
        "direction",
        "freq",
        "count",
        "switches",
        "epoch_switches",
        "epoch_oscillations",
        "previous",
        "epoch_dq",
        "epoch_dw",
    }
    assert tracked["count"].numel() == tracker.total  # one flat buffer for every layer
    assert tracked["count"].sum() > 0  # it has seen oscillations
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


def test_loop_hooks_run_in_order_and_policies_wrap_the_optimizer_step():
    """on_step_start -> after_backward -> optimizer_step wrappers (the first policy
    outermost) -> on_step_end -> the weight quantizers' after_step -> tracker update."""
    from oscbench.oscillation.policy import Policy
    from oscbench.quant.modules import quantized_layers
    from oscbench.training.loop import train_step

    spec, data, model, tracker = _setup([])
    events = []

    class Recorder(Policy):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def on_step_start(self, step, total):
            events.append(f"{self.name}.start")

        def after_backward(self, model):
            events.append(f"{self.name}.after_backward")

        def optimizer_step(self, opt, step):
            events.append(f"{self.name}.wrap(")
            step()
            events.append(f"{self.name}.)")

        def on_step_end(self, model):
            events.append(f"{self.name}.end")

    opt = build_optimizers(model, spec.trainer, 10)
    opt.optimizers[0].register_step_post_hook(lambda *args: events.append("opt.step"))
    layer = next(m for _, m in quantized_layers(model))
    layer.weight_quantizer.after_step = lambda w: events.append("after_step")
    real_update = tracker.update
    tracker.update = lambda: (events.append("tracker"), real_update())
    x, y = next(data.train_batches(0, 32))
    from oscbench.training.accel import Accel

    accel = Accel.resolve(spec.trainer, torch.device("cpu"))
    train_step(model, model, x, y, opt, [Recorder("a"), Recorder("b")], tracker, accel, 0, 10)
    assert events == [
        "a.start",
        "b.start",
        "a.after_backward",
        "b.after_backward",
        "a.wrap(",
        "b.wrap(",
        "opt.step",
        "b.)",
        "a.)",
        "a.end",
        "b.end",
        "after_step",
        "tracker",
    ]


def test_a_probe_runs_plain_steps_on_its_own_batches_and_leaves_no_trace():
    """Policy.on_epoch_start's probe: n steps with that policy alone, then the model, the
    optimizer, the policy's state and the random state are as before."""
    from oscbench.oscillation.policy import Policy

    spec, data, model, tracker = _setup(["trainer.epochs=2", "trainer.optimizer=adamw"])
    seen = {}

    class Prober(Policy):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
            self.measured = []

        def on_epoch_start(self, epoch, probe):
            before = copy.deepcopy(model.state_dict())
            rng = torch.get_rng_state()
            steps = []
            for i in probe(3, self):
                steps.append(i)
                w = model[0].weight.detach().clone()
                self.measured.append(w)
            seen[epoch] = {
                "steps": steps,
                "moved": not torch.equal(self.measured[-1], before["0.weight"]),
                "restored": all(
                    torch.equal(before[k], v)
                    for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor)
                ),
                "rng": torch.equal(torch.get_rng_state(), rng),
                "calls": int(self.calls),
            }

        def optimizer_step(self, opt, step):
            self.calls += 1
            step()

    prober = Prober()
    calls_after = []
    Trainer(model, data, spec.trainer, [prober], tracker).fit(
        on_epoch=lambda record: calls_after.append(int(prober.calls))
    )
    per_epoch = data.steps_per_epoch(spec.trainer.batch_size)
    for epoch in (0, 1):
        assert seen[epoch]["steps"] == [0, 1, 2]
        assert seen[epoch]["moved"] and seen[epoch]["restored"] and seen[epoch]["rng"]
        assert seen[epoch]["calls"] == epoch * per_epoch  # the probe's 3 calls were undone
    assert calls_after == [per_epoch, 2 * per_epoch]
    # the same run without the probes ends with the same weights and optimizer state
    spec, data, plain, tracker = _setup(["trainer.epochs=2", "trainer.optimizer=adamw"])
    Trainer(plain, data, spec.trainer, [], tracker).fit(on_epoch=lambda record: None)
    for key, value in plain.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, model.state_dict()[key]), key
    # the probe's steps and the epoch's: different batches, the same on every run
    first = next(data.train_batches(0, spec.trainer.batch_size))[0]
    from oscbench.training.loop import PROBE_STREAM

    probe_first = next(data.train_batches(PROBE_STREAM, spec.trainer.batch_size))[0]
    assert not torch.equal(first, probe_first)
