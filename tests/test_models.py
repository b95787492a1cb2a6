"""Each model builds, quantizes (depthwise convs and attention projections included) and
trains a step on synthetic data of its usual input shape."""

import math

import pytest
import torch
from torch import nn

from oscbench.quant.modules import QConv2d, QLinear, quantized_layers
from oscbench.registry import ConfigError
from tests.conftest import build_config, fit

CASES = {
    "resnet20": (["model=resnet20"], 32),
    "resnet18": (["model=resnet18"], 224),
    "resnet18_cifar": (["model=resnet18", "model.stem=cifar"], 32),
    "mobilenetv2": (["model=mobilenetv2"], 224),
    "mobilenetv2_cifar": (["model=mobilenetv2", "model.stem=cifar"], 32),
    "deit_tiny": (["model=deit_tiny", "model.img_size=224", "model.patch_size=16"], 224),
    "deit_tiny_cifar": (["model=deit_tiny"], 32),
    "deit_small_cifar": (["model=deit_small"], 32),
    "deit_tiny_distilled": (["model=deit_tiny", "model.distilled=true"], 32),
    "mobilenetv3_small": (["model=mobilenetv3"], 224),
    "efficientnet_lite0": (["model=efficientnet_lite0"], 224),
    "swin_tiny": (
        ["model=swin_tiny", "model.img_size=224", "model.patch_size=4", "model.window_size=7"],
        224,
    ),
    "vit_tiny": (["model=vit_tiny", "model.img_size=224", "model.patch_size=16"], 224),
    "resnet110": (["model=resnet110"], 32),
    "mobilenetv2_small": (["model=mobilenetv2_small"], 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_quantizes_and_trains_a_step(case):
    overrides, size = CASES[case]
    spec, built = build_config(
        [
            *overrides,
            "bits=4",
            "dataset=synthetic",
            f"dataset.image_size={size}",
            "dataset.train_size=4",
            "dataset.test_size=2",
            "trainer.batch_size=4",
            "trainer.epochs=1",
            "trainer.bn_reestimate_batches=0",
        ]
    )
    model = built.model
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    layers = [m for _, m in quantized_layers(model)]
    assert [m.weight_quantizer.bits for m in (layers[0], layers[-1])] == [8, 8]
    assert all(m.weight_quantizer.bits == 4 for m in layers[1:-1])
    if "mobilenet" in case or "efficientnet" in case:  # depthwise convolutions too
        assert any(isinstance(m, QConv2d) and m.groups == m.in_channels > 1 for m in layers)
    if "deit" in case or "vit" in case:  # attention projections too
        names = [n for n, m in quantized_layers(model) if isinstance(m, QLinear)]
        assert "blocks.0.attn.qkv" in names and "blocks.0.attn.proj" in names
    if "swin" in case:
        names = [n for n, m in quantized_layers(model) if isinstance(m, QLinear)]
        assert "layers.0.blocks.0.attn.qkv" in names
    before = {id(m): m.weight.detach().clone() for m in layers}
    history = fit(spec, built)
    assert math.isfinite(history[0]["train_loss"])
    assert all(not torch.equal(before[id(m)], m.weight) for m in layers)  # every layer learns
    assert history[0]["osc"]["tracked_weights"] == sum(m.weight.numel() for m in layers[1:-1])


def test_resnet20_has_the_he_et_al_shape():
    spec, built = build_config(["model=resnet20", "dataset=synthetic", "act_quantizer=none"])
    convs = [m for m in built.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # 1 + 3 stages x 3 blocks x 2; option A: parameter-free shortcuts
    n_params = sum(p.numel() for n, p in built.model.named_parameters() if "quantizer" not in n)
    assert 0.26e6 < n_params < 0.28e6  # 0.27M, as in He et al. Table 6


def test_the_cifar_resnets_have_he_et_al_depths_and_aoqs_shortcuts():
    for depth in (32, 44, 56, 110):
        _, built = build_config([f"model=resnet{depth}", "dataset=synthetic", "act_quantizer=none"])
        convs = [m for m in built.model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == depth - 1 + 2  # the stem, 2 per block, two 1x1 shortcuts (B)
    with pytest.raises(ConfigError, match="model=resnet32 with model.depth=20"):
        build_config(["model=resnet32", "model.depth=20", "dataset=synthetic"])


def test_qkr_on_swin_is_refused_by_always_and_left_alone_by_auto(capsys):
    swin = ["model=swin_tiny", "dataset=synthetic", "dataset.image_size=32", "bits=4"]
    with pytest.raises(ConfigError, match="window attention"):
        build_config([*swin, "qkr=always"])
    _, built = build_config([*swin, "qkr=auto"])
    assert "its attention stays as it is" in capsys.readouterr().err
    assert not any(type(m).__name__ == "QKRAttention" for m in built.model.modules())


def test_the_small_mobilenetv2_has_its_stages_and_keeps_the_resolution_at_the_stem():
    spec, built = build_config(
        [
            "model=mobilenetv2_small",
            "dataset=glyphs",
            "dataset.train_size=200",
            "dataset.test_size=20",
            "method=fp",
        ]
    )
    model = built.model
    assert model.conv_stem.stride == (1, 1) and model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [m.in_channels for m in depthwise] == [
        16,
        64,
        96,
        96,
        128,
        128,
        192,
    ]  # 16, then in x 4 per block
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 67306
