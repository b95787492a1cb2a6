"""`python -m oscbench.export RUN_DIR`: a trained run as the integer model an integer runtime
runs, written as `model.onnx` next to its record, and its parity with the simulated model,
measured in onnxruntime on the run's test split (the record's `export` block).

The graph, made by torch.onnx's exporter (`dynamo=True`, opset 21), is a QDQ model:
- each quantized layer's weight is an integer initializer (int8; int16 where a mid-rise grid
  at 8 bits needs 9 bits, `Quantizer.deploy`) with DequantizeLinear, per tensor or per
  output channel, at the scale the quantizer's forward pass uses (`integer_form`), so that
  the dequantized weight is the fake-quantized one bit for bit;
- each quantized layer's input goes through QuantizeLinear (uint8 or int8), a Clip to its
  b-bit range where b < 8, and DequantizeLinear, at the learned step (LSQ+'s real-valued
  offset: a float Sub before, an Add after); first and last layers at their own bits;
- the rest (BatchNorm, activation functions, pooling, residual additions) stays in float,
  as in any QDQ model; a runtime fuses what it can.

Parity is measured on the graph as written (onnxruntime with graph optimizations off) against
the fake-quantized model here: the weight codes in the file against the quantizers' codes
(equal, or the export fails); every quantized input's codes (a code may differ where the
two sums that feed it round differently and the value lies at a rounding tie; these are
counted); the logits, against the error bound of the last layer's sum given both inputs
(`logit_bound`); the test accuracy, in images, against the record's. The accuracy with
onnxruntime's default optimizations, which fuse QDQ patterns into integer kernels, is
reported beside it (`optimized`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from oscbench.checkpoint import FINAL_MODEL
from oscbench.compose import compose
from oscbench.config import RunSpec, resolved, validate
from oscbench.data.base import Batch, Data, build_data
from oscbench.files import DamagedFile, write_atomic, write_json_atomic
from oscbench.models.base import build_model
from oscbench.quant.base import UNIFORM, IntegerForm, NotDeployable, Quantizer
from oscbench.quant.fold import QConvBn2d
from oscbench.quant.modules import QuantizedLayer, quantized_layers, swap_module
from oscbench.record import load_results
from oscbench.registry import ConfigError
from oscbench.runs import RESULTS

ONNX_FILE = "model.onnx"
OPSET = 21  # DequantizeLinear of int16 codes
U = 2.0**-24  # float32's unit roundoff
qd = torch.ops.quantized_decomposed


def integer_dtype(form: IntegerForm) -> torch.dtype:
    """The smallest ONNX integer type of QuantizeLinear/DequantizeLinear that holds the codes."""
    if form.bits > 16 or (not form.signed and form.bits > 8):
        raise NotDeployable(f"codes {form.qmin}..{form.qmax} fit no int8, uint8 or int16")
    if form.signed:
        return torch.int8 if form.bits <= 8 else torch.int16
    return torch.uint8


class QDQ(nn.Module):
    """An input quantizer as QuantizeLinear, a Clip to its own range where its integer type's
    is wider, and DequantizeLinear. `emit`, when set, collects the codes (the parity probe)."""

    def __init__(self, form: IntegerForm) -> None:
        super().__init__()
        self.form = form
        self.dtype = integer_dtype(form)
        info = torch.iinfo(self.dtype)
        self.full = (info.min, info.max)
        if form.axis is None:
            self.scale = float(form.scale)
        else:
            self.register_buffer("scales", form.scale.float().reshape(-1))
            self.register_buffer("zero_points", torch.zeros(form.scale.numel(), dtype=torch.long))
        self.emit: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.form
        if f.offset is not None:
            x = x - f.offset
        if f.axis is None:
            q = qd.quantize_per_tensor(x, self.scale, f.zero_point, *self.full, self.dtype)
            if (f.qmin, f.qmax) != self.full:
                q = torch.clamp(q, f.qmin, f.qmax)
            y = qd.dequantize_per_tensor(q, self.scale, f.zero_point, f.qmin, f.qmax, self.dtype)
        else:
            args = (self.scales, self.zero_points, f.axis, f.qmin, f.qmax, self.dtype)
            q = qd.quantize_per_channel(x, *args)
            y = qd.dequantize_per_channel(q, *args)
        if self.emit is not None:
            self.emit.append(q)
        return y if f.offset is None else y + f.offset


class Deployed(nn.Module):
    """A quantized Conv2d or Linear as the integer model has it: integer weight codes with
    DequantizeLinear, its input through `QDQ`."""

    def __init__(self, name: str, layer: QuantizedLayer) -> None:
        super().__init__()
        wq: Quantizer = layer.weight_quantizer
        w = layer.quantizer_input().detach()  # with bn_fold: the folded weight
        self.form = form = wq.integer_form(w)
        self.dtype = integer_dtype(form)
        self.register_buffer("weight_codes", wq.integer_codes(w).to(self.dtype))
        if form.axis is None:
            self.weight_scale = float(form.scale)  # a constant of the graph
        else:
            self.register_buffer("weight_scale", form.scale.float().reshape(-1))
        self.bias = folded_bias(layer) if isinstance(layer, QConvBn2d) else layer.bias
        aq = layer.input_quantizer
        self.input = QDQ(aq.integer_form(None)) if aq is not None else None
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise NotDeployable(f"{name}: padding_mode={layer.padding_mode} (zeros only)")
            keys = ("stride", "padding", "dilation", "groups")
            self.conv = {k: getattr(layer, k) for k in keys}
        with torch.no_grad():
            if not torch.equal(self.weight(), wq(w).float()):
                raise RuntimeError(  # a quantizer whose integer_form is not its forward's
                    f"{name}: {type(wq).__name__}.integer_form does not give its "
                    "fake-quantized weight; fix integer_form"
                )

    def weight(self) -> torch.Tensor:
        f, codes = self.form, self.weight_codes
        if f.axis is None:
            return qd.dequantize_per_tensor(codes, self.weight_scale, 0, f.qmin, f.qmax, self.dtype)
        return qd.dequantize_per_channel(
            codes, self.weight_scale, None, f.axis, f.qmin, f.qmax, self.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x) if self.input is not None else x
        if self.conv is None:
            return F.linear(x, self.weight(), self.bias)
        return F.conv2d(x, self.weight(), self.bias, **self.conv)


class Probe(nn.Module):
    """The deployed model, returning its logits and every quantized input's codes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.qdqs = [m for m in model.modules() if isinstance(m, QDQ)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes: list[torch.Tensor] = []
        for q in self.qdqs:
            q.emit = codes
        try:
            logits = self.model(x)
        finally:
            for q in self.qdqs:
                q.emit = None
        return (logits, *codes)


