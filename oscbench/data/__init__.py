"""Dataset registry: `dataset.name` in conf/dataset/*.yaml -> a `Data` object."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from oscbench.registry import Registry


@dataclass
class TensorData:
    """A dataset held as tensors on the training device (no DataLoader workers needed).

    Shuffling uses a generator seeded by (seed, epoch), so an epoch's batches do not depend
    on what ran before it (a resumed run sees the same batches).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    seed: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.x_train) // batch_size)

    def train_batches(
        self, epoch: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.x_train), generator=g).to(self.x_train.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield self.x_train[idx], self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x_test), batch_size):
            yield self.x_test[i : i + batch_size], self.y_test[i : i + batch_size]


DATASETS: Registry[TensorData] = Registry("dataset")


def build_data(component, seed: int, device: torch.device) -> TensorData:  # noqa: ANN001
    """Load a validated dataset `Component` onto `device`."""
    return DATASETS.get(component.name).build(component.options, seed=seed, device=device)


from oscbench.data import digits  # noqa: E402,F401  (registers)
