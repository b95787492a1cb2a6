"""A sweep's parallel jobs spread over the visible GPUs (oscbench/launch/gpus.py), tested on the CPU
with a given device count: the slots are file locks, which work the same without a GPU."""

import threading

import pytest

from oscbench.launch.gpus import gpu_slot, job_device
from oscbench.registry import ConfigError
from tests.conftest import build_config


def _hold(root, count, per_gpu, got, ready, release):
    with gpu_slot(root, count, per_gpu, poll_s=0.01) as (gpu,):
        got.append(gpu)
        ready.release()
        release.wait()


def test_jobs_fill_every_gpu_before_sharing_one_and_wait_for_a_free_slot(tmp_path):
    release, ready, got = threading.Event(), threading.Semaphore(0), []
    threads = []
    for _ in range(4):  # 2 GPUs x 2 jobs each: the four slots
        t = threading.Thread(target=_hold, args=(tmp_path, 2, 2, got, ready, release))
        t.start()
        ready.acquire()  # one at a time, so the order is the allocation order
        threads.append(t)
    assert got == [0, 1, 0, 1]  # the first slot of every GPU, then the second
    late = threading.Event()
    fifth: list[int] = []
    waiting = threading.Thread(target=lambda: _hold(tmp_path, 2, 2, fifth, ready, late))
    waiting.start()
    assert not ready.acquire(timeout=0.3) and fifth == []  # every slot is held: it waits
    release.set()  # the four jobs end
    assert ready.acquire(timeout=5) and fifth in ([0], [1])
    late.set()
    for t in [*threads, waiting]:
        t.join()


def test_a_job_of_a_sweep_is_pinned_to_its_slots_gpu(tmp_path):
    spec, _ = build_config(["device=auto"])
    with (
        job_device(spec, tmp_path, count=3) as first,
        job_device(spec, tmp_path, count=3) as second,
    ):
        assert (first.device, second.device) == ("cuda:0", "cuda:1")
    with job_device(spec, tmp_path, count=1) as single:  # one GPU (or none): as it is
        assert single.device == "auto"
    cpu, _ = build_config(["device=cpu"])
    with job_device(cpu, tmp_path, count=4) as pinned:
        assert pinned.device == "cpu"


def test_a_ddp_run_takes_one_gpu_per_process_on_different_gpus(tmp_path):
    with gpu_slot(tmp_path, 3, 2, need=2, poll_s=0.01) as first:
        assert first == [0, 1]
        with gpu_slot(tmp_path, 3, 2, need=2, poll_s=0.01) as second:
            assert second == [0, 2]  # GPU 2's first slot, then GPU 0's second
            got: list[list[int]] = []
            waiting = threading.Thread(
                target=lambda: got.append(_take(tmp_path, 3, 2, 3)), daemon=True
            )
            waiting.start()
            waiting.join(timeout=0.3)
            assert got == []  # two GPUs have a free slot: a run of three waits
        waiting.join(timeout=5)
        assert got == [[0, 1, 2]]
    with pytest.raises(ConfigError, match="needs 4 GPUs, but 3 are visible"):
        with gpu_slot(tmp_path, 3, 2, need=4):
            pass


def _take(root, count, per_gpu, need):
    with gpu_slot(root, count, per_gpu, need=need, poll_s=0.01) as gpus:
        return gpus


def test_every_rank_of_a_ddp_job_gets_its_own_gpu_of_rank_zeros_slots(tmp_path):
    from oscbench.distributed import World

    spec, _ = build_config(["device=auto"])
    with job_device(spec, tmp_path, World(0, 1, 0, 1), count=2) as one:
        assert one.device == "cuda:0"
    two_nodes = World(0, 4, 0, 2)  # several nodes: SLURM gave each node its GPUs
    with job_device(spec, tmp_path, two_nodes, count=2) as pinned:
        assert pinned.device == "auto"
