"""What quantization and oscillation tracking cost: `make bench` (not part of `make test`).

Measures, in one process on the CPU (torch.utils.benchmark, median of repeated blocks):
the training step (forward, backward, optimizer, policies, tracker) of FP and of every
method preset at 4 and 2 bits, as a ratio to FP, on cnn_small (a digits batch of 64) and on
resnet18 with the CIFAR stem (batch 32, 32x32); the tracker's share of a step and its state
in bytes per tracked weight; oscbench's LSQ forward+backward against PyTorch's fused
`_fake_quantize_learnable_per_tensor_affine`; the peak memory of a step, FP vs QAT (fresh
processes, resident set size); the export of resnet18 to ONNX and its inference in
onnxruntime. Each method's step is timed against a fresh FP twin,
alternating for `--rounds` rounds, and its ratio is the median method time over the median
FP time of those rounds, so that drift of the machine during the run does not enter it.
Writes bench/results.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode

from oscbench.distributed import World, start
from oscbench.launch.build import build
from oscbench.launch.compose import compose, presets
from oscbench.launch.config import validate
from oscbench.quant.lsq import lsq_quantize
from oscbench.training.accel import Accel
from oscbench.training.loop import compiled, train_step
from oscbench.training.optim import build_optimizers

HERE = Path(__file__).resolve().parent
METHODS = [p.name for p in presets() if p.name != "fp"]  # each against its FP twin
MODELS = {
    "cnn_small": ["model=cnn_small", "dataset=digits", "trainer.batch_size=64"],
    "resnet18_cifar": [
        "model=resnet18",
        "model.stem=cifar",
        "dataset=synthetic",
        "dataset.image_size=32",
        "dataset.train_size=64",
        "dataset.test_size=32",
        "trainer.batch_size=32",
    ],
}


def late_step(steps: int, period: int = 200) -> int:
    """The step that every timed step repeats: late in training (from 70 %), where every
    policy's schedule is on, and one past a multiple of `period`, OsciReset's default,
    inside its tracking window (its costliest steps, 50 of every 200)."""
    return math.ceil(0.7 * steps / period) * period + 1


def setup(  # noqa: ANN201
    model: str,
    method: str,
    bits: int,
    extra: tuple[str, ...] = (),
    compile_layout: bool | None = None,
    world: World = World(),  # noqa: B008
    device: str = "cpu",
):
    """A built run and a closure that performs one real training step: under torch.compile
    unless `compile_layout` is None (with Inductor's layout optimization on or off), this
    rank's part of the batch and DDP when `world` has several processes."""
    cfg = compose(
        [
            *MODELS[model],
            f"method={method}",
            f"bits={bits}",
            "logger=none",
            f"device={device}",
            "trainer.epochs=1000",
            f"trainer.compile={compile_layout is not None}",  # its deterministic settings
            *extra,
        ]
    )
    spec = validate(cfg)
    built = build(spec)
    steps = spec.trainer.epochs * built.data.steps_per_epoch(spec.trainer.batch_size)
    opt = build_optimizers(built.model, spec.trainer, steps)
    x, y = next(built.data.train_batches(0, spec.trainer.batch_size))
    part = world.shard(len(y))
    x, y = x[part], y[part]
    built.model.train()
    at = late_step(steps)
    accel = Accel.resolve(spec.trainer, built.data.device)  # CUDA: bf16, channels_last
    if accel.channels_last:
        built.model.to(memory_format=torch.channels_last)
    forward = built.model
    if world.active:
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    if compile_layout is not None:
        forward = compiled(forward, layout_optimization=compile_layout)

    def run_step(i: int) -> None:
        train_step(
            built.model,
            forward,
            x,
            y,
            opt,
            built.policies,
            built.tracker,
            accel,
            i,
            steps,
            built.objective,
        )

    run_step(at - 1)  # a step at a multiple of the period opens OsciReset's window

    def step() -> None:
        run_step(at)

    return built, step


def median_time(fn, min_run_time: float) -> float:  # noqa: ANN001
    fn()  # warm-up
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def step_times(min_run_time: float, rounds: int, methods: list[str] | None = None) -> dict:
    """Each method (`methods`, by default every preset) against its own FP twin,
    alternating for `rounds` rounds; only those two models exist at a time, as in a real
    run, so that one configuration's memory does not slow another's."""
    out = {}
    for model in MODELS:
        rows: dict[str, dict] = {}
        fp_all: list[float] = []
        for bits in (4, 2):
            for method in methods or METHODS:
                pair = {"fp": setup(model, "fp", 4)[1], "method": setup(model, method, bits)[1]}
                times: dict[str, list[float]] = {"fp": [], "method": []}
                for _ in range(rounds):
                    for key, step in pair.items():
                        times[key].append(median_time(step, min_run_time))
                fp, t = statistics.median(times["fp"]), statistics.median(times["method"])
                fp_all += times["fp"]
                rows[f"{method}@{bits}"] = {
                    "seconds": t,
                    "ratio": t / fp,
                    "round_ratios": [
                        m / f for m, f in zip(times["method"], times["fp"], strict=True)
                    ],
                }
                del pair
        out[model] = {"fp": {"seconds": statistics.median(fp_all), "ratio": 1.0}, **rows}
        print(model, {k: round(v["ratio"], 2) for k, v in out[model].items()}, flush=True)
    return out


def teacher_cost(min_run_time: float, rounds: int) -> dict:
    """A distilled step (distill.loss=soft, a frozen FP teacher of the same model: its
    forward under no_grad) against the same step without a teacher, LSQ W4A4, alternating."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            weights = Path(tmp) / f"{model}.pt"
            torch.save(setup(model, "fp", 4)[0].model.state_dict(), weights)
            kd = (f"teacher={weights}", "distill.loss=soft")
            pair = {"plain": setup(model, "lsq", 4)[1], "teacher": setup(model, "lsq", 4, kd)[1]}
            times: dict[str, list[float]] = {"plain": [], "teacher": []}
            for _ in range(rounds):
                for key, step in pair.items():
                    times[key].append(median_time(step, min_run_time))
            plain, t = statistics.median(times["plain"]), statistics.median(times["teacher"])
            out[model] = {"plain_s": plain, "teacher_s": t, "ratio": t / plain}
            print("teacher", model, round(t / plain, 2), flush=True)
    return out


def compile_cost(min_run_time: float, rounds: int) -> dict:
    """resnet18-CIFAR, FP and LSQ W4A4: the eager step against the step whose model runs
    under torch.compile as trainer.compile does (Inductor's layout optimization off) and
    under torch.compile's defaults (on), alternating rounds."""
    variants = {
        "fp eager": ("fp", None),
        "fp compiled": ("fp", False),
        "lsq eager": ("lsq", None),
        "lsq compiled": ("lsq", False),
        "lsq compiled, layout optimization on": ("lsq", True),
    }
    steps = {
        k: setup("resnet18_cifar", m, 4, compile_layout=c)[1] for k, (m, c) in variants.items()
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(median_time(step, min_run_time))
    out = {k: {"seconds": statistics.median(v)} for k, v in times.items()}
    print("compile", {k: round(v["seconds"] * 1e3, 1) for k, v in out.items()}, flush=True)
    return out


def gpu_throughput(min_run_time: float, rounds: int) -> dict:
    """Images/s of a training step on one GPU, resnet18-CIFAR at batch 256 (bf16 autocast,
    channels_last: trainer's auto on CUDA), FP and LSQ W4A4, with trainer.compile off and on."""
    extra = ("trainer.batch_size=256", "dataset.train_size=256")
    steps = {
        f"{method} {'compiled' if c is not None else 'eager'}": setup(
            "resnet18_cifar", method, 4, extra, compile_layout=c, device="cuda"
        )[1]
        for method in ("fp", "lsq")
        for c in (None, False)
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(median_time(step, min_run_time))
    out = {k: {"images_per_s": 256 / statistics.median(v)} for k, v in times.items()}
    out["device"] = torch.cuda.get_device_name()
    print("gpu", out, flush=True)
    return out


def _ddp_child(rank: int, size: int, port: int, model: str, min_run_time: float, out) -> None:  # noqa: ANN001
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank)}
    torch.set_num_threads(1)
    world = World(rank, size, rank, size)
    start(world, torch.device("cpu"), timeout_s=600)
    _, step = setup(model, "lsq", 4, world=world)
    seconds = median_time(step, min_run_time)
    if rank == 0:
        out.put(seconds)
    torch.distributed.destroy_process_group()


def ddp_cost(min_run_time: float) -> dict:
    """LSQ W4A4 at the same global batch: a step on 2 processes (gloo, 1 thread each, with
    DDP's all-reduce) against 1 process with 1 and with 2 threads. For the record: 2 cores
    cannot show how a run scales."""
    import socket

    import torch.multiprocessing as mp

    out = {}
    for model in MODELS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").Queue()
        mp.start_processes(_ddp_child, args=(2, port, model, min_run_time, queue), nprocs=2)
        two = queue.get()
        threads = torch.get_num_threads()
        _, step = setup(model, "lsq", 4)
        one = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            one[n] = median_time(step, min_run_time)
        torch.set_num_threads(threads)
        out[model] = {
            "two_processes_s": two,
            "one_process_1_thread_s": one[1],
            "one_process_2_threads_s": one[2],
        }
        print("ddp", model, {k: round(v * 1e3, 1) for k, v in out[model].items()}, flush=True)
    return out


def tracker_cost(min_run_time: float) -> dict:
    built, step = setup("resnet18_cifar", "lsq", 4)
    total = median_time(step, min_run_time)
    tracker = median_time(built.tracker.update, min_run_time)
    weights = built.tracker.total

    def per_weight(buffers: Iterable[torch.Tensor]) -> float:
        return sum(b.numel() * b.element_size() for b in buffers) / weights

    saved = {id(v) for v in built.tracker.state_dict(keep_vars=True).values()}
    flat = [b for b in built.tracker.buffers(recurse=False) if b.numel() == weights]
    kept = [b for b in flat if id(b) in saved]
    return {
        "step_s": total,
        "tracker_s": tracker,
        "share": tracker / total,
        "bytes_per_weight": per_weight(kept),  # oscillation (issue 7)
        # the code and count at the epoch's start, for the stuck share (issue 28): not saved
        "epoch_start_bytes_per_weight": per_weight(b for b in flat if id(b) not in saved),
        "movement_bytes_per_weight": per_weight(m.previous for m in built.tracker.moves),
        "tracked_weights": weights,
    }


class _OpCount(TorchDispatchMode):
    """Counts the ATen ops that reach a kernel (views and other metadata-only ops left
    out): on a GPU each is a kernel launch or a host-side op of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not func.is_view and func.overloadpacket not in _METADATA:
            self.n += 1
        return func(*args, **(kwargs or {}))


_METADATA = {torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten.alias}


def export_cost(min_run_time: float) -> dict:
    """resnet18-CIFAR, LSQ W4A4 (issue 28): seconds to export it to ONNX (`oscbench.deploy.onnx`:
    the integer twin, torch.onnx's exporter, the graph without the codes) and to load it
    into onnxruntime; a batch of 32 in onnxruntime against the fake-quantized model."""
    from oscbench.deploy.onnx import deployed, logits_only, session, to_onnx

    built, _ = setup("resnet18_cifar", "lsq", 4)
    model = built.model.eval()
    x = next(built.data.train_batches(0, 32))[0]
    start = time.perf_counter()
    onnx_model = logits_only(to_onnx(deployed(model), x[:2]))
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    sess = session(onnx_model, optimized=True)
    load_s = time.perf_counter() - start
    feed = {"input": x.numpy()}
    with torch.no_grad():
        simulated = median_time(lambda: model(x), min_run_time)
    onnx = median_time(lambda: sess.run(None, feed), min_run_time)
    return {
        "export_s": export_s,
        "load_s": load_s,
        "onnx_mb": len(onnx_model) / 2**20,
        "batch32_onnxruntime_s": onnx,
        "batch32_simulated_s": simulated,
    }


def ops_per(fn: Callable[[], None]) -> int:
    fn()  # warm-up: lazily created state
    with _OpCount() as count:
        fn()
    return count.n


def launches() -> dict:
    """Ops per training step of FP and of every preset at 4 bits, and per tracker update,
    on resnet18-CIFAR, with the tracker advancing in one span as on a GPU: what a GPU step
    launches, where launches, not arithmetic, set the cost of a small model's step
    (bench/gpu_check.py's profile gives the real kernels)."""
    out = {}
    for method in ["fp", *METHODS]:
        built, step = setup("resnet18_cifar", method, 4)
        tracker, out[method] = built.tracker, {}
        if tracker is not None:
            tracker.in_one_span()
            out[method]["tracker"] = ops_per(tracker.update)
            out[method]["tracked_layers"] = len(tracker.layers)
        out[method]["step"] = ops_per(step)
    print("launches", out, flush=True)
    return out


def lsq_vs_fused(min_run_time: float) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, shape in {
        "weight 256x256x3x3": (256, 256, 3, 3),
        "activation 32x128x32x32": (32, 128, 32, 32),
    }.items():
        x = torch.randn(shape, requires_grad=True)
        s = torch.tensor([0.1], requires_grad=True)
        g = 1 / math.sqrt(x.numel() * 7)
        go = torch.randn(shape)

        def ours(x=x, s=s, g=g, go=go) -> None:  # noqa: ANN001
            lsq_quantize(x, s.reshape(()), -8, 7, g).backward(go)

        def fused(x=x, s=s, g=g, go=go) -> None:  # noqa: ANN001
            zp = torch.zeros(1)
            torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, -8, 7, g).backward(go)

        a, b = median_time(ours, min_run_time), median_time(fused, min_run_time)
        out[name] = {"oscbench_s": a, "fused_s": b, "ratio": a / b}
    return out


def peak_memory(threads: int | None) -> dict:
    """Peak resident memory of a training step above the memory held between steps, in a
    fresh process per configuration (Linux: the peak is reset through /proc/self/clear_refs)."""
    out = {}
    for model in MODELS:
        for method in ("fp", "lsq"):
            proc = subprocess.run(
                [sys.executable, __file__, "--memory", model, method]
                + (["--threads", str(threads)] if threads else []),
                capture_output=True,
                text=True,
                check=True,
            )
            out[f"{model}/{method}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _memory_child(model: str, method: str) -> None:
    _, step = setup(model, method, 4)
    step()  # optimizer state and caches exist from here on
    held = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        step()
    print(json.dumps({"held_mb": held, "step_peak_mb": _status_mb("VmHWM") - held}))


def _cell(row: dict) -> str:
    lo, hi = min(row["round_ratios"]), max(row["round_ratios"])
    return f"{row['seconds'] * 1e3:.1f} ms ({row['ratio']:.2f}x; rounds {lo:.2f}-{hi:.2f})"


def goal_lines(results: dict) -> list[str]:
    """Each goal of issue 7 with the measured value and whether it holds."""
    r18, small = results["step"]["resnet18_cifar"], results["step"]["cnn_small"]
    others = {k: v["ratio"] for k, v in r18.items() if k not in ("fp", "lsq@4")}
    worst_other = max(others, key=others.get)
    worst_small = max((k for k in small if k != "fp"), key=lambda k: small[k]["ratio"])
    lsq = max(r["ratio"] for r in results["lsq"].values())
    t = results["tracker"]
    goals = [
        ("resnet18-CIFAR LSQ W4A4 <= 1.25x FP", r18["lsq@4"]["ratio"], 1.25, "x"),
        (
            f"resnet18-CIFAR every other method <= 1.4x (worst: {worst_other})",
            others[worst_other],
            1.4,
            "x",
        ),
        (
            f"cnn_small every method <= 2x (worst: {worst_small})",
            small[worst_small]["ratio"],
            2.0,
            "x",
        ),
        ("tracker <= 5 % of a resnet18 QAT step", 100 * t["share"], 5.0, " %"),
        ("oscillation state <= 8 bytes per tracked weight", t["bytes_per_weight"], 8.0, " B"),
        ("LSQ within 1.1x of the fused op (worst tensor)", lsq, 1.1, "x"),
    ]
    return [
        f"- {name}: {value:.2f}{unit} ({'met' if value <= limit else 'NOT met'})"
        for name, value, limit, unit in goals
    ]


def write(results: dict, path_md: Path) -> None:
    lines = [
        "# oscbench benchmarks",
        "",
        f"Command: `{results['command']}` (`make bench`). Machine: {results['machine']}.",
        *[
            f"Section `{name}` measured again with `{cmd}`."
            for name, cmd in results.get("section_runs", {}).items()
        ],
        "",
        "Ratios are to the full-precision step of the same model in the same process:",
        "each method is timed against its own FP twin in alternating rounds (medians of",
        "`torch.utils.benchmark` blocks; the fp row is the median over all twins).",
        "A step is the real training step (forward, backward, optimizer, policies, tracker),",
        "late in training (70 %) so that every policy's schedule is active, inside",
        "OsciReset's tracking window. Q-Ramping also runs a calibration of 31 steps at each",
        "epoch's start (undone after): 31 / steps per epoch more steps, not in the ratio",
        "(+8 % at CIFAR's 391 steps of 128, +2 % at 1,563 steps of 32).",
        "",
    ]
    for model, rows in results["step"].items():
        lines += [
            f"## Training step, {model} (CPU)",
            "",
            "| method | 4-bit | 2-bit |",
            "|---|---|---|",
            f"| fp | {rows['fp']['seconds'] * 1e3:.1f} ms (1.00x) | |",
        ]
        for m in (m for m in METHODS if f"{m}@4" in rows):  # the presets measured
            cells = [_cell(rows[f"{m}@{b}"]) for b in (4, 2)]
            lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += ["## Goals (issue 7)", "", *goal_lines(results), ""]
    t = results["tracker"]
    lines += [
        "## Oscillation tracker (resnet18-CIFAR, LSQ W4A4)",
        "",
        f"- update: {t['tracker_s'] * 1e3:.2f} ms of a {t['step_s'] * 1e3:.1f} ms step "
        f"({100 * t['share']:.1f} %)",
        f"- state: {t['bytes_per_weight']:.1f} bytes per tracked weight for oscillation, "
        f"{t['movement_bytes_per_weight']:.1f} for d_Q/d_w (the previous latent weight), "
        f"{t.get('epoch_start_bytes_per_weight', 0):.1f} for the code and count at the "
        f"epoch's start (stuck weights) ({t['tracked_weights']:,} weights)",
        "",
    ]
    if "export" in results:
        e = results["export"]
        lines += [
            "## Export to an integer model (resnet18-CIFAR, LSQ W4A4; issue 28)",
            "",
            f"- `python -m oscbench.export`: {e['export_s']:.1f} s to export "
            f"({e['onnx_mb']:.1f} MB of ONNX), {e['load_s']:.2f} s to load into onnxruntime",
            f"- a batch of 32: {e['batch32_onnxruntime_s'] * 1e3:.1f} ms in onnxruntime, "
            f"{e['batch32_simulated_s'] * 1e3:.1f} ms fake-quantized in torch",
            "",
        ]
    if "launches" in results:
        fp = results["launches"]["fp"]["step"]
        lines += [
            "## Ops per step (issue 26): resnet18-CIFAR, what a GPU step launches",
            "",
            "ATen ops that reach a kernel (views left out), counted in one step and in one",
            "tracker update. On a GPU each is a launch of a few microseconds: with an",
            "11 ms FP step at batch 256 (bench/README.md, One GPU), launches set its cost.",
            "",
            "| method | step | / FP | of which the tracker | tracked layers |",
            "|---|---|---|---|---|",
        ]
        for method, r in results["launches"].items():
            lines.append(
                f"| {method} | {r['step']:,} | {r['step'] / fp:.2f}x | "
                f"{r.get('tracker', 0):,} | {r.get('tracked_layers', 0)} |"
            )
        lines.append("")
    if "teacher" in results:
        lines += [
            "## Distillation: a step with a teacher (issue 14)",
            "",
            "LSQ W4A4, `distill.loss=soft` from a frozen FP teacher of the same model (its",
            "forward under `no_grad`), against the same step without one, alternating rounds.",
            "",
            "| model | without | with a teacher | ratio |",
            "|---|---|---|---|",
        ]
        for model, r in results["teacher"].items():
            lines.append(
                f"| {model} | {r['plain_s'] * 1e3:.1f} ms | {r['teacher_s'] * 1e3:.1f} ms | "
                f"{r['ratio']:.2f}x |"
            )
        lines.append("")
    if "compile" in results:
        c = results["compile"]
        ms = {k: v["seconds"] * 1e3 for k, v in c.items()}
        lines += [
            "## torch.compile (issue 15): resnet18-CIFAR, batch 32",
            "",
            "`trainer.compile=true` compiles the model with Inductor's layout optimization off;",
            "the last row is torch.compile's default. Alternating rounds, one process.",
            "",
            "| step | time | / FP of the same mode | / the eager step |",
            "|---|---|---|---|",
        ]
        for key, t in ms.items():
            method, _, mode = key.partition(" ")
            fp = ms["fp compiled" if "compiled" in mode else "fp eager"]
            lines.append(
                f"| {key} | {t:.1f} ms | {t / fp:.2f}x | {t / ms[f'{method} eager']:.2f}x |"
            )
        lines.append("")
    if "ddp" in results:
        lines += [
            "## Two processes (DDP, gloo) against one, LSQ W4A4 (issue 15)",
            "",
            "The same global batch; for the record only: 2 cores cannot show scaling.",
            "",
            "| model | 2 processes x 1 thread | 1 process, 1 thread | 1 process, 2 threads |",
            "|---|---|---|---|",
        ]
        for model, r in results["ddp"].items():
            lines.append(
                f"| {model} | {r['two_processes_s'] * 1e3:.1f} ms | "
                f"{r['one_process_1_thread_s'] * 1e3:.1f} ms | "
                f"{r['one_process_2_threads_s'] * 1e3:.1f} ms |"
            )
        lines.append("")
    if "gpu" in results:
        g = results["gpu"]
        lines += [
            f"## One GPU ({g['device']}): resnet18-CIFAR, batch 256 (issue 15)",
            "",
            "A training step with bf16 autocast and channels_last (trainer's auto on CUDA).",
            "",
            "| model | eager | compiled | compiled / eager |",
            "|---|---|---|---|",
        ]
        for m in ("fp", "lsq"):
            e, c = g[f"{m} eager"]["images_per_s"], g[f"{m} compiled"]["images_per_s"]
            lines.append(f"| {m} | {e:,.0f} images/s | {c:,.0f} images/s | {c / e:.2f}x |")
        lines.append("")
    lines += [
        "## LSQ forward + backward vs PyTorch's fused op",
        "",
        "| tensor | oscbench | fused | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in results["lsq"].items():
        lines.append(
            f"| {name} | {r['oscbench_s'] * 1e3:.2f} ms | {r['fused_s'] * 1e3:.2f} ms | "
            f"{r['ratio']:.2f}x |"
        )
    lines += [
        "",
        "## Peak memory of a training step (resident set, fresh process)",
        "",
        "| model / method | step peak above what is held | held between steps |",
        "|---|---|---|",
    ]
    for name, r in results["memory"].items():
        lines.append(f"| {name} | {r['step_peak_mb']:.0f} MB | {r['held_mb']:.0f} MB |")
    path_md.write_text("\n".join(lines) + "\n")


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "step": lambda a: step_times(a.min_run_time, a.rounds, a.methods),
    "tracker": lambda a: tracker_cost(a.min_run_time),
    "launches": lambda a: launches(),
    "teacher": lambda a: teacher_cost(a.min_run_time, a.rounds),
    "compile": lambda a: compile_cost(a.min_run_time, a.rounds),
    "ddp": lambda a: ddp_cost(a.min_run_time),
    "gpu": lambda a: gpu_throughput(a.min_run_time, a.rounds),  # where CUDA is
    "lsq": lambda a: lsq_vs_fused(a.min_run_time),
    "memory": lambda a: peak_memory(a.threads),
    "export": lambda a: export_cost(a.min_run_time),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--min-run-time", type=float, default=1.5, help="seconds per block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved FP/method rounds")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/json go")
    parser.add_argument(
        "--only",
        choices=list(SECTIONS),
        help="measure this section again, keep the others of --out's results.json",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        help="with --only step: these presets (comma-separated) again, the other rows kept",
    )
    args = parser.parse_args()
    if args.methods and args.only != "step":
        sys.exit("bench: --methods measures some presets' steps again; use it with --only step")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return _memory_child(*args.memory)
    torch.manual_seed(0)
    start = time.time()
    sections = {
        name: functools.partial(measure, args)
        for name, measure in SECTIONS.items()
        if name != "gpu" or torch.cuda.is_available()
    }
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    command = " ".join(["python bench/bench.py", *sys.argv[1:]])
    if args.only and args.only not in sections:
        sys.exit(f"bench: --only {args.only} needs a CUDA device; there is none here")
    if args.only:
        results = json.loads((args.out / "results.json").read_text())
        fresh = sections[args.only]()
        if args.methods:  # the listed presets' rows replace theirs; fp's row stays
            fresh = {
                m: rows | {k: v for k, v in fresh[m].items() if k != "fp"}
                for m, rows in results[args.only].items()
            }
        results[args.only] = fresh
        results["section_runs"] = {**results.get("section_runs", {}), args.only: command}
    else:
        results = {"machine": machine, "command": command}
        results |= {name: measure() for name, measure in sections.items()}
        results["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write(results, args.out / "results.md")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
