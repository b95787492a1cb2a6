"""Image-folder datasets streamed by a DataLoader: `tinyimagenet` and `imagenet`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from oscbench.data.base import DATASETS, HeldOut, LoaderData, require
from oscbench.registry import check

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class FolderConfig(HeldOut):
    root: str  # the dataset's own folder (tiny-imagenet-200, or imagenet with train/ and val/)
    image_size: int  # training crop and test size (Tiny ImageNet: 64, ImageNet: 224)
    workers: int  # DataLoader worker processes

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.image_size >= 8, "image_size", self.image_size, ">= 8")
        check(self.workers >= 0, "workers", self.workers, ">= 0")


def _transforms(size: int, resize_test: bool) -> tuple:
    """torchvision's training and test transforms (imported here: torchvision takes seconds
    to import, and a run that reads no image folder should not wait for it)."""
    from torchvision import transforms

    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *norm]
    )
    test = (
        [transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size)]
        if resize_test
        else [transforms.Resize(size)]
    )
    return train, transforms.Compose([*test, *norm])


def _loader_data(train, test, test_tf, cfg: FolderConfig, seed: int, device) -> LoaderData:  # noqa: ANN001
    """The training folder `train` (an ImageFolder, augmented) and `test`; the training
    folder is also read with the test transform, for the held-out validation split."""
    from torchvision.datasets import ImageFolder

    as_test = ImageFolder(train.root, transform=test_tf)
    return LoaderData(
        train,
        test,
        len(train.classes),
        seed,
        device,
        cfg.workers,
        cfg.image_size,
        train_as_test=as_test,
    )


class FileList(torch.utils.data.Dataset):
    """(path, label) pairs read with torchvision's image loader."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:  # noqa: ANN001
        from torchvision.datasets.folder import default_loader

        self.samples, self.transform, self.load = samples, transform, default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(self.load(path)), label


@DATASETS.register("tinyimagenet", FolderConfig)
def tinyimagenet(cfg: FolderConfig, seed: int, device: torch.device) -> LoaderData:
    """Tiny ImageNet's own layout: train/<wnid>/images/*.JPEG, and val/images/*.JPEG with
    their classes in val/val_annotations.txt (file, wnid, box)."""
    root = Path(cfg.root)
    layout = (
        f"{root}/train/<wnid>/images/*.JPEG, {root}/val/images/*.JPEG and "
        f"{root}/val/val_annotations.txt"
    )
    how = "unpack http://cs231n.stanford.edu/tiny-imagenet-200.zip there"
    for part in ("train", "val/images", "val/val_annotations.txt"):
        require(root / part, "tinyimagenet", layout, how)
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = _transforms(cfg.image_size, resize_test=False)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    val = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        if line.strip():
            name, wnid = line.split("\t")[:2]
            val.append((str(root / "val" / "images" / name), train.class_to_idx[wnid]))
    return _loader_data(train, FileList(val, test_tf), test_tf, cfg, seed, device)


@DATASETS.register("imagenet", FolderConfig)
def imagenet(cfg: FolderConfig, seed: int, device: torch.device) -> LoaderData:
    """ImageNet as two ImageFolder trees: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG."""
    root = Path(cfg.root)
    for part in ("train", "val"):
        require(
            root / part,
            "imagenet",
            f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG",
            "download ILSVRC2012 from image-net.org and sort val/ into class folders "
            "(e.g. with the PyTorch examples' valprep.sh)",
        )
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = _transforms(cfg.image_size, resize_test=True)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    val = ImageFolder(str(root / "val"), transform=test_tf)
    if val.classes != train.classes:
        raise ValueError(f"imagenet: val/ and train/ under {root} have different class folders")
    return _loader_data(train, val, test_tf, cfg, seed, device)
