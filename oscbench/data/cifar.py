"""`cifar10`, `cifar100`: torchvision's CIFAR readers, held on the device as uint8 tensors."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from oscbench.data.base import DATASETS, HeldOut, TensorData, require

STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


@dataclass
class CifarConfig(HeldOut):
    root: str  # the folder that holds cifar-10-batches-py / cifar-100-python
    download: bool  # use torchvision's downloader (needs the internet)
    augment: bool  # pad-4 random crop + horizontal flip, on the device
    verify: bool  # check the archive's MD5 sums (torchvision); false: only that the files exist


def _reader(cls: type, verify: bool) -> type:
    """torchvision's reader, or one that trusts the files present (no MD5 sums)."""
    if verify:
        return cls

    class Unverified(cls):
        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return Unverified


def _load(name: str, cfg: CifarConfig, seed: int, device: torch.device) -> TensorData:
    from torchvision import datasets  # imported here: it takes seconds, and only CIFAR needs it

    root = Path(cfg.root)
    if not cfg.download:
        require(
            root / FOLDER[name],
            name,
            f"{root}/{FOLDER[name]}/ with the python-pickled batches of the official archive",
            f"get it with dataset.download=true (needs the internet) or unpack "
            f"https://www.cs.toronto.edu/~kriz/{ARCHIVE[name]} into {root}",
        )
    reader = _reader(getattr(datasets, name.upper()), cfg.verify)
    train = reader(str(root), train=True, download=cfg.download)
    test = reader(str(root), train=False, download=cfg.download)

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N, 3, 32, 32 uint8
        return x.to(device), torch.tensor(ds.targets, dtype=torch.long, device=device)

    (xtr, ytr), (xte, yte) = tensors(train), tensors(test)
    mean, std = STATS[name]
    return TensorData(
        xtr,
        ytr,
        xte,
        yte,
        num_classes=len(train.classes),
        seed=seed,
        mean=mean,
        std=std,
        augment="crop_flip" if cfg.augment else "none",
    )


@DATASETS.register("cifar10", CifarConfig)
def cifar10(cfg: CifarConfig, seed: int, device: torch.device) -> TensorData:
    return _load("cifar10", cfg, seed, device)


@DATASETS.register("cifar100", CifarConfig)
def cifar100(cfg: CifarConfig, seed: int, device: torch.device) -> TensorData:
    return _load("cifar100", cfg, seed, device)
