"""BatchNorm folded into the quantized convolution (bn_fold), against PyTorch's ConvBn2d."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import ConvBn2d
from torch.ao.quantization import QConfig

from oscbench.quant.fold import QConvBn2d, conv_bn_pairs, fold_batchnorm
from oscbench.quant.modules import QConv2d
from tests.bounds import assert_within, gamma
from tests.test_export import quantizer


def pair(bias: bool) -> tuple[QConvBn2d, ConvBn2d]:
    """Ours, and torch.ao's ConvBn2d with the same parameters and statistics and a copy of
    our weight quantizer (LSQ, 3 bits, per channel) as its `weight_fake_quant`."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    wq = quantizer("quantizer", "lsq", 3, 6, per_channel=True)
    ours = QConvBn2d.fold(QConv2d.from_float(copy.deepcopy(conv), wq, None, False), bn)
    reference_q = copy.deepcopy(ours.weight_quantizer)
    qconfig = QConfig(activation=nn.Identity, weight=lambda: reference_q)
    ref = ConvBn2d(4, 6, 3, padding=1, bias=bias, qconfig=qconfig)
    ref.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("weight_quantizer")}
        | {f"weight_fake_quant.{k}": v for k, v in reference_q.state_dict().items()}
    )
    return ours.train(), ref.train()


def grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace("fake_quant", "quantizer"): p.grad for k, p in m.named_parameters()}


def test_folded_conv_is_convbn2d_forward_backward_and_statistics():
    for bias in (False, True):
        ours, ref = pair(bias)
        for frozen in (False, True):
            if frozen:
                ours.freeze_bn_stats(), ref.freeze_bn_stats()
                ours.train(), ref.train()  # frozen stays frozen
            x = torch.randn(8, 4, 5, 5)
            a, b = ours(x), ref(x)
            assert torch.equal(a, b)
            a.square().sum().backward()
            b.square().sum().backward()
            ga, gb = grads(ours), grads(ref)
            assert ga.keys() == gb.keys()
            for k in ga:
                assert torch.equal(ga[k], gb[k]), k
            assert torch.equal(ours.bn.running_mean, ref.bn.running_mean)
            assert torch.equal(ours.bn.running_var, ref.bn.running_var)
            ours.zero_grad(), ref.zero_grad()
        ours.eval(), ref.eval()
        assert torch.equal(ours(x), ref(x))


def test_folded_evaluation_is_the_conv_on_the_folded_weight_plus_the_folded_bias():
    ours, _ = pair(bias=True)
    ours.eval()
    x = torch.randn(8, 4, 5, 5)
    bn, f = ours.bn, ours.scale_factor().detach()
    w = ours.weight_quantizer(ours.quantizer_input()).detach()
    b = (bn.bias + (ours.bias - bn.running_mean) * f).detach()
    plain = nn.functional.conv2d(x, w, b, padding=1)
    # Each is a float32 sum of K = 36 products and a bias (gamma_(K+1) of its absolute
    # terms), ours then divided by f, given its bias, and BN's subtraction, scaling and
    # shift: at most 8 more roundings, each relative to values below those terms' sum.
    terms = nn.functional.conv2d(x.abs().double(), w.abs().double(), padding=1)
    terms = (
        terms
        + (bn.bias.abs() + (ours.bias - bn.running_mean).abs() * f.abs())
        .reshape(1, -1, 1, 1)
        .double()
    )
    assert_within(ours(x).detach(), plain, (2 * gamma(37) + gamma(8)) * terms)


def test_pairs_are_found_by_dataflow_and_folded_where_the_conv_is_quantized():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU: not the conv's output
    )
    x = torch.randn(2, 3, 6, 6)
    assert conv_bn_pairs(model, x) == [("0", "1")]
    layer = QConv2d.from_float(model[0], quantizer("quantizer", "lsq", 4, 4), None, False)
    model[0] = layer
    assert fold_batchnorm(model, [("0", "1")]) == ["0"]
    assert isinstance(model[0], QConvBn2d) and isinstance(model[1], nn.Identity)


