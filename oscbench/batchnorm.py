"""Batch-norm helpers shared by calibration and BN re-estimation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


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
