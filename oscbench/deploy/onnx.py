"""A quantized model as the integer model an integer runtime runs (`deployed`, `to_onnx`).

The graph, made by torch.onnx's exporter (`dynamo=True`, opset 21), is a QDQ model:
- each quantized layer's weight is an integer initializer (int8; int16 where a mid-rise grid
  at 8 bits needs 9 bits, `Quantizer.deploy`) with DequantizeLinear, per tensor or per
  output channel, at the scale the quantizer's forward pass uses (`integer_form`), so that
  the dequantized weight is the fake-quantized one bit for bit; uneven levels (LOOKUP:
  PARQ's LSBQ) are a table, one row per tensor or output channel, that the codes index
  (Gather), so that the weight is its level;
- each quantized layer's input goes through QuantizeLinear (uint8 or int8), a Clip to its
  b-bit range where b < 8, and DequantizeLinear, at the learned step (LSQ+'s real-valued
  offset: a float Sub before, an Add after); learned thresholds (LOOKUP: LTQ) count the
  thresholds below the input instead of QuantizeLinear (a multi-threshold, by binary
  search: Gather, Greater); first and last layers at their own bits;
- the rest (BatchNorm, activation functions, pooling, residual additions) stays in float,
  as in any QDQ model; a runtime fuses what it can.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn.functional as F
from torch import nn

from oscbench.quant.base import (
    LOOKUP,
    UNIFORM,
    IntegerForm,
    LevelGrid,
    NotDeployable,
    Quantizer,
    ThresholdForm,
)
from oscbench.quant.fold import QConvBn2d
from oscbench.quant.modules import QuantizedLayer, quantized_layers, swap_module

ONNX_FILE = "model.onnx"
OPSET = 21  # DequantizeLinear of int16 codes
qd = torch.ops.quantized_decomposed


def integer_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The smallest ONNX integer type of QuantizeLinear/DequantizeLinear that holds the codes
    qmin..qmax."""
    for dtype in (torch.uint8, torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise NotDeployable(f"codes {qmin}..{qmax} fit no int8, uint8 or int16")


class QDQ(nn.Module):
    """An input quantizer as QuantizeLinear, a Clip to its own range where its integer type's
    is wider, and DequantizeLinear. `emit`, when set, collects the codes (the parity probe)."""

    def __init__(self, form: IntegerForm) -> None:
        super().__init__()
        self.form = form
        self.dtype = integer_dtype(form.qmin, form.qmax)
        info = torch.iinfo(self.dtype)
        self.full = (info.min, info.max)
        if form.axis is None:
            self.scale = float(form.scale)
        else:
            self.register_buffer("scales", form.scale.float().reshape(-1))
            self.register_buffer("zero_points", torch.zeros(form.scale.numel(), dtype=torch.long))
        self.emit: list[torch.Tensor] | None = None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        f = self.form
        if f.axis is not None:
            args = (self.scales, self.zero_points, f.axis, f.qmin, f.qmax, self.dtype)
            return qd.quantize_per_channel(x, *args)
        q = qd.quantize_per_tensor(x, self.scale, f.zero_point, *self.full, self.dtype)
        return torch.clamp(q, f.qmin, f.qmax) if (f.qmin, f.qmax) != self.full else q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.form
        if f.offset is not None:
            x = x - f.offset
        q = self.codes(x)
        if f.axis is None:
            y = qd.dequantize_per_tensor(q, self.scale, f.zero_point, f.qmin, f.qmax, self.dtype)
        else:
            args = (self.scales, self.zero_points, f.axis, f.qmin, f.qmax, self.dtype)
            y = qd.dequantize_per_channel(q, *args)
        if self.emit is not None:
            self.emit.append(q)
        return y if f.offset is None else y + f.offset


class MultiThreshold(QDQ):
    """A LOOKUP input quantizer (LTQ): the code is the number of its learned thresholds below
    x scale_in, in place of QuantizeLinear, the level DequantizeLinear's. The thresholds are
    sorted (each interval at least LTQ's eps > 0), so b steps of a binary search (Gather a
    threshold, Greater, add 2^j) count them, ties as bucketize: the memory of a few
    activations, not of 2^b - 1."""

    def __init__(self, form: ThresholdForm) -> None:
        super().__init__(form.levels)
        self.register_buffer("scale_in", form.scale_in.float())
        self.register_buffer("edges", form.edges.float())
        self.bits = (len(form.edges) + 1).bit_length() - 1  # 2^b - 1 thresholds

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.scale_in
        k = torch.zeros(z.shape, dtype=torch.long, device=z.device)
        for j in reversed(range(self.bits)):  # is the (k + 2^j)-th threshold below z?
            k = k + (z > self.edges[k + (2**j - 1)]).long() * 2**j
        return k.to(self.dtype)


def input_node(q: Quantizer) -> QDQ:
    """A layer's input quantizer as the integer model has it."""
    return MultiThreshold(q.threshold_form()) if q.deploy == LOOKUP else QDQ(q.integer_form(None))


class Deployed(nn.Module):
    """A quantized Conv2d or Linear as the integer model has it: integer weight codes with
    DequantizeLinear (or, for uneven levels, a table the codes index), its input through
    `QDQ` or `MultiThreshold`. `off_level` counts the weights whose level is not the
    simulated weight's value exactly (PARQ's LSBQ: greedy sums an ulp off their level), and
    `max_off_level` is the largest such difference."""

    def __init__(self, name: str, layer: QuantizedLayer) -> None:
        super().__init__()
        wq: Quantizer = layer.weight_quantizer
        w = layer.quantizer_input().detach()  # with bn_fold: the folded weight
        self.form: IntegerForm | None = None
        if wq.deploy == LOOKUP:
            grid = wq.grid(w)
            if not isinstance(grid, LevelGrid):
                raise NotDeployable(f"{name}: a LOOKUP weight quantizer without a LevelGrid")
            self.register_buffer("weight_levels", grid.values.detach().float())
            self.first_code = grid.n
            self.dtype = integer_dtype(grid.n, grid.p)
        else:
            self.form = form = wq.integer_form(w)
            self.dtype = integer_dtype(form.qmin, form.qmax)
            if form.axis is None:
                self.weight_scale = float(form.scale)  # a constant of the graph
            else:
                self.register_buffer("weight_scale", form.scale.float().reshape(-1))
        self.register_buffer("weight_codes", wq.integer_codes(w).to(self.dtype))
        self.bias = folded_bias(layer) if isinstance(layer, QConvBn2d) else layer.bias
        aq = layer.input_quantizer
        self.input = input_node(aq) if aq is not None else None
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise NotDeployable(f"{name}: padding_mode={layer.padding_mode} (zeros only)")
            keys = ("stride", "padding", "dilation", "groups")
            self.conv = {k: getattr(layer, k) for k in keys}
        with torch.no_grad():
            diff = (self.weight() - wq(w).float()).abs()
        self.off_level, self.max_off_level = int((diff > 0).sum()), float(diff.max())
        if self.off_level and self.form is not None:
            raise RuntimeError(  # a quantizer whose integer_form is not its forward's
                f"{name}: {type(wq).__name__}.integer_form does not give its "
                "fake-quantized weight; fix integer_form"
            )

    def weight(self) -> torch.Tensor:
        f, codes = self.form, self.weight_codes
        if f is None:  # a table of levels, one per tensor or per output channel
            # the codes' table indices through DequantizeLinear (scale 1, zero point the
            # first code), which the exporter's constant folding keeps, so that the file
            # holds the codes and the table, not float weights
            lo, hi = self.first_code, self.first_code + self.weight_levels.shape[-1] - 1
            index = qd.dequantize_per_tensor(codes, 1.0, lo, lo, hi, self.dtype).long()
            rows = index.flatten(1) if self.weight_levels.dim() == 2 else index.reshape(-1)
            return self.weight_levels.gather(-1, rows).view(codes.shape)  # GatherElements
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
    for name in ("onnxscript", "onnx_ir"):  # their optimizer logs each step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
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
