"""`cnn_small`: a conv-BN-ReLU network for small images (8x8 digits), trains in seconds."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from oscbench.models.base import MODELS
from oscbench.registry import check


@dataclass
class CnnSmallConfig:
    width: int  # channels of the first block; the next two have 2x and 4x

    def __post_init__(self) -> None:
        check(self.width >= 1, "width", self.width, "a positive integer")


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@MODELS.register("cnn_small", CnnSmallConfig)
def cnn_small(
    cfg: CnnSmallConfig, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    w = cfg.width
    return nn.Sequential(
        *_block(in_channels, w),
        *_block(w, 2 * w),
        nn.MaxPool2d(2),
        *_block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )
