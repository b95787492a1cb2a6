"""The distributed building blocks (oscbench/distributed.py) with gloo on 2 CPU processes."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from oscbench.distributed import World, all_sum, broadcast, from_env, start
from oscbench.records.runs import RESULTS


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_partition_every_batch(size):
    for n in range(0, 21):
        parts = [World(r, size).shard(n) for r in range(size)]
        items = [i for p in parts for i in range(n)[p]]
        assert items == list(range(n))  # disjoint, contiguous, in rank order
        lengths = [len(range(n)[p]) for p in parts]
        assert max(lengths) - min(lengths) <= 1


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert from_env() == World() and not from_env().active
    os.environ |= {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert from_env() == World(1, 4, 1, 2) and not from_env().main


def test_the_world_comes_from_a_submitit_job_of_several_tasks(monkeypatch):
    job = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242"}
    monkeypatch.setattr(os, "environ", dict(job))
    assert from_env() == World()  # one task: one process
    os.environ |= {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1"}
    os.environ |= {"SUBMITIT_LOCAL_LOCALID": "1"}
    assert from_env() == World(1, 2, 1, 2)
    port = int(os.environ["MASTER_PORT"])  # from the job id: the same for every task
    assert 20000 <= port <= 60000 and os.environ["MASTER_ADDR"]


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
    from oscbench.data.base import build_data
    from oscbench.launch.config import validate
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
        lambda d: d.eval_batches("test", batch_size=8),
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
    tested = [int(y) for d in ranks for _, ys in d.eval_batches("test", 8) for y in ys]
    assert tested == list(range(23))  # each test image once: exact summed counts
    trained = [[int(y) for _, ys in d.train_batches(0, 8) for y in ys] for d in ranks]
    assert len(trained[0]) == len(trained[1]) == 12  # DistributedSampler's equal shards
    assert set(trained[0]) | set(trained[1]) == set(range(23))
    again = [int(y) for _, ys in ranks[0].train_batches(0, 8) for y in ys]
    assert again == trained[0]  # seeded by the epoch


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return env | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def _torchrun(run_dir, *overrides, script=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script)] if script else ["-m", "oscbench.run"]
    cmd += [*overrides, "device=cpu", f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def _one_process_paths(root, *overrides) -> list[dict]:
    """The records of one process run on each CPU path (vector widths default, avx2, the
    machine's own), one thread each, side by side."""
    cmd = [sys.executable, "-m", "oscbench.run", *overrides, "device=cpu"]
    procs = []
    for cap in ("default", "avx2", None):
        env = _env(**({"ATEN_CPU_CAPABILITY": cap} if cap else {}))
        run_dir = root / (cap or "native")
        out = [*cmd, f"hydra.run.dir={run_dir}"]
        procs.append((run_dir, subprocess.Popen(out, stderr=subprocess.PIPE, text=True, env=env)))
    for _, proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    return [json.loads((run_dir / "results.json").read_text()) for run_dir, _ in procs]


SMALL = ["dataset=synthetic", "dataset.image_size=8", "dataset.train_size=128"]  # quick epochs


def _patched(tmp_path, code: str) -> Path:
    """A script that runs oscbench.run after `code` (a test's deliberate fault on one rank)."""
    script = tmp_path / "patched_run.py"
    script.write_text(f"import os, signal\n{code}\nfrom oscbench.run import main\nmain()\n")
    return script


def test_only_rank_zero_writes_and_prints_in_rank_zeros_directory(tmp_path):
    """One record, one checkpoint, one final model, one W&B offline run, one summary: in rank
    0's directory, even where the ranks' Hydra chose different ones (a timestamp a second
    apart; here each rank's sweep directory is named by its rank). OFQ's last epoch is
    CGA's, under check_sync: its masks are bit-identical on both ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "oscbench.run", "-m", "method=ofq", "bits=2", "trainer.epochs=1"]
    cmd += ["trainer.extra_epochs=1", "trainer.check_sync=true"]  # CGA's masks: identical
    cmd += SMALL
    cmd += ["logger.mode=offline", "device=cpu", f"hydra.sweep.dir={tmp_path}/" + "${oc.env:RANK}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = (tmp_path / "0").rglob("results.json")
    names = {p.name for p in record.parent.iterdir()}
    assert {"results.json", "checkpoint.pt", "model_final.pt", "wandb"} <= names
    assert len(list((record.parent / "wandb").glob("offline-run-*"))) == 1
    assert json.loads(record.read_text())["machine"]["processes"] == 2
    written = {p.name for p in (tmp_path / "1").rglob("*") if p.is_file()}
    assert not written & {"results.json", "checkpoint.pt", "model_final.pt"}
    assert proc.stdout.count("epoch 2/2") == 1 and proc.stdout.count("record ") == 1


SLOW_RECORD = """
import time
import oscbench.records.record as record
_finish = record.Recorder.finish
def finish(self, final):
    if self.writes:
        time.sleep(3)  # rank 0 writes the fp run's record after rank 1 has finished it
    _finish(self, final)
record.Recorder.finish = finish
"""


def test_two_processes_train_the_missing_fp_run_together_then_the_run_that_needs_it(tmp_path):
    """`init_from=fp` and `teacher=fp` on 2 processes with no fp run yet (every paper
    recipe asks for both): rank 0 looks for the fp run and both ranks follow its answer, so
    they train it together and then the quantized run from it. Each rank looking on its own,
    rank 1 looked before rank 0 had written the fp run's record (here, 3 s late), found none,
    and the ranks fell out of step until the collective timeout."""
    script = _patched(tmp_path, SLOW_RECORD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), "method=lsq", "bits=2", "trainer.epochs=1", *SMALL]
    cmd += ["init_from=fp", "teacher=fp", "distill.loss=soft", "trainer.dist_timeout_s=30"]
    cmd += ["logger=none", "device=cpu", f"hydra.run.dir={tmp_path}/lsq/run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r.parent.parent.name: json.loads(r.read_text()) for r in tmp_path.rglob(RESULTS)}
    assert sorted(records) == ["fp", "lsq"]
    assert all(r["status"] == "completed" for r in records.values())
    assert all(r["machine"]["processes"] == 2 for r in records.values())
    fp_dir = str(next((tmp_path / "fp").iterdir()))
    assert records["lsq"]["final"]["init"]["from"] == fp_dir == records["lsq"]["final"]["teacher"]
    assert proc.stdout.count("init_from=fp and teacher=fp: no completed fp run yet") == 1


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path):
    """Checked before the process group forms: rank 0 of 2, alone, is refused."""
    cmd = [sys.executable, "-m", "oscbench.run", "trainer.batch_size=63", "device=cpu"]
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trainer.batch_size=63 is the global batch" in proc.stderr + proc.stdout
    assert "pick a multiple of 2" in proc.stderr + proc.stdout


def _global_batch_norm(rank: int, port: int, x, out) -> None:  # noqa: ANN001
    from oscbench.training.batchnorm import GlobalBatchNorm2d

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    world = World(rank, 2, rank)
    start(world, torch.device("cpu"), timeout_s=30)
    bn = GlobalBatchNorm2d(x.shape[1], momentum=0.3).double()
    mine = x[world.shard(len(x))].clone().requires_grad_(True)
    weights = torch.linspace(-1, 2, mine.numel(), dtype=torch.float64).view_as(mine)
    (bn(mine) * weights).sum().backward()  # the global loss is the sum of the ranks' parts
    grads = [all_sum(p.grad.clone(), world) for p in (bn.weight, bn.bias)]
    sent = [mine.grad, *grads, bn.running_mean, bn.running_var]
    out.put((rank, *[t.detach().numpy() for t in sent]))  # by value: the process ends next
    dist.destroy_process_group()


@pytest.mark.numeric
def test_global_batch_norm_normalises_and_back_propagates_as_one_batch():
    """In float64, with an uneven split (5 + 4 images): outputs' gradients, the affine
    parameters' summed gradients and the running statistics equal BatchNorm2d's on the
    whole batch. Rounding: each value is a sum of at most n = 9*4*4 = 144 terms of size
    |x|*|w| <= 20, an error of at most 144 * 20 * 144 * eps64 < 1e-9; a wrong statistic
    (a rank's own, a missed term of the gradient) is off by more than 1e-3."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_global_batch_norm, args=(_free_port(), x, out), nprocs=2)
    got = sorted((out.get(timeout=60) for _ in range(2)), key=lambda r: r[0])
    got = [[torch.from_numpy(a) for a in rest] for _, *rest in got]
    ref = nn.BatchNorm2d(3, momentum=0.3).double()
    whole = x.clone().requires_grad_(True)
    weights = torch.cat(
        [torch.linspace(-1, 2, n * 48, dtype=torch.float64).view(n, 3, 4, 4) for n in (5, 4)]
    )
    (ref(whole) * weights).sum().backward()
    tol = {"rtol": 0, "atol": 1e-9}
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), whole.grad, **tol)
    for _, weight, bias, mean, var in got:
        torch.testing.assert_close((weight, bias), (ref.weight.grad, ref.bias.grad), **tol)
        torch.testing.assert_close((mean, var), (ref.running_mean, ref.running_var), **tol)


EQUIVALENT = {
    "lsq W4A4": ("method=lsq", "bits=4"),
    "lsq_freeze W2A2": ("method=lsq_freeze", "bits=2"),
}
THREE_EPOCHS = ("trainer.epochs=3", "trainer.sync_bn=true", "logger=none")


def _numbers(record: dict) -> dict[str, float]:
    out = {f"acc {k}": record["final"][k] for k in ("acc", "acc_bn")}
    for h in record["history"]:
        out |= {
            f"epoch {h['epoch']} {k}": h[k]
            for k in ("train_loss", "train_acc", "val_loss", "val_acc")
        }
    return out


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Each EQUIVALENT configuration trained 3 epochs on 2 processes, with check_sync on."""
    root = tmp_path_factory.mktemp("two_process")
    runs = {}
    for name, overrides in EQUIVALENT.items():
        run_dir = root / name.replace(" ", "_")
        proc = _torchrun(run_dir, *overrides, *THREE_EPOCHS, "trainer.check_sync=true")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (run_dir, json.loads((run_dir / "results.json").read_text()))
    return runs


@pytest.mark.parametrize("name", EQUIVALENT)
def test_two_processes_train_as_one_within_the_spread_that_rounding_alone_gives(
    tmp_path, two_process_runs, name
):
    """Global batch 64 on 2 processes (32 each, BatchNorm over the global batch) against
    one process at 64, 3 epochs. They differ only in the order of sums (gradients and
    statistics added up over the ranks): without quantizers, one epoch agrees to 1e-6 of the
    loss. A quantized net amplifies any rounding difference (an activation or weight code
    flips at its threshold and changes the next step), so the float tolerance is what
    rounding alone gives: one process on each CPU path (vector widths default, avx2, the
    machine's own) spans [lo, hi] of width w for every number, and the 2-process run must
    lie within [lo - 3m, hi + 3m], m = max(w, floor). The floor, where three paths happen to
    agree closely: two images for accuracies, 1 % of a loss, the size to which a rounding
    difference grows in these 3 epochs (2-process runs on the three paths differ from each
    other by up to 1.2 % of a loss; with one image, lsq_freeze W2A2's 2-process acc_bn once
    fell exactly on the bound, 96.39 against 97.22-97.50 %). A semantic fault is larger:
    BatchNorm over each rank's half (sync_bn=false) raises epochs 2-3's training loss by
    10 %, outside the bound.
    Trainer.check_sync was on: the ranks' states were bit-identical after every epoch."""
    _, two = two_process_runs[name]
    ones = _one_process_paths(tmp_path, *EQUIVALENT[name], *THREE_EPOCHS)
    image = {"val_acc": 100 / 144, "acc": 100 / 360, "acc_bn": 100 / 360, "train_acc": 100 / 1293}
    lines = []
    for key, value in _numbers(two).items():
        paths = [_numbers(r)[key] for r in ones]
        lo, hi = min(paths), max(paths)
        floor = next((2 * q for k, q in image.items() if key.endswith(k)), 0.01 * abs(value))
        margin = 3 * max(hi - lo, floor)
        lines.append(f"{name} {key}: 2 processes {value:.5f}, one process {lo:.5f}..{hi:.5f}")
        assert lo - margin <= value <= hi + margin, lines[-1]
    print("\n".join(lines))


def test_check_sync_fails_a_run_whose_ranks_differ(tmp_path):
    """Rank 1's tracker moved by one ulp in one weight's frequency: the run stops with the
    differing entry named, on every rank, with a non-zero exit."""
    script = _patched(
        tmp_path,
        """import torch, oscbench.training.loop as t
real = t.check_sync
def check_sync(state, world, epoch):
    if world.rank == 1:
        freq = next(v for k, v in state["tracker"].items() if k.endswith("freq"))
        freq.view(-1)[0] = torch.nextafter(freq.view(-1)[0], torch.tensor(1.0))
    real(state, world, epoch)
t.check_sync = check_sync""",
    )
    proc = _torchrun(
        tmp_path / "run",
        "trainer.epochs=2",
        "logger=none",
        "trainer.check_sync=true",
        *SMALL,
        script=script,
    )
    assert proc.returncode != 0
    assert "trainer.check_sync: after epoch 1 the ranks' states differ" in proc.stderr
    assert "rank 1: tracker." in proc.stderr and "freq" in proc.stderr


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_a_killed_rank_ends_the_run_and_the_same_command_resumes_it(tmp_path, two_process_runs):
    """Two processes started as SLURM starts them (no torchrun agent to clean up): rank 1
    is killed (SIGKILL) in epoch 2; rank 0 exits non-zero well within the collective timeout.
    Rerunning the command resumes from epoch 1's checkpoint on both ranks and ends with the
    same numbers as the uninterrupted run."""
    run_dir = tmp_path / "run"
    overrides = [*EQUIVALENT["lsq W4A4"], *THREE_EPOCHS, "trainer.check_sync=true"]
    script = _patched(
        tmp_path,
        """import oscbench.training.loop as t
real, calls = t.evaluate, []
def evaluate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
t.evaluate = evaluate""",
    )
    port = str(_free_port())
    cmd = [sys.executable, str(script), *overrides, "trainer.dist_timeout_s=60", "device=cpu"]
    begun = time.monotonic()
    ranks = [
        subprocess.Popen(
            [*cmd, f"hydra.run.dir={run_dir}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(2)
    ]
    codes = [p.wait(timeout=300) for p in ranks]
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert time.monotonic() - begun < 60
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    status = json.loads((run_dir / "results.json").read_text())["status"]
    assert saved["epoch"] == 1 and status != "completed", status
    proc = _torchrun(run_dir, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout
    resumed = json.loads((run_dir / "results.json").read_text())
    _, whole = two_process_runs["lsq W4A4"]
    untimed = [
        {k: v for k, v in r["final"].items() if k != "wall_time_s"} for r in (resumed, whole)
    ]
    assert untimed[0] == untimed[1] and _numbers(resumed) == _numbers(whole)


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_a_submitit_sweep_with_two_tasks_per_node_trains_each_job_on_two_processes(tmp_path):
    """hydra/launcher=submitit_local, as hydra/launcher=slurm: rank and world come from
    submitit's job environment; each job is one 2-process run with one record."""
    cmd = [sys.executable, "-m", "oscbench.run", "-m", "hydra/launcher=submitit_local"]
    cmd += ["hydra.launcher.tasks_per_node=2", "seed=0,1", "trainer.epochs=1", "logger=none"]
    cmd += ["device=cpu", "trainer.check_sync=true", f"hydra.sweep.dir={tmp_path}"]
    cmd += SMALL
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted(tmp_path.rglob("results.json"))
    assert len(records) == 2
    for path in records:
        record = json.loads(path.read_text())
        assert record["machine"]["processes"] == 2 and len(record["history"]) == 1
