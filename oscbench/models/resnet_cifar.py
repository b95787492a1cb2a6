"""The CIFAR ResNets of He et al. (CVPR 2016, Sec. 4.2): `resnet20`, `resnet32`, `resnet44`,
`resnet56`, `resnet110`, used in AOQ's experiments (muzenc/AOQ: option-B, 1x1-conv
shortcuts, `model.shortcut: B`; He et al.'s own CIFAR nets: option A)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oscbench.models.base import MODELS
from oscbench.registry import ConfigError, check


@dataclass
class ResNetCifarConfig:
    depth: int  # 6n + 2: 20, 32, 44, 56, 110
    width: int  # channels of the first stage (16); the next two have 2x and 4x
    shortcut: str  # A: parameter-free (subsample + zero channels), as He et al.; B: 1x1 conv

    def __post_init__(self) -> None:
        check((self.depth - 2) % 6 == 0, "depth", self.depth, "6n + 2: 20, 32, 44, 56, 110")
        check(self.shortcut in ("A", "B"), "shortcut", self.shortcut, "A, B")


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.down: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "B":
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            else:
                self.pad, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.down is not None:
            x = self.down(x)
        elif self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + x)


def resnet_cifar(cfg: ResNetCifarConfig, num_classes: int, in_channels: int) -> nn.Module:
    n, w = (cfg.depth - 2) // 6, cfg.width
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
    ]
    cin = w
    for stage, cout in enumerate((w, 2 * w, 4 * w)):
        for i in range(n):
            layers.append(Block(cin, cout, 2 if stage and i == 0 else 1, cfg.shortcut))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _named(depth: int) -> None:
    """`resnet<depth>`: the builder at that depth (model.depth must agree with the name)."""

    def build(cfg: ResNetCifarConfig, num_classes: int, in_channels: int, image_size: int):  # noqa: ANN202
        if cfg.depth != depth:
            raise ConfigError(
                f"model=resnet{depth} with model.depth={cfg.depth}; use model=resnet{cfg.depth} "
                f"if it exists, or model.depth={depth}"
            )
        return resnet_cifar(cfg, num_classes, in_channels)

    MODELS.register(f"resnet{depth}", ResNetCifarConfig)(build)


for _depth in (20, 32, 44, 56, 110):
    _named(_depth)
