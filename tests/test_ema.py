"""The EMA copy of the model (trainer.ema_decay, timm's ModelEmaV3): its weights follow the
formula, it is evaluated with its own quantized weights, and it resumes exactly."""

import pytest
import torch

from oscbench.quant.modules import quantized_layers
from tests.bounds import assert_within, gamma
from tests.conftest import Observer, build_config, fit
from tests.test_resume import kill_and_resume

QUICK = ["logger=none", "device=cpu"]


@pytest.mark.numeric
def test_ema_weights_follow_the_formula_and_buffers_are_the_live_models():
    """e_0 = the model before training, e_t = d e_(t-1) + (1 - d) w_t after each step t
    (timm's lerp e + (1 - d)(w - e): a few roundings of terms at most max(|e|, |w|) per
    step, so n steps stay within n gamma_4 2 max|.|)."""
    d = 0.9
    spec, built = build_config(
        ["method=lsq", "bits=2", "trainer.epochs=1", f"trainer.ema_decay={d}"]
    )
    params = dict(built.model.named_parameters())
    ema = {k: v.detach().double().clone() for k, v in params.items()}
    big = {k: v.detach().double().abs() for k, v in params.items()}

    def fold(model):
        for k, p in model.named_parameters():
            w = p.detach().double()
            ema[k] = d * ema[k] + (1 - d) * w
            big[k] = torch.maximum(big[k], w.abs())

    history = fit(spec, built, [Observer(on_step_end=fold)])
    steps = history[-1]["step"]
    live = dict(built.ema.module.named_parameters())
    for k in ema:
        assert_within(live[k].detach(), ema[k], steps * gamma(4) * 2 * big[k])
    assert any(not torch.equal(live[k], params[k]) for k in live)  # it is an average
    for (name, a), b in zip(built.ema.module.named_buffers(), built.model.buffers(), strict=True):
        assert torch.equal(a, b), name  # ema_buffers=copy: BN statistics, codes, masks
    assert "ema_val_acc" in history[-1]


@pytest.mark.numeric
def test_ema_buffers_average_follows_float_buffers_and_copies_the_rest():
    """`trainer.ema_buffers=average` on a quantized model (whose quantizers keep extra state,
    which timm's own update took for a tensor and crashed on): the BN statistics follow the
    same formula as the weights, integer buffers are the live model's."""
    d = 0.9
    spec, built = build_config(
        [
            "method=lsq",
            "bits=3",
            "trainer.epochs=1",
            f"trainer.ema_decay={d}",
            "trainer.ema_buffers=average",
        ]
    )
    buffers = dict(built.model.named_buffers())
    floats = [k for k, v in buffers.items() if v.is_floating_point()]
    ema = {k: buffers[k].detach().double().clone() for k in floats}
    big = {k: v.abs() for k, v in ema.items()}

    def fold(model):
        for k, b in model.named_buffers():
            if k in ema:
                ema[k] = d * ema[k] + (1 - d) * b.double()
                big[k] = torch.maximum(big[k], b.double().abs())

    history = fit(spec, built, [Observer(on_step_end=fold)])
    copy = dict(built.ema.module.named_buffers())
    assert any("running_mean" in k for k in floats)
    for k in floats:
        assert_within(copy[k], ema[k], history[-1]["step"] * gamma(4) * 2 * big[k])
    assert any(not torch.equal(copy[k], buffers[k]) for k in floats)  # averaged, not copied
    for k, b in buffers.items():
        if not b.is_floating_point():
            assert torch.equal(copy[k], b), k


def test_the_ema_copy_quantizes_its_own_latent_weights():
    spec, built = build_config(
        ["method=lsq", "bits=2", "trainer.epochs=2", "trainer.ema_decay=0.95"]
    )
    fit(spec, built)
    (_, layer), (_, ema_layer) = [
        next(pair for pair in quantized_layers(m) if not pair[1].is_first_or_last)
        for m in (built.model, built.ema.module)
    ]
    q = ema_layer.weight_quantizer
    own = q(ema_layer.weight.detach())
    assert not torch.equal(ema_layer.weight, layer.weight)
    assert torch.equal(own, q.s.detach() * q.to_int(ema_layer.weight.detach()))
    assert not torch.equal(own, layer.weight_quantizer(layer.weight.detach()))


def test_ema_distillation_and_an_own_quantizer_optimizer_resume_exactly(tmp_path, monkeypatch):
    from tests.conftest import run_config

    run_config(["method=fp", "trainer.epochs=2", *QUICK], tmp_path / "fp")
    args = [
        "method=lsq_freeze",
        "bits=2",
        "trainer.epochs=2",
        "trainer.ema_decay=0.9",
        "trainer.label_smoothing=0.1",
        "trainer.optimizer=adam",
        "trainer.schedule=linear",
        "trainer.quant_optimizer=adam",
        "trainer.quant_lr=1e-4",
        "trainer.quant_schedule=constant",
        f"teacher={tmp_path / 'fp'}",
        "distill.loss=soft+hard",
        *QUICK,
    ]
    kill_and_resume(args, tmp_path, monkeypatch)