def test_a_folded_run_trains_tracks_folded_codes_and_exports_without_batchnorm(tmp_path):
    """cnn_small's three conv-BN pairs fold; the tracker's codes are those of the folded
    weights; the BN statistics freeze from bn_fold.freeze_epoch on; the export has no
    BatchNormalization node and matches the simulated model."""
    import json

    import onnx

    from tests.conftest import build_config, run_config

    over = ["bits=3", "bn_fold.enabled=true", "bn_fold.freeze_epoch=2", "trainer.epochs=3"]
    _, built = build_config(over)
    folded = [m for m in built.model.modules() if isinstance(m, QConvBn2d)]
    assert len(folded) == 3
    bns = [m for m in built.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(m) for m in bns} == {id(layer.bn) for layer in folded}  # each inside its conv
    for layer, view in built.tracker.tracked():
        assert torch.equal(view.code, layer.weight_quantizer.to_int(layer.quantizer_input()))
    quick = ["logger=none", "device=cpu"]
    run_config(["method=fp", "trainer.epochs=3", *quick], tmp_path / "fp")
    run_dir = tmp_path / "folded"
    run_config([*quick, "export=true", f"init_from={tmp_path / 'fp'}", *over], run_dir)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["config"]["bn_fold"] == {"enabled": True, "freeze_epoch": 2}
    graph = onnx.load(run_dir / "model.onnx").graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    block = record["export"]
    assert block["weights"]["codes_equal"]
    assert abs(block["images_vs_record"]["difference"]) <= 2
    assert block["logits"]["images_over_bound"] == 0


def test_bn_statistics_stop_moving_from_the_freeze_epoch():
    from oscbench.training.batchnorm import FreezeBNStats
    from oscbench.training.evaluation import reestimate_bn

    _, built = build_freeze()
    layer = next(m for m in built.model.modules() if isinstance(m, QConvBn2d))
    hook = FreezeBNStats(built.model, 1)
    hook.on_epoch_start(0, None)
    assert not layer.freeze_bn
    hook.on_epoch_start(1, None)
    built.model.train()
    with torch.no_grad():  # statistics of its own, not BatchNorm's reset values
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    before = layer.bn.running_mean.clone()
    built.model(torch.randn(4, *built.data.x_train.shape[1:]))
    assert layer.freeze_bn and not layer.bn.training
    assert torch.equal(layer.bn.running_mean, before)
    var = layer.bn.running_var.clone()
    reestimate_bn(built.model, built.data, 2, 8)  # the final result's BN re-estimation
    assert torch.equal(layer.bn.running_mean, before) and torch.equal(layer.bn.running_var, var)


def build_freeze():  # noqa: ANN201
    from tests.conftest import build_config

    return build_config(["bn_fold.enabled=true"])


def test_policies_that_move_latent_weights_to_codes_are_refused_with_folding():
    import pytest

    from oscbench.registry import ConfigError
    from tests.conftest import build_config

    for method in ("lsq_freeze", "ofq", "lsq_oscireset"):
        with pytest.raises(ConfigError, match="with bn_fold.enabled=true: it"):
            build_config([f"method={method}", "bn_fold.enabled=true"])
    with pytest.raises(ConfigError, match="quantizer=none quantizes none"):
        build_config(["method=fp", "bn_fold.enabled=true"])


def test_folding_off_and_export_leave_a_runs_identity_as_before_they_existed():
    """Records made before bn_fold and export existed are found again (run_key)."""
    from oscbench.launch.compose import compose
    from oscbench.launch.config import resolved
    from oscbench.records.runs import run_key

    config = resolved(compose(["bits=3"]))
    before = {k: v for k, v in config.items() if k not in ("bn_fold", "export")}
    assert run_key(config) == run_key(before) == run_key(config | {"export": True})
    folded = config | {"bn_fold": {"enabled": True, "freeze_epoch": None}}
    assert run_key(folded) != run_key(config)
