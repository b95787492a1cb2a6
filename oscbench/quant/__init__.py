"""Quantizers (one file each), quantized layers and `quantize_model`.

`QUANTIZERS` maps `quantizer.name` / `act_quantizer.name` to a builder
(options, bits, channels, is_weight) -> Quantizer; `none` keeps full precision.
"""

from __future__ import annotations

from functools import partial

from oscbench.quant.aoq import AOQConfig, AOQQuantizer
from oscbench.quant.base import Quantizer
from oscbench.quant.lsq import LSQConfig, LSQQuantizer
from oscbench.quant.modules import (
    QConv2d,
    QLinear,
    QuantizedLayer,
    QuantPlan,
    calibrate,
    quantize_model,
    quantized_layers,
    quantizer_parameters,
)
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from oscbench.quant.statsq import StatsQConfig, StatsQQuantizer
from oscbench.registry import Registry

QUANTIZERS: Registry[Quantizer | None] = Registry("quantizer")

QUANTIZERS.register("none")(lambda options, bits, channels, is_weight: None)
QUANTIZERS.register("lsq", LSQConfig)(
    lambda options, bits, channels, is_weight: LSQQuantizer(bits, options, channels, is_weight)
)
QUANTIZERS.register("statsq", StatsQConfig)(
    lambda options, bits, channels, is_weight: StatsQQuantizer(bits)
)
QUANTIZERS.register("aoq", AOQConfig)(
    lambda options, bits, channels, is_weight: AOQQuantizer(bits, options.grad_scale)
)
QUANTIZERS.register("rtn", RTNConfig)(
    lambda options, bits, channels, is_weight: RTNQuantizer(bits, options.per_channel)
)


def quantizer_factory(component):  # noqa: ANN001, ANN201
    """A (bits, channels, is_weight) -> Quantizer factory for a validated `Component`."""
    return partial(QUANTIZERS.get(component.name).build, component.options)


__all__ = [
    "QUANTIZERS",
    "QConv2d",
    "QLinear",
    "QuantPlan",
    "Quantizer",
    "QuantizedLayer",
    "calibrate",
    "quantize_model",
    "quantized_layers",
    "quantizer_factory",
    "quantizer_parameters",
]
