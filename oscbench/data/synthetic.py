"""`synthetic`: seeded random images of any shape, for smoke tests of any model.

Each class has a fixed random template; an image is its class's template plus noise, so a
model can learn the task and a smoke test sees the loss fall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.data.base import DATASETS, HeldOut, TensorData
from oscbench.registry import check


@dataclass
class SyntheticConfig(HeldOut):
    image_size: int
    channels: int
    num_classes: int
    train_size: int
    test_size: int
    noise: float  # noise std relative to the templates' (1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("image_size", "channels", "num_classes", "train_size", "test_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(self.noise >= 0, "noise", self.noise, ">= 0")


@DATASETS.register("synthetic", SyntheticConfig)
def synthetic(cfg: SyntheticConfig, seed: int, device: torch.device) -> TensorData:
    g = torch.Generator().manual_seed(12345)  # the task is fixed; `seed` only orders batches
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    templates = torch.randn(cfg.num_classes, *shape, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, cfg.num_classes, (n,), generator=g)
        return templates[y] + cfg.noise * torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xte, yte) = split(cfg.train_size), split(cfg.test_size)
    return TensorData(
        xtr.to(device),
        ytr.to(device),
        xte.to(device),
        yte.to(device),
        num_classes=cfg.num_classes,
        seed=seed,
    )
