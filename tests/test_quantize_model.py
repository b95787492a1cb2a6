"""quantize_model swaps every Conv2d/Linear, shares parameters, keeps the ends at 8 bits."""

import torch
from torch import nn

from oscbench.launch.config import validate
from oscbench.models.base import build_model
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.modules import (
    QConv2d,
    QLinear,
    calibrate,
    quantize_model,
    quantized_layers,
    quantizer_factory,
)
from tests.conftest import compose_config


def _quantized(overrides=()):
    spec = validate(compose_config(["device=cpu", *overrides]))
    torch.manual_seed(0)
    model = build_model(spec.model, num_classes=10, in_channels=1, image_size=8)
    fp_params = {n: p for n, p in model.named_parameters()}
    quantize_model(
        model, quantizer_factory(spec.quantizer), quantizer_factory(spec.act_quantizer), spec.plan
    )
    return spec, model, fp_params


def test_every_layer_is_swapped_and_parameters_are_shared():
    _, model, fp_params = _quantized(["bits=2"])
    layers = dict(quantized_layers(model))
    assert len(layers) == 4
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, QConv2d) for m in model.modules()) == 3
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 1
    for name, p in model.named_parameters():
        if name in fp_params:
            assert p is fp_params[name]
    bits = [(m.weight_quantizer.bits, m.input_quantizer.bits) for m in layers.values()]
    assert bits == [(8, 8), (2, 2), (2, 2), (8, 8)]


def test_calibration_sets_input_signs_and_keeps_bn_statistics():
    _, model, _ = _quantized(["bits=4"])
    bn = model[1]
    before = bn.running_mean.clone()
    calibrate(model, torch.randn(32, 1, 8, 8))
    assert torch.equal(bn.running_mean, before)
    first, *_, last = [m for _, m in quantized_layers(model)]
    assert first.input_quantizer.signed  # normalised images have negatives
    assert not last.input_quantizer.signed  # pooled ReLU outputs do not
    assert all(m.input_quantizer.ready for _, m in quantized_layers(model))


def test_trackers_skip_the_8bit_ends_and_observe_weight_changes():
    spec, model, _ = _quantized(["bits=2"])
    calibrate(model, torch.randn(16, 1, 8, 8))
    tracker = OscillationTracker(model, spec.oscillation, total_steps=100)
    assert tracker.names == ["3", "7"]
    layer = model[3]
    step = layer.weight_quantizer.s.detach()
    with torch.no_grad():
        layer.weight.add_(step)  # every weight moves up one level (unless clipped)
    model.train()
    tracker.update()
    stats = tracker.stats(threshold=0.0)
    assert stats["layers"]["3"]["crossings"] > 0.5 * layer.weight.numel()
    assert set(stats["layers"]) == {"3", "7"}  # first (0) and last (12) layers are 8-bit
    assert stats["layers"]["7"]["crossings"] == 0  # untouched layer
    with torch.no_grad():
        layer.weight.sub_(step)
    model.eval()
    tracker.update()  # eval mode: no update
    assert tracker.stats(threshold=0.0)["crossings"] == 0


def test_the_first_and_last_layer_at_8_bits_in_full_precision_or_like_the_rest():
    _, model, _ = _quantized(["bits=2"])  # first_last=bits, first_last_bits=8
    layers = list(quantized_layers(model))
    ends = [m for _, m in layers if m.is_first_or_last]
    assert [m.weight_quantizer.bits for m in ends] == [8, 8] and len(layers) == 4
    assert [m.input_quantizer.bits for m in ends] == [8, 8]
    _, model, _ = _quantized(["bits=2", "first_last=fp"])  # AOQ: the ends stay as they are
    layers = list(quantized_layers(model))
    assert len(layers) == 2 and not any(m.is_first_or_last for _, m in layers)
    assert type(model[0]) is nn.Conv2d and type(model[-1]) is nn.Linear
    _, model, _ = _quantized(["bits=2", "first_last=same"])
    layers = list(quantized_layers(model))
    assert len(layers) == 4 and not any(m.is_first_or_last for _, m in layers)
    assert {m.weight_quantizer.bits for _, m in layers} == {2}


def test_a_swapped_in_module_goes_to_the_device_of_the_module_it_replaces():
    """A quantized layer's new quantizers must live where its weights are (on CUDA, a CPU
    step size would be a host tensor in every step; the meta device stands in for it)."""
    from oscbench.quant.modules import swap_module

    model = nn.Sequential(nn.Linear(2, 2, device="meta"))
    swap_module(model, "0", nn.Linear(2, 2))
    assert model[0].weight.device.type == "meta"
