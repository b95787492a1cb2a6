"""The exported model's parity with the simulated one.

Parity is measured on the graph as written (onnxruntime with graph optimizations off) against
the fake-quantized model here: the weight codes in the file against the quantizers' codes,
and a table of uneven levels against the quantizer's (equal, or the export fails); every
quantized input's codes (a code may differ where the two sums that feed it round differently
and the value lies at a rounding tie; these are counted); the logits, against the error
bound of the last layer's sum given both inputs and both weights; the test accuracy, in
images, against the record's. The accuracy with
onnxruntime's default optimizations, which fuse QDQ patterns into integer kernels, is
reported beside it (`optimized`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch import nn

from oscbench.data.base import Batch
from oscbench.deploy.onnx import Deployed, session
from oscbench.quant.base import LOOKUP, IntegerForm, Quantizer
from oscbench.quant.modules import quantized_layers

U = 2.0**-24  # float32's unit roundoff


def weight_codes_equal(model: nn.Module, onnx_model: bytes) -> tuple[int, bool]:
    """(quantized layers, whether every layer's weight codes in the ONNX file equal its
    quantizer's `integer_codes`, and where its levels are a table (LOOKUP), the file's table
    its grid's levels)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load_from_string(onnx_model).graph.initializer}
    layers = list(quantized_layers(model))
    for name, layer in layers:
        wq, w = layer.weight_quantizer, layer.quantizer_input().detach()
        pairs = [("weight_codes", wq.integer_codes(w).long())]
        if wq.deploy == LOOKUP:
            pairs.append(("weight_levels", wq.grid(w).levels().float()))
        for key, ours in pairs:
            init = inits.get(f"model.{name}.{key}")
            if init is None:
                return len(layers), False
            theirs = torch.from_numpy(numpy_helper.to_array(init).copy()).to(ours.dtype)
            if not torch.equal(theirs, ours):
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
    last_name, last = list(quantized_layers(model))[-1]
    last_out: list[torch.Tensor] = []

    def codes(q: Quantizer, inputs: tuple, output: torch.Tensor) -> None:
        ours.append(q.to_int(inputs[0]))
        if q is last.input_quantizer:
            last_in.append(output)

    hooks = [layer.input_quantizer.register_forward_hook(codes) for layer in layers]
    hooks.append(last.register_forward_hook(lambda m, i, o: last_out.append(o)))
    bounded = isinstance(last, nn.Linear) and last.input_quantizer is not None
    if bounded:  # the simulated weight and the integer model's (a table's level may differ)
        w_t = last.weight_quantizer(last.quantizer_input()).double()
        w_o = Deployed(last_name, last).weight().double()
        dw, w_t, w_o = (w_o - w_t).abs(), w_t.abs(), w_o.abs()
        b = last.bias.double().abs() if last.bias is not None else torch.zeros(w_t.shape[0])
        k = w_t.shape[1] + 1
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
                bound = (x_o - x_t).abs() @ w_o.T + x_t.abs() @ dw.T
                bound += gamma * (x_o.abs() @ w_o.T + x_t.abs() @ w_t.T + 2 * b)
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
            "bound": "last layer: |W_onnx| |x_onnx - x| + |W_onnx - W| |x| + "
            "gamma_K (|W_onnx| |x_onnx| + |W| |x| + 2 |b|)"
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