def folded_bias(layer: QConvBn2d) -> nn.Parameter:
    """beta + (b - running_mean) gamma / sigma: with the folded weight, the layer's output
    in evaluation (no BatchNorm node in the graph)."""
    bn = layer.bn
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    return nn.Parameter((bn.bias + (b - bn.running_mean) * layer.scale_factor()).detach())


def deployed(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every quantized layer `Deployed`."""
    twin = copy.deepcopy(model).eval()
    for name, layer in list(quantized_layers(twin)):
        try:
            swap_module(twin, name, Deployed(name, layer))
        except NotDeployable as e:
            wq, aq = layer.weight_quantizer, layer.input_quantizer
            which = type(aq if aq is not None and aq.deploy != UNIFORM else wq).__name__
            raise NotDeployable(f"{which} ({name}): {e}") from None
    return twin


def to_onnx(twin: nn.Module, example: torch.Tensor) -> bytes:
    """The deployed model with its codes as outputs (`Probe`), as serialized ONNX."""
    batch = {0: torch.export.Dim.DYNAMIC}
    program = torch.onnx.export(
        Probe(twin).eval(),
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input"],
        dynamic_shapes=(batch,),
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def logits_only(probe: bytes) -> bytes:
    """The probe's graph with its first output only: the model a user deploys."""
    import onnx

    proto = onnx.load_from_string(probe)
    del proto.graph.output[1:]
    return proto.SerializeToString()


def session(model: bytes, optimized: bool):  # noqa: ANN201
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def weight_codes_equal(model: nn.Module, onnx_model: bytes) -> tuple[int, bool]:
    """(quantized layers, whether every layer's weight codes in the ONNX file equal its
    quantizer's `integer_codes`)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load_from_string(onnx_model).graph.initializer}
    layers = list(quantized_layers(model))
    for name, layer in layers:
        init = inits.get(f"model.{name}.weight_codes")
        if init is None:
            return len(layers), False
        theirs = numpy_helper.to_array(init).astype(np.int64)
        ours = layer.weight_quantizer.integer_codes(layer.quantizer_input().detach())
        ours = ours.long().numpy()
        if theirs.shape != ours.shape or not (theirs == ours).all():
            return len(layers), False
    return len(layers), True


@torch.no_grad()
def parity(model: nn.Module, probe: bytes, batches: Iterable[Batch]) -> dict:
    """The deployed graph (onnxruntime, as written) against the fake-quantized model on
    `batches` (the test split): accuracy, the quantized inputs' codes, the logits against
    their bound."""
    layers = [layer for _, layer in quantized_layers(model) if layer.input_quantizer is not None]
    ours: list[torch.Tensor] = []
    last_in: list[torch.Tensor] = []
    last = list(quantized_layers(model))[-1][1]
    last_out: list[torch.Tensor] = []

    def codes(q: Quantizer, inputs: tuple, output: torch.Tensor) -> None:
        ours.append(q.to_int(inputs[0]))
        if q is last.input_quantizer:
            last_in.append(output)

    hooks = [layer.input_quantizer.register_forward_hook(codes) for layer in layers]
    hooks.append(last.register_forward_hook(lambda m, i, o: last_out.append(o)))
    bounded = isinstance(last, nn.Linear) and last.input_quantizer is not None
    if bounded:
        w = last.weight_quantizer(last.quantizer_input()).double().abs()
        b = last.bias.double().abs() if last.bias is not None else torch.zeros(w.shape[0])
        k = w.shape[1] + 1
        gamma = k * U / (1 - k * U)
        form = last.input_quantizer.integer_form(None)
    sess = session(probe, optimized=False)
    n = correct = correct_here = differ = compared = with_flips = over = 0
    max_code = 0
    max_err = max_ratio = 0.0
    model.eval()
    try:
        for x, y in batches:
            for kept in (ours, last_in, last_out):
                kept.clear()
            logits = model(x).float()
            out = sess.run(None, {"input": x.numpy()})
            theirs = [torch.from_numpy(c.astype(np.int64)) for c in out[1:]]
            flips = torch.zeros(len(y), dtype=torch.bool)
            for a, c in zip(ours, theirs, strict=True):
                d = (c - a.long()).abs()
                differ += int((d > 0).sum())
                compared += d.numel()
                max_code = max(max_code, int(d.max()))
                flips |= d.flatten(1).amax(1) > 0 if d.dim() > 1 else d > 0
            with_flips += int(flips.sum())
            onnx_logits = torch.from_numpy(out[0])
            err = (onnx_logits.double() - logits.double()).abs()
            max_err = max(max_err, float(err.max()))
            if bounded and torch.equal(last_out[0], logits):
                x_t = last_in[0].double()
                x_o = _dequantized(theirs[-1], form).double()
                bound = (x_o - x_t).abs() @ w.T + gamma * ((x_o.abs() + x_t.abs()) @ w.T + 2 * b)
                over += int((err > bound).any(1).sum())
                max_ratio = max(max_ratio, float((err / bound.clamp_min(1e-300)).max()))
            else:
                bounded = False
            n += len(y)
            correct += int((onnx_logits.argmax(1) == y).sum())
            correct_here += int((logits.argmax(1) == y).sum())
    finally:
        for h in hooks:
            h.remove()
    return {
        "test_images": n,
        "correct": correct,
        "acc": 100.0 * correct / n,
        "correct_simulated_here": correct_here,
        "input_codes": {
            "compared": compared,
            "differ": differ,
            "max_difference": max_code,
            "images_with_a_difference": with_flips,
        },
        "logits": {
            "max_abs_difference": max_err,
            "bound": "last layer: |W| |x_onnx - x| + gamma_K (|W| (|x_onnx| + |x|) + 2 |b|)"
            if bounded
            else None,
            "images_over_bound": over if bounded else None,
            "max_share_of_bound": max_ratio if bounded else None,
        },
    }


def _dequantized(codes: torch.Tensor, form: IntegerForm) -> torch.Tensor:
    """DequantizeLinear's float32 value of `codes` (per tensor), plus the offset."""
    x = (codes.float() - form.zero_point) * form.scale.float()
    return x if form.offset is None else x + form.offset


@torch.no_grad()
def accuracy(model: bytes, batches: Iterable[Batch]) -> float:
    """Test accuracy (%) of the ONNX model under onnxruntime's default optimizations."""
    sess = session(model, optimized=True)
    n = correct = 0
    for x, y in batches:
        logits = sess.run(None, {"input": x.numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        n += len(y)
    return 100.0 * correct / n


def rebuild(run_dir: Path) -> tuple[RunSpec, Data, nn.Module, dict]:
    """A completed run's spec, data (on the CPU) and final model, and its record."""
    from oscbench.run import quantize  # the run's own quantization and calibration

    record = load_results(run_dir)
    if record.get("status") != "completed":
        raise ConfigError(
            f"{run_dir / RESULTS} is a run that has not completed (status "
            f"{record.get('status')}); run the same command again to finish it, then export"
        )
    final_model = run_dir / FINAL_MODEL
    if not final_model.exists():
        raise ConfigError(f"{final_model} is missing: the run's final weights are not there")
    config = {k: v for k, v in record["config"].items() if k != "fp_run"}
    # top-level keys newer than the record (export, bn_fold) at their defaults, which leave
    # a run as it was before they existed (its key is unchanged: oscbench.runs.fingerprint)
    defaults = resolved(compose([]))
    config = {k: v for k, v in defaults.items() if k not in config} | config
    spec = validate(OmegaConf.create(config | {"device": "cpu"}))
    device = torch.device("cpu")
    data = build_data(spec.dataset, seed=spec.seed, device=device)
    model = build_model(spec.model, data.num_classes, data.in_channels, data.image_size)
    if spec.quantized:
        quantize(spec, model, data)
    try:
        state = torch.load(final_model, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises several kinds for a damaged file)
        raise DamagedFile(f"{final_model} is damaged ({e}); train the run again") from None
    model.load_state_dict(state)
    return spec, data, model.eval(), record


def export_run(run_dir: Path, batch_size: int | None = None) -> dict:
    """Export the run in `run_dir` to `model.onnx`, measure its parity and write the
    record's `export` block (also when the export is refused: its reason); returns it."""
    import onnxruntime

    spec, data, model, record = rebuild(Path(run_dir))
    batch_size = batch_size or spec.trainer.eval_batch_size
    block: dict = {"opset": OPSET, "onnxruntime": onnxruntime.__version__}
    try:
        if not spec.quantized:
            what = (
                "a PTQ run trains in full precision and rounds its weights only to evaluate them"
                if spec.ptq
                else "a full-precision run has no integer model"
            )
            raise NotDeployable(f"{what}; export a quantized run")
        start = time.perf_counter()
        twin = deployed(model)
        example = next(data.eval_batches("test", min(batch_size, 2)))[0]
        probe = to_onnx(twin, example)
        onnx_model = logits_only(probe)
        write_atomic(run_dir / ONNX_FILE, lambda f: f.write(onnx_model))
        block["file"] = ONNX_FILE
        block["seconds_export"] = time.perf_counter() - start
        layers, equal = weight_codes_equal(model, onnx_model)
        if not equal:
            raise RuntimeError(f"{run_dir / ONNX_FILE}: weight codes differ from the quantizers'")
        block["weights"] = {"quantized_layers": layers, "codes_equal": equal}
        start = time.perf_counter()
        block |= parity(model, probe, data.eval_batches("test", batch_size))
        block["optimized"] = {"acc": accuracy(onnx_model, data.eval_batches("test", batch_size))}
        block["seconds_parity"] = time.perf_counter() - start
        key = "acc_bn" if "acc_bn" in record["final"] else "acc"
        recorded = round(record["final"][key] * block["test_images"] / 100)
        block["images_vs_record"] = {"record": key, "difference": block["correct"] - recorded}
    except NotDeployable as e:
        block["refused"] = str(e)
    record["export"] = block
    write_json_atomic(run_dir / RESULTS, record)
    return block


def summary(block: dict) -> str:
    if "refused" in block:
        return f"export refused: {block['refused']}"
    codes, logits = block["input_codes"], block["logits"]
    lines = [
        f"exported   {block['file']} ({block['seconds_export']:.1f} s; onnxruntime "
        f"{block['onnxruntime']}, opset {block['opset']})",
        f"weights    {block['weights']['quantized_layers']} quantized layers, integer codes "
        + ("equal to oscbench's" if block["weights"]["codes_equal"] else "DIFFER"),
        f"accuracy   {block['acc']:.2f} % on {block['test_images']:,} test images "
        f"({block['images_vs_record']['difference']:+d} images against the record's "
        f"{block['images_vs_record']['record']}); onnxruntime optimized: "
        f"{block['optimized']['acc']:.2f} %",
        f"codes      {codes['differ']:,} of {codes['compared']:,} quantized inputs differ "
        f"(by at most {codes['max_difference']}; {codes['images_with_a_difference']:,} images)",
        f"logits     max |difference| {logits['max_abs_difference']:.3g}"
        + (
            f", {logits['images_over_bound']} images over the bound "
            f"(at most {logits['max_share_of_bound']:.2g} of it)"
            if logits["bound"]
            else ""
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oscbench.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a completed run's directory (holds results.json)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch (default: the run's)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / RESULTS).exists():
        parser.exit(2, f"oscbench.export: no {RESULTS} in {run_dir}; give a run's directory\n")
    try:
        block = export_run(run_dir, args.batch_size)
    except ConfigError as e:
        parser.exit(2, f"oscbench.export: {e}\n")
    print(summary(block))
    if "refused" in block:
        sys.exit(2)


if __name__ == "__main__":
    main()
