"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

Ships inside scikit-learn, so the default run needs no download and no disk cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.data.base import DATASETS, HeldOut, TensorData
from oscbench.registry import check


@dataclass
class DigitsConfig(HeldOut):
    test_fraction: float  # held-out share, stratified by class
    split_seed: int  # fixed, so every run and method sees the same split

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "0 < x < 1")


@DATASETS.register("digits", DigitsConfig)
def digits(cfg: DigitsConfig, seed: int, device: torch.device) -> TensorData:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(),
        test_size=cfg.test_fraction,
        stratify=y.numpy(),
        random_state=cfg.split_seed,
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return TensorData(
        x_train=((x_train - mean) / std).to(device),
        y_train=y[idx_train].to(device),
        x_test=((x_test - mean) / std).to(device),
        y_test=y[idx_test].to(device),
        num_classes=10,
        seed=seed,
    )
