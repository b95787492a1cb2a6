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

from oscbench.deploy.onnx import Deployed, MultiThreshold, deployed, logits_only, to_onnx
from oscbench.deploy.parity import parity, weight_codes_equal
from oscbench.launch.compose import CONF_DIR
from oscbench.quant.base import EXTRA_BIT, LOOKUP, QUANTIZERS, UNIFORM, Quantizer
from oscbench.quant.modules import QConv2d, QLinear, calibrate, quantized_layers
from tests.bounds import assert_within, gamma
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


def lookup_model(bits: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """LOOKUP quantizers: LTQ inputs (random intervals) and PARQ's LSBQ levels, per tensor
    and per channel, on convs with BN and ReLU, and a classifier on centred uniform levels
    per channel; each weight replaced by its rounding as a level-setting step at hard
    rounding leaves it (LSBQ's greedy sum). Also the latent weights."""
    torch.manual_seed(bits)
    layers: list[nn.Module] = []
    for i, per_channel in enumerate((False, True)):
        conv = nn.Conv2d(3 if i == 0 else WIDTH, WIDTH, 3, padding=1)
        wq = quantizer("quantizer", "parq", bits, WIDTH, levels="lsbq", per_channel=per_channel)
        aq = quantizer("act_quantizer", "ltq", bits, None)
        layers += [QConv2d.from_float(conv, wq, aq, False), nn.BatchNorm2d(WIDTH), nn.ReLU()]
    head = QLinear.from_float(
        nn.Linear(WIDTH, CLASSES),
        quantizer("quantizer", "parq", bits, CLASSES, center=True, per_channel=True),
        quantizer("act_quantizer", "ltq", bits, None),
        False,
    )
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = 2 * torch.randn(64, 3, 8, 8)
    model.train()
    model(x)
    calibrate(model, x)
    latents = []
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            aq, wq = layer.input_quantizer, layer.weight_quantizer
            aq.a.mul_(0.3 + 1.4 * torch.rand_like(aq.a))  # uneven thresholds
            aq.scale_in.fill_(1.7)
            latents.append(layer.weight.detach().clone())
            wq.set_levels(layer.weight)
            layer.weight.copy_(wq.quantize(layer.weight))
    return model.eval(), latents


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_learned_thresholds_count_like_the_quantizer_ties_included(bits):
    """LTQ's code is #{i : x scale_in > f_i}: the binary search gives bucketize's count, also
    for inputs that lie exactly on a threshold, and where intervals sit at LTQ's smallest."""
    q = quantizer("act_quantizer", "ltq", bits, None)
    q.init_from(torch.zeros(1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(bits)
        q.a.mul_(0.3 + 1.4 * torch.rand(q.a.shape, generator=g))
        q.a[::3] = 0.0  # clamped to eps
    node = MultiThreshold(q.threshold_form())
    edges = q.threshold_form().edges
    x = torch.cat([edges, torch.nextafter(edges, edges + 1), 3 * torch.randn(500)])
    assert torch.equal(node.codes(x).long(), q.to_int(x).long())
    assert torch.equal(node(x), q(x))  # the level: DequantizeLinear at u scale_out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uneven_levels_and_learned_thresholds_export_as_a_table_and_comparisons(bits):
    model, latents = lookup_model(bits)
    twin = deployed(model)
    probe = to_onnx(twin, torch.randn(2, 3, 8, 8))
    onnx_model = logits_only(probe)
    graph = onnx.load_from_string(onnx_model).graph
    # the file holds int8 codes and each layer's table of 2^b levels (one row per output
    # channel, or one), the quantizers' bit for bit; no float weights
    assert weight_codes_equal(model, onnx_model) == (3, True)
    inits = {i.name: i for i in graph.initializer}
    names = [f"model.{name}" for name, _ in quantized_layers(model)]
    for name, rows in zip(names, (None, WIDTH, CLASSES), strict=True):
        assert inits[f"{name}.weight_codes"].data_type == onnx.TensorProto.INT8
        assert list(inits[f"{name}.weight_levels"].dims) == [rows, 2**bits][rows is None :]
        assert f"{name}.weight" not in inits
    ops = [n.op_type for n in graph.node]
    # the tables (GatherElements); the thresholds, b steps of a search a layer (Greater)
    assert ops.count("GatherElements") == 3 and ops.count("Greater") == 3 * bits
    assert "QuantizeLinear" not in ops  # every input's code is a count of thresholds
    # the deployed weight is the level of the weight's code; a greedy sum lies within its
    # error bound of it: each v_i sign(r) is exact, the b residual updates, the final
    # difference and the b-term sums of the table round once each
    deps = [m for m in twin.modules() if isinstance(m, Deployed)]
    for (_, layer), dep, latent in zip(quantized_layers(model), deps, latents, strict=True):
        wq, w = layer.weight_quantizer, layer.weight.detach()
        assert torch.equal(dep.weight(), wq.code_centre(wq.to_int(w), w))
        v_sum = wq.levels(w)[..., -1:].abs()  # the top level: v_1 + ... + v_b
        v_sum = v_sum.view(-1, *[1] * (w.dim() - 1)) if wq.per_channel else v_sum
        bound = gamma(2 * bits + 2) * (bits * latent.abs() + w.abs() + 2 * v_sum)
        assert_within(dep.weight(), w, bound)
        assert dep.off_level == int((dep.weight() != w).sum())
    x = 2 * torch.randn(256, 3, 8, 8)
    got = parity(model, probe, [(x, torch.randint(CLASSES, (256,)))])
    codes = got["input_codes"]
    assert codes["max_difference"] <= 1
    assert codes["differ"] <= 1e-3 * codes["compared"]
    assert got["logits"]["images_over_bound"] == 0
    # a weight an ulp off its level (as some greedy sums are, depending on the CPU path and
    # the width) is counted, and the integer model keeps the level
    name, layer = next(iter(quantized_layers(model)))
    before = Deployed(name, layer)
    flat = layer.weight.detach().view(-1)
    i = int(torch.nonzero(before.weight().view(-1) == flat)[0])
    flat[i] = torch.nextafter(flat[i], flat[i] + 1)
    after = Deployed(name, layer)
    assert torch.equal(after.weight(), before.weight())
    assert after.off_level == before.off_level + 1 and after.max_off_level > 0


def test_a_run_with_export_true_records_parity_with_onnxruntime(tmp_path):
    run_config(["logger=none", "device=cpu", "trainer.epochs=3", "export=true"], tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    block = record["export"]
    assert (tmp_path / "model.onnx").exists()
    assert block["weights"]["codes_equal"]
    assert abs(block["images_vs_record"]["difference"]) <= 2
    assert block["logits"]["images_over_bound"] == 0
    assert block["input_codes"]["max_difference"] <= 1


def test_a_run_with_lookup_quantizers_exports_with_parity(tmp_path):
    """PARQ's LSBQ levels with LTQ inputs, trained to hard rounding, as the integer model."""
    overrides = ["method=parq", "quantizer.levels=lsbq", "act_quantizer=ltq", "export=true"]
    run_config(["logger=none", "device=cpu", "trainer.epochs=2", *overrides], tmp_path)
    block = json.loads((tmp_path / "results.json").read_text())["export"]
    assert "refused" not in block
    assert block["weights"]["codes_equal"]
    assert abs(block["images_vs_record"]["difference"]) <= 2
    assert block["logits"]["images_over_bound"] == 0
    # a code one rounding tie apart early moves later ones by more (LTQ's narrow intervals):
    # 0, 36 and 1 of 1,175,040 codes on the native, avx2 and default paths, in 0-3 images
    codes = block["input_codes"]
    assert codes["differ"] <= 1e-3 * codes["compared"]


def test_a_ptq_run_exports_its_rounded_weights_and_a_full_precision_run_is_refused(
    tmp_path, capsys
):
    """PTQ's result is the model with its weights rounded to `bits` and BN re-estimated:
    the export rebuilds it, with integer weights and inputs in full precision. The command
    runs in this process (an exit is SystemExit), but for a directory without a run."""
    from oscbench.export import main

    for method in ("ptq", "osc_reg", "fp"):
        run_dir = tmp_path / method
        quick = ["logger=none", "device=cpu", "trainer.epochs=1", "cross_bits=[]"]
        run_config([*quick, f"method={method}"], run_dir)
        capsys.readouterr()
        if method == "fp":
            with pytest.raises(SystemExit) as refused:
                main([str(run_dir)])
            reason = "full-precision run has no integer model"
            block = json.loads((run_dir / "results.json").read_text())["export"]
            assert refused.value.code == 2
            assert reason in capsys.readouterr().out and reason in block["refused"]
            assert not (run_dir / "model.onnx").exists()
            continue
        main([str(run_dir)])
        block = json.loads((run_dir / "results.json").read_text())["export"]
        assert block["weights"] == {
            "quantized_layers": 4,
            "codes_equal": True,
            "off_level": 0,
            "max_off_level": 0.0,
        }
        assert block["images_vs_record"]["record"] == "acc@4bit"
        assert abs(block["images_vs_record"]["difference"]) <= 2  # the same model and batches
        assert block["input_codes"]["compared"] == 0
        assert "inputs in full precision" in capsys.readouterr().out
    cmd = [sys.executable, "-m", "oscbench.export", str(tmp_path / "nowhere")]
    missing = subprocess.run(cmd, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "no results.json" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_record_from_before_export_bn_fold_and_an_option_existed_exports(tmp_path):
    from oscbench.launch.export import export_run

    run_config(["logger=none", "device=cpu", "trainer.epochs=1"], tmp_path)
    path = tmp_path / "results.json"
    record = json.loads(path.read_text())
    for key in ("export", "bn_fold"):
        del record["config"][key]
    for group in ("quantizer", "act_quantizer"):  # an option newer than the record
        del record["config"][group]["keep_positive"]
    path.write_text(json.dumps(record))
    assert export_run(tmp_path)["weights"]["codes_equal"]
