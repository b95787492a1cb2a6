"""Quantized Conv2d/Linear and `quantize_model`, which swaps them into any network."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.models.base import bn_momentum
from oscbench.quant.base import QUANTIZERS, Quantizer

# (bits, channels or None, is_weight) -> Quantizer, or None for "leave in full precision"
QuantizerFactory = Callable[[int, "int | None", bool], "Quantizer | None"]


class QuantizedLayer:
    """Mixin: a layer with a weight quantizer and an optional input quantizer.

    Part of its interface for policies: `weight_quantizer`, `input_quantizer`,
    `is_first_or_last` (kept at `first_last_bits`), and `last_quantized_weight`, the
    detached fake-quantized weight of the last forward (the step's w_q, which dampening
    reads instead of quantizing again)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer | None
    is_first_or_last: bool

    @classmethod
    def from_float(
        cls, layer: nn.Module, wq: Quantizer, aq: Quantizer | None, is_first_or_last: bool
    ) -> QuantizedLayer:
        """The quantized twin of `layer`, sharing its parameters (as torchao's
        `FakeQuantizedLinear.from_linear`)."""
        new = cls.__new__(cls)
        new.__dict__ = layer.__dict__.copy()
        new._modules = dict(layer._modules)
        new.weight_quantizer = wq
        new.input_quantizer = aq
        new.is_first_or_last = is_first_or_last
        wq.init_from(new.weight)
        return new

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.input_quantizer
        if aq is None:
            return x
        if not aq.ready:  # first forward: set the scale from data (see calibrate)
            aq.init_from(x)
        return aq(x)

    def quantizer_input(self) -> torch.Tensor:
        """The tensor the weight quantizer quantizes, which the tracker and the policies read:
        the weight (with `bn_fold`, the weight with the BatchNorm folded in: QConvBn2d)."""
        return self.weight

    def quantized_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight (of `w`, the `quantizer_input` the caller has made); also
        kept, detached, as `last_quantized_weight` for policies that use it in the same step
        (autograd holds it for backward anyway)."""
        wq = self.weight_quantizer(self.quantizer_input() if w is None else w)
        self.last_quantized_weight = wq.detach()
        return wq


class QConv2d(QuantizedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QLinear(QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.quantized_weight(), self.bias)


_SWAP: dict[type, type[QuantizedLayer]] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


@dataclass
class QuantPlan:
    """Bit-widths of a quantized model; first/last layers keep their own (papers: 8), or,
    with `first_last_bits=None`, are quantized like every other layer, or with
    `first_last_fp` stay in full precision (AOQ)."""

    bits: int
    act_bits: int
    first_last_bits: int | None
    first_last_fp: bool = False


def quantizer_factory(component) -> QuantizerFactory:  # noqa: ANN001
    """A (bits, channels, is_weight) -> Quantizer factory for a validated `Component`
    (`quantizer: none` builds nothing)."""
    build = QUANTIZERS.get(component.name).build
    if build is None:
        return lambda bits, channels, is_weight: None
    return lambda bits, channels, is_weight: build(component.options, bits, channels, is_weight)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted path) is, on that module's device (a
    quantized layer's new quantizers go where its shared weights are)."""
    old = model.get_submodule(name)
    held = next(iter([*old.parameters(), *old.buffers()]), None)
    if held is not None:
        new.to(held.device)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(
    model: nn.Module, weight_q: QuantizerFactory, act_q: QuantizerFactory, plan: QuantPlan
) -> nn.Module:
    """Replace every Conv2d/Linear by its quantized twin, sharing the same parameters.

    The first and last such layer (in module order) use `plan.first_last_bits` for both
    weights and inputs, or stay as they are (`plan.first_last_fp`). Weight quantizers are
    initialised from the weights here; input quantizers on the first forward (see
    `calibrate`).
    """
    layers = [(n, m) for n, m in model.named_modules() if type(m) in _SWAP]
    if not layers:
        raise ValueError("quantize_model: the model has no Conv2d or Linear layer to quantize")
    ends = plan.first_last_bits is not None or plan.first_last_fp
    edge = {layers[0][0], layers[-1][0]} if ends else set()
    for name, layer in layers:
        is_edge = name in edge
        if is_edge and plan.first_last_fp:
            continue
        wbits = plan.first_last_bits if is_edge else plan.bits
        abits = plan.first_last_bits if is_edge else plan.act_bits
        wq = weight_q(wbits, layer.weight.shape[0], True)
        if wq is None:
            continue
        qlayer = _SWAP[type(layer)].from_float(layer, wq, act_q(abits, None, False), is_edge)
        swap_module(model, name, qlayer)
    return model


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            yield name, m


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable quantizer parameters (step sizes), for their own optimizer group."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise input quantizers from one batch, with batch-norm in batch-statistics mode
    (as in training) but without touching its running statistics."""
    was_training = model.training
    with bn_momentum(model, 0.0):
        model.train()
        model(x)
    model.train(was_training)
