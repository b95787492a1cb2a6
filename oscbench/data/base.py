"""The dataset interface (`TensorData`, `LoaderData`) and registry: `dataset.name` in
conf/dataset/*.yaml -> a `Data` object. A dataset plugin is one module with a builder

    @DATASETS.register("digits", DigitsConfig)
    def digits(cfg: DigitsConfig, seed: int, device: torch.device) -> Data

Two kinds: `TensorData` holds a small dataset (digits, CIFAR, synthetic) as tensors on the
training device and augments batches there (no DataLoader workers, as airbench does);
`LoaderData` streams a large image-folder dataset (Tiny ImageNet, ImageNet) through a
DataLoader with workers and pinned memory. Both give batches already on the device, and
both seed an epoch's order and augmentation by (seed, epoch) alone, so a resumed run sees
the same batches as an uninterrupted one.

Every dataset holds out a seeded, stratified validation split of its training data
(`dataset.val_fraction`, `dataset.val_seed`): per-epoch numbers and tuning read it, and the
test split is evaluated at the end (`trainer.test`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from oscbench.distributed import World
from oscbench.registry import ConfigError, Registry, check

Batch = tuple[torch.Tensor, torch.Tensor]
DATA_ENV = "OSCBENCH_DATA"
SPLITS = ("val", "test")  # the evaluation splits: held out of the training data, and the test set


@dataclass
class HeldOut:
    """The validation split every dataset config holds (its fields come first)."""

    val_fraction: float  # share of the training data held out for validation, per class
    val_seed: int  # fixed, so every run and method holds out the same images

    def __post_init__(self) -> None:
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "0 <= x < 1")


def split_indices(labels: torch.Tensor, fraction: float, seed: int) -> tuple:
    """(train, val) index arrays: `fraction` of each class held out (scikit-learn's
    stratified split, seeded); no validation split for fraction 0. A set too small to hold
    out one image of every class (a smoke test's) is split without stratification."""
    import numpy as np
    from sklearn.model_selection import train_test_split  # slow to import: only here

    idx = np.arange(len(labels))
    if fraction == 0:
        return idx, idx[:0]
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    held = math.ceil(fraction * len(idx))  # as scikit-learn rounds test_size
    stratify = labels if held >= len(counts) and counts.min() >= 2 else None
    return train_test_split(idx, test_size=fraction, stratify=stratify, random_state=seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class DataNotFound(ConfigError):
    """A dataset that is not on disk: the message says where we looked and how to get it."""


def require(path: Path, dataset: str, layout: str, how: str) -> None:
    if not path.exists():
        raise DataNotFound(
            f"dataset {dataset}: nothing at {path}\n  expected layout: {layout}\n  {how}\n"
            f"  datasets live under `data_dir` (default: ${DATA_ENV}, else ./data): "
            f"set data_dir=/path or export {DATA_ENV}=/path"
        )


def crop_flip(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip, per image, on x's device."""
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    flip = torch.rand(n, generator=g).to(x.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    idx = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[idx, chan, rows, cols]


@dataclass
class TensorData:
    """A dataset held as tensors on the training device.

    Images are stored as given (uint8 for CIFAR, float for digits), turned into floats and
    normalised with (mean, std) per batch; `augment="crop_flip"` applies CIFAR's standard
    augmentation (pad 4, random crop, horizontal flip) to training batches on the device.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    seed: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: str = "none"  # none | crop_flip
    world: World = field(default_factory=World)  # several processes: this rank's shards
    x_val: torch.Tensor | None = None  # held out of the training data (`hold_out`)
    y_val: torch.Tensor | None = None

    def hold_out(self, fraction: float, seed: int) -> TensorData:
        """This dataset with `fraction` of each class of its training data moved to the
        validation split."""
        train, val = split_indices(self.y_train.cpu(), fraction, seed)
        train, val = torch.from_numpy(train), torch.from_numpy(val)
        return dataclasses.replace(
            self,
            x_train=self.x_train[train.to(self.device)],
            y_train=self.y_train[train.to(self.device)],
            x_val=self.x_train[val.to(self.device)],
            y_val=self.y_train[val.to(self.device)],
        )

    def split_size(self, split: str) -> int:
        """The number of images in `split`: train, val or test."""
        sizes = {"train": self.y_train, "val": self.y_val, "test": self.y_test}
        return 0 if sizes[split] is None else len(sizes[split])

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.x_train) // batch_size)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        """The epoch's global batches of `batch_size` in its seeded order; on several
        processes, this rank's contiguous part of each (the same permutation and the same
        augmentation on every rank, so the ranks' parts make up the one-process batch)."""
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.x_train), generator=g).to(self.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = self._prepare(self.x_train[idx])
            if self.augment == "crop_flip":
                x = crop_flip(x, 4, g)
            part = self.world.shard(len(idx))
            yield x[part], self.y_train[idx][part]

    def shard_weight(self, step: int, batch_size: int, local: int) -> float:
        """The factor that makes the mean loss of this rank's `local` examples of the
        epoch's `step`-th batch, averaged over the ranks by DDP, the mean over the whole
        batch: ranks x local / global (1 unless the batch splits unevenly)."""
        total = min(batch_size, len(self.x_train) - step * batch_size)
        return self.world.size * local / total

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """The `split` ("val" or "test") in order; on several processes, this rank's part
        of each batch."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        for i in range(0, self.split_size(split), batch_size):
            n = min(batch_size, len(x) - i)
            part = self.world.shard(n)
            part = slice(i + part.start, i + part.stop)
            yield self._prepare(x[part]), y[part]


class EpochView(torch.utils.data.Dataset):
    """A dataset whose random transforms are seeded per (epoch seed, index): the same
    augmentation however many workers load it and whatever ran before (resumable)."""

    def __init__(self, ds: torch.utils.data.Dataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):  # noqa: ANN204
        state = torch.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + i)
        try:
            return self.ds[i]
        finally:
            torch.set_rng_state(state)


@dataclass
class LoaderData:
    """A dataset streamed from disk by a DataLoader (workers, pinned memory on CUDA)."""

    train_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    num_classes: int
    seed: int
    device: torch.device
    workers: int
    image_size: int
    in_channels: int = 3
    world: World = field(default_factory=World)  # several processes: DistributedSampler
    train_as_test: torch.utils.data.Dataset | None = None  # the training images, test transform
    val_set: torch.utils.data.Dataset | None = None  # held out of train_set (`hold_out`)

    def hold_out(self, fraction: float, seed: int) -> LoaderData:
        """This dataset with `fraction` of each class of its training images (by the
        training set's `targets`, as torchvision's folders have them) moved to the
        validation split, read with the test transform (`train_as_test`; without one, as
        the training set is read)."""
        labels = torch.as_tensor(self.train_set.targets)
        train, val = split_indices(labels, fraction, seed)
        sub = torch.utils.data.Subset
        source = self.train_set if self.train_as_test is None else self.train_as_test
        return dataclasses.replace(
            self,
            train_set=sub(self.train_set, train.tolist()),
            val_set=sub(source, val.tolist()) if len(val) else None,
        )

    def split_size(self, split: str) -> int:
        """The number of images in `split`: train, val or test."""
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return 0 if sets[split] is None else len(sets[split])

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.train_set) // batch_size)

    def _loader(self, ds, batch_size: int, g: torch.Generator | None) -> Iterator[Batch]:  # noqa: ANN001
        """Batches of `batch_size` (global). On several processes, training: each rank
        streams its DistributedSampler shard (seeded by `g`; shards padded to equal length,
        as DDP needs) in batches of `batch_size / ranks`; testing: each rank its
        contiguous part of the set, nothing repeated, so that summed counts are exact."""
        sampler, w = None, self.world
        if w.active and g is None:
            ds = torch.utils.data.Subset(ds, range(len(ds))[w.shard(len(ds))])
        elif w.active:
            seed = int(torch.randint(2**31, (1,), generator=g))
            sampler = DistributedSampler(ds, w.size, w.rank, shuffle=True, seed=seed)
            batch_size //= w.size
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=g is not None and sampler is None,
            sampler=sampler,
            generator=g,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def shard_weight(self, step: int, batch_size: int, local: int) -> float:
        """1: DistributedSampler's shards, and so every step's parts, are of equal size."""
        return 1.0

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        g = epoch_generator(self.seed, epoch)
        view = EpochView(self.train_set, int(torch.randint(2**31, (1,), generator=g)))
        return self._loader(view, batch_size, g)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """The `split` ("val" or "test") in order (see `_loader`)."""
        if not self.split_size(split):
            return iter(())
        return self._loader(self.test_set if split == "test" else self.val_set, batch_size, None)


Data = TensorData | LoaderData
DATASETS: Registry[Data] = Registry("dataset")


def build_data(component, seed: int, device: torch.device) -> Data:  # noqa: ANN001
    """Load a validated dataset `Component` onto `device`, its validation split held out."""
    data = DATASETS.get(component.name).build(component.options, seed=seed, device=device)
    return data.hold_out(component.options.val_fraction, component.options.val_seed)
