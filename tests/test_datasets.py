"""Each loader reads a tiny data set written in its real on-disk layout; missing data gives
a clear error that says where it looked."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from oscbench.data.base import DataNotFound, build_data, crop_flip
from oscbench.launch.config import validate
from tests.conftest import compose_config

CPU = torch.device("cpu")


def _data(overrides):
    spec = validate(compose_config(overrides))
    return build_data(spec.dataset, seed=0, device=CPU)


def _write_cifar(root, name):
    """CIFAR's python layout: pickled dicts of uint8 rows (3072 = 3 x 32 x 32) and labels
    (str keys, as Python 2 pickles read with latin1 give)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, label_key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "labels",
        )
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
        test_file, classes = "test_batch", 10
    else:
        folder, files, label_key = root / "cifar-100-python", ["train"], "fine_labels"
        meta_file, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
        test_file, classes = "test", 100
    folder.mkdir(parents=True)
    for fname in [*files, test_file]:
        batch = {
            "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, 6).tolist(),
        }
        (folder / fname).write_bytes(pickle.dumps(batch))
    (folder / meta_file).write_bytes(pickle.dumps(meta))
    return len(files) * 6, classes


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_pickled_batches(tmp_path, name):
    n_train, classes = _write_cifar(tmp_path, name)
    data = _data([f"dataset={name}", f"data_dir={tmp_path}", "dataset.verify=false"])
    assert data.x_train.shape[1:] == (3, 32, 32) and data.x_train.dtype == torch.uint8
    held = -(-n_train // 10)  # dataset.val_fraction=0.1 of the training images
    assert len(data.x_train) == n_train - held and len(data.x_val) == held
    assert data.num_classes == classes and len(data.x_test) == 6
    x, y = next(data.train_batches(0, 4))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    raw = data.x_test[:2].float() / 255
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(next(data.eval_batches("test", 2))[0], (raw - mean) / std)


def test_cifar_checks_md5_by_default(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    with pytest.raises(RuntimeError, match="corrupted"):
        _data(["dataset=cifar10", f"data_dir={tmp_path}"])


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = crop_flip(x, 2, g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        win = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6]
        torch.testing.assert_close(out[i], win.flip(-1) if flip[i] else win)


def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_tinyimagenet_reads_train_folders_and_val_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    for c, wnid in enumerate(wnids):
        for i in range(3):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 10 * c + i)
    lines = []
    for i, wnid in enumerate(["n01629819", "n01443537", "n01629819"]):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", 100 + i)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids))
    data = _data(["dataset=tinyimagenet", f"data_dir={tmp_path}", "dataset.workers=0"])
    assert data.num_classes == 2 and data.steps_per_epoch(4) == 2
    x, y = next(data.train_batches(0, 4))
    assert x.shape == (4, 3, 64, 64)
    xs, ys = zip(*data.eval_batches("test", 8), strict=True)
    assert ys[0].tolist() == [1, 0, 1]  # classes from val_annotations.txt, indexed as train/
    assert xs[0].shape == (3, 3, 64, 64)


def test_imagenet_reads_train_and_val_image_folders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(["n01", "n02", "n03"]):
            for i in range(n):
                _jpeg(tmp_path / "imagenet" / split / wnid / f"{i}.JPEG", 7 * c + i)
    args = ["dataset=imagenet", f"data_dir={tmp_path}", "dataset.workers=0"]
    data = _data([*args, "dataset.image_size=32", "dataset.val_fraction=0.33"])
    assert data.num_classes == 3
    x, y = next(data.train_batches(0, 9))
    assert x.shape == (6, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    (x, y), *rest = data.eval_batches("val", 9)  # one training image per class, held out
    assert x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2] and not rest
    assert data.val_set.dataset.transform is data.test_set.transform  # read as the test set is
    assert sum(len(y) for _, y in data.eval_batches("test", 4)) == 6


def test_loader_batches_are_the_same_for_the_same_epoch(tmp_path):
    for c in range(2):
        for i in range(4):
            _jpeg(tmp_path / "imagenet" / "train" / f"n{c}" / f"{i}.JPEG", 3 * c + i)
            _jpeg(tmp_path / "imagenet" / "val" / f"n{c}" / f"{i}.JPEG", 3 * c + i)
    data = _data(
        ["dataset=imagenet", f"data_dir={tmp_path}", "dataset.workers=0", "dataset.image_size=16"]
    )
    a = [x for x, _ in data.train_batches(3, 4)]
    torch.manual_seed(123)  # what else ran before must not matter
    b = [x for x, _ in data.train_batches(3, 4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], next(data.train_batches(4, 4))[0])


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tinyimagenet", "val_annotations.txt"),
        ("imagenet", "val/<wnid>/*.JPEG"),
    ],
)
def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, name, needle):
    with pytest.raises(DataNotFound) as err:
        _data([f"dataset={name}", f"data_dir={tmp_path}"])
    msg = str(err.value)
    assert str(tmp_path) in msg and needle in msg and "data_dir" in msg


def test_missing_data_fails_the_command_before_training(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oscbench.run",
            "dataset=cifar10",
            f"data_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OSCBENCH_DATA": "/nonexistent"},
    )
    assert proc.returncode == 2
    assert f"nothing at {tmp_path}/cifar-10-batches-py" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_data_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("OSCBENCH_DATA", str(tmp_path))
    assert compose_config(["dataset=cifar10"]).dataset.root == str(tmp_path)


def test_glyphs_are_rendered_offline_the_same_for_every_run_and_as_many_as_asked():
    small = ["dataset=glyphs", "dataset.train_size=300", "dataset.test_size=500"]
    a, b = _data(small), _data([*small, "seed=7"])
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (270, 30, 500)
    assert a.x_test.shape[1:] == (1, 16, 16)
    for split in ("x_train", "x_val", "x_test"):  # fixed by task_seed, not the run's seed
        assert torch.equal(getattr(a, split), getattr(b, split))
    other = _data([*small, "dataset.task_seed=1"])
    assert not torch.equal(a.x_test, other.x_test)
    assert set(a.y_test.tolist()) == set(range(10))
    from oscbench.data.glyphs import base_glyphs, fonts

    glyphs = base_glyphs()
    assert glyphs.shape == (len(fonts()), 10, 32, 32) and len(fonts()) == 21
    ink = glyphs.flatten(2).sum(-1)
    assert (ink > 20).all()  # every font draws every digit
    flat = glyphs.flatten(0, 1).flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1).min() > 0  # no two alike
