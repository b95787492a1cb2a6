"""Model registry (`model.name` in conf/model/*.yaml -> a builder) and the BatchNorm helpers
that calibration and BN re-estimation share. A model plugin is one module with a builder

    @MODELS.register("cnn_small", CnnSmallConfig)
    def cnn_small(cfg, num_classes: int, in_channels: int, image_size: int) -> nn.Module
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from oscbench.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def build_model(component, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ANN001
    """Build a validated model `Component` for a dataset's classes, input channels and
    image size (height = width)."""
    return MODELS.get(component.name).build(
        component.options, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def bn_momentum(model: nn.Module, momentum: float | None) -> Iterator[list]:
    """Every BN layer's momentum set to `momentum` (0: running statistics untouched; None:
    a cumulative average), restored afterwards; yields the layers."""
    bns = batchnorms(model)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = momentum
    try:
        yield bns
    finally:
        for bn, value in zip(bns, saved, strict=True):
            bn.momentum = value
