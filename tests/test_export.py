"""Export to an integer model (ONNX QDQ) and its parity in onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from oscbench.deploy.onnx import Deployed, deployed, logits_only, to_onnx
from oscbench.deploy.parity import parity, weight_codes_equal
from oscbench.launch.compose import CONF_DIR
from oscbench.quant.base import EXTRA_BIT, LOOKUP, QUANTIZERS, UNIFORM, NotDeployable, Quantizer
from oscbench.quant.modules import QConv2d, QLinear, calibrate, quantized_layers
from tests.conftest import run_config


def quantizer(group: str, name: str, bits: int, channels: int | None, **options) -> Quantizer:
    """Quantizer `name` of `group` (quantizer, act_quantizer) with its conf/ defaults."""
    node = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / group / f"{name}.yaml"), options)
    return QUANTIZERS.get(name).build(
        QUANTIZERS.parse(node, group), bits, channels, group == "quantizer"
    )


# (weight quantizer, options, input quantizer, options): every weight quantizer that exports
# (UNIFORM or EXTRA_BIT), per tensor and per channel, with LSQ's and LSQ+'s inputs
LAYERS = [
    ("lsq", {}, "lsq", {}),
    ("lsq", {"per_channel": True}, "lsq", {"per_channel": True}),
    ("rtn", {}, "lsq_plus", {}),
    ("rtn", {"per_channel": True}, "lsq", {}),
    ("aoq", {}, "lsq", {"per_channel": True}),
    ("qema", {"per_channel": True, "warmup": 0}, "lsq_plus", {}),
    ("statsq", {}, "lsq", {}),
    ("stableqat", {}, "lsq", {}),
]
WIDTH, CLASSES = 6, 5


def mixed_model(bits: int) -> nn.Module:
    """One conv per row of LAYERS, each followed by BN (and every other by a ReLU, so that
    inputs are unsigned and signed), then pooling and a quantized classifier; calibrated."""
    torch.manual_seed(bits)
    layers: list[nn.Module] = []
    for i, (wname, wopts, aname, aopts) in enumerate(LAYERS):
        conv = nn.Conv2d(3 if i == 0 else WIDTH, WIDTH, 3, padding=1)
        wq = quantizer("quantizer", wname, bits, WIDTH, **wopts)
        aq = quantizer("act_quantizer", aname, bits, None, **aopts)
        layer = QConv2d.from_float(conv, wq, aq, False)
        if wname == "qema":  # an EMA away from the weight, so that it decides some codes
            wq.ema = conv.weight.detach() + 0.5 * wq.s.detach().view(-1, 1, 1, 1) * torch.randn(
                conv.weight.shape
            )
        layers += [layer, nn.BatchNorm2d(WIDTH)] + ([nn.ReLU()] if i % 2 else [])
    linear = nn.Linear(WIDTH, CLASSES)
    head = QLinear.from_float(
        linear,
        quantizer("quantizer", "lsq", bits, CLASSES, per_channel=True),
        quantizer("act_quantizer", "lsq", bits, None),
        False,
    )
    model = nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = 2 * torch.randn(64, 3, 8, 8)
    model.train()
    model(x)  # BN statistics of its own, not the identity
    calibrate(model, x)
    return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_export_has_integer_weights_and_onnxruntime_matches_the_simulated_model(bits):
    model = mixed_model(bits)
    probe = to_onnx(deployed(model), torch.randn(2, 3, 8, 8))
    graph = onnx.load_from_string(logits_only(probe)).graph
    # the file's weight codes and scales are the quantizers' (their product is the
    # fake-quantized weight bit for bit: Deployed checks it)
    assert weight_codes_equal(model, logits_only(probe)) == (len(LAYERS) + 1, True)
    types = {i.name: i.data_type for i in graph.initializer if i.name.endswith("weight_codes")}
    wide = {onnx.TensorProto.INT16} if bits == 8 else set()
    assert set(types.values()) == {onnx.TensorProto.INT8} | wide
    float_weights = {f"model.{name}.weight" for name, _ in quantized_layers(model)}
    assert not float_weights & {i.name for i in graph.initializer}
    # an input range narrower than its integer type's is clipped explicitly
    clipped = {n.input[0] for n in graph.node if n.op_type == "Clip"}
    quantized = [n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == len(LAYERS) + 1
    assert all(q in clipped for q in quantized) if bits < 8 else len(clipped) == 2  # per channel
    x = 2 * torch.randn(256, 3, 8, 8)  # well beyond the calibration range: many clip
    got = parity(model, probe, [(x, torch.randint(CLASSES, (256,)))])
    codes = got["input_codes"]
    assert codes["max_difference"] <= 1
    assert codes["differ"] <= 1e-3 * codes["compared"]
    assert got["logits"]["images_over_bound"] == 0
    assert got["logits"]["max_share_of_bound"] <= 1


def test_mid_rise_grids_export_at_one_more_bit():
    """AOQ's and StatsQ's levels (k + 1/2) s are the odd codes 2k + 1 at b + 1 bits."""
    twin = deployed(mixed_model(2))
    layers = [m for m in twin.modules() if isinstance(m, Deployed)]
    for (wname, *_), layer in zip(LAYERS, layers, strict=False):
        form, codes = layer.form, layer.weight_codes.long()
        if wname in ("aoq", "statsq"):
            assert (form.qmin, form.qmax, form.bits) == (-3, 3, 3)
            assert bool((codes % 2 != 0).all())
        elif wname == "rtn":  # symmetric: ternary at 2 bits
            assert (form.qmin, form.qmax, form.bits) == (-1, 1, 2)
        else:
            assert (form.qmin, form.qmax, form.bits) == (-2, 1, 2)


def test_every_quantizer_declares_how_its_levels_map_to_integers():
    declared = {e.name: e.build.deploy for e in QUANTIZERS.entries() if e.build is not None}
    assert declared == {
        "aoq": EXTRA_BIT,
        "lsq": UNIFORM,
        "lsq_plus": UNIFORM,
        "ltq": LOOKUP,
        "parq": EXTRA_BIT,  # with its default int_shift 0.5 (deploy_for: 1 is UNIFORM)
        "qema": UNIFORM,
        "rtn": UNIFORM,
        "stableqat": UNIFORM,
        "statsq": EXTRA_BIT,
    }


def test_learned_thresholds_are_refused_with_the_reason():
    conv = nn.Conv2d(3, 4, 3)
    layer = QConv2d.from_float(
        conv,
        quantizer("quantizer", "lsq", 4, 4),
        quantizer("act_quantizer", "ltq", 4, None),
        False,
    )
    model = nn.Sequential(layer)
    calibrate(model, torch.randn(8, 3, 6, 6))
    with pytest.raises(NotDeployable, match="LTQQuantizer.*lookup"):
        deployed(model)


def test_a_run_with_export_true_records_parity_with_onnxruntime(tmp_path):
    run_config(["logger=none", "device=cpu", "trainer.epochs=3", "export=true"], tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    block = record["export"]
    assert (tmp_path / "model.onnx").exists()
    assert block["weights"]["codes_equal"]
    assert abs(block["images_vs_record"]["difference"]) <= 2
    assert block["logits"]["images_over_bound"] == 0
    assert block["input_codes"]["max_difference"] <= 1


def test_export_refuses_a_full_precision_run_and_learned_thresholds(tmp_path):
    cmd = [sys.executable, "-m", "oscbench.export"]
    for overrides, reason in (
        (["method=fp"], "full-precision run has no integer model"),
        (["method=ptq"], "PTQ run trains in full precision"),
        (["act_quantizer=ltq"], "LTQQuantizer"),
    ):
        run_dir = tmp_path / overrides[0].replace("=", "-")
        run_config(["logger=none", "device=cpu", "trainer.epochs=1", *overrides], run_dir)
        out = subprocess.run([*cmd, str(run_dir)], capture_output=True, text=True)
        assert out.returncode == 2
        assert reason in out.stdout
        assert reason in json.loads((run_dir / "results.json").read_text())["export"]["refused"]
        assert not (run_dir / "model.onnx").exists()
    missing = subprocess.run([*cmd, str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "no results.json" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_record_from_before_export_and_bn_fold_existed_exports(tmp_path):
    from oscbench.launch.export import export_run

    run_config(["logger=none", "device=cpu", "trainer.epochs=1"], tmp_path)
    path = tmp_path / "results.json"
    record = json.loads(path.read_text())
    for key in ("export", "bn_fold"):
        del record["config"][key]
    path.write_text(json.dumps(record))
    assert export_run(tmp_path)["weights"]["codes_equal"]
