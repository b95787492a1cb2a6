"""A sweep's parallel jobs spread over the visible GPUs (oscbench/gpus.py), tested on the CPU
with a given device count: the slots are file locks, which work the same without a GPU."""

import threading

from oscbench.gpus import gpu_slot, job_device
from tests.conftest import build_config


def _hold(root, count, per_gpu, got, ready, release):
    with gpu_slot(root, count, per_gpu, poll_s=0.01) as gpu:
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
