"""Quantizers, one module each, registered in `oscbench.quant.base.QUANTIZERS`; quantized
layers and `quantize_model` in `oscbench.quant.modules`; QKR in `oscbench.quant.qkr`."""

from oscbench.registry import import_plugins

import_plugins(__name__, __path__)
