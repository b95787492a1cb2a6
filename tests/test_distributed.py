"""The distributed building blocks (oscbench/distributed.py) with gloo on 2 CPU processes."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oscbench.distributed import World, all_sum, broadcast, from_env, start


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_partition_every_batch(size):
    for n in range(0, 21):
        parts = [World(r, size).shard(n) for r in range(size)]
        items = [i for p in parts for i in range(n)[p]]
        assert items == list(range(n))  # disjoint, contiguous, in rank order
        lengths = [len(range(n)[p]) for p in parts]
        assert max(lengths) - min(lengths) <= 1


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert from_env() == World() and not from_env().active
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_env() == World(1, 2, 1) and not from_env().main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, out) -> None:  # noqa: ANN001
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    world = World(rank, 2, rank)
    start(world, torch.device("cpu"), timeout_s=30)
    decided = broadcast({"resume": rank == 0, "dir": f"from rank {rank}"}, world)
    total = all_sum(torch.tensor([rank + 1.0, 10.0 * rank]), world)
    out.put((rank, decided, total.tolist()))
    dist.destroy_process_group()


def test_rank_zero_decides_and_sums_reach_every_rank():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_collectives, args=(_free_port(), out), nprocs=2, start_method="spawn")
    got = sorted(out.get(timeout=60) for _ in range(2))
    assert [rank for rank, _, _ in got] == [0, 1]
    for _, decided, total in got:
        assert decided == {"resume": True, "dir": "from rank 0"}  # rank 0's, on both
        assert total == [3.0, 10.0]


def _tensor_data(augment: str):
    from oscbench.config import validate
    from oscbench.data.base import build_data
    from tests.conftest import compose_config

    name = "synthetic" if augment == "crop_flip" else "digits"
    extra = ["dataset.image_size=8", "dataset.train_size=50", "dataset.test_size=21"]
    spec = validate(compose_config([f"dataset={name}", *(extra if name == "synthetic" else [])]))
    data = build_data(spec.dataset, seed=3, device=torch.device("cpu"))
    return dataclasses.replace(data, augment=augment)


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_the_ranks_parts_of_a_batch_make_up_the_one_process_batch(augment):
    data = _tensor_data(augment)
    ranks = [dataclasses.replace(data, world=World(r, 2)) for r in range(2)]
    for batches in (
        lambda d: d.train_batches(epoch=1, batch_size=16),
        lambda d: d.test_batches(batch_size=8),
    ):
        whole = list(batches(data))
        parts = [list(batches(d)) for d in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole)
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
            assert abs(len(y0) - len(y1)) <= 1


def test_streamed_data_shards_training_and_splits_the_test_set_exactly():
    from oscbench.data.base import LoaderData

    ds = torch.utils.data.TensorDataset(torch.arange(23.0).view(23, 1), torch.arange(23))
    data = LoaderData(ds, ds, 23, seed=0, device=torch.device("cpu"), workers=0, image_size=1)
    ranks = [dataclasses.replace(data, world=World(r, 2)) for r in range(2)]
    tested = [int(y) for d in ranks for _, ys in d.test_batches(8) for y in ys]
    assert tested == list(range(23))  # each test image once: exact summed counts
    trained = [[int(y) for _, ys in d.train_batches(0, 8) for y in ys] for d in ranks]
    assert len(trained[0]) == len(trained[1]) == 12  # DistributedSampler's equal shards
    assert set(trained[0]) | set(trained[1]) == set(range(23))
    again = [int(y) for _, ys in ranks[0].train_batches(0, 8) for y in ys]
    assert again == trained[0]  # seeded by the epoch


def _torchrun(run_dir, *overrides):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "oscbench.run", *overrides, "device=cpu", f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_only_rank_zero_writes_and_prints(tmp_path):
    """One record, one checkpoint, one final model, one W&B offline run; one summary."""
    proc = _torchrun(tmp_path, "method=lsq", "bits=4", "trainer.epochs=2", "logger.mode=offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"results.json", "checkpoint.pt", "model_final.pt", "wandb"} <= set(names)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("record ") == 1
