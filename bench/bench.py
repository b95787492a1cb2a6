"""What quantization and oscillation tracking cost: `make bench` (not part of `make test`).

Measures, in one process on the CPU (torch.utils.benchmark, median of repeated blocks):
the training step (forward, backward, optimizer, policies, tracker) of FP and of every
method preset at 4 and 2 bits, as a ratio to FP, on cnn_small (a digits batch of 64) and on
resnet18 with the CIFAR stem (batch 32, 32x32); the tracker's share of a step and its state
in bytes per tracked weight; oscbench's LSQ forward+backward against PyTorch's fused
`_fake_quantize_learnable_per_tensor_affine`; the peak memory of a step, FP vs QAT (fresh
processes, resident set size). Writes bench/results.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils import benchmark

from oscbench.config import validate
from oscbench.oscillation import update_trackers
from oscbench.quant import quantized_layers
from oscbench.quant.lsq import lsq_quantize
from oscbench.run import CONF_DIR, build
from oscbench.train import Accel, build_optimizer, train_step

HERE = Path(__file__).resolve().parent
METHODS = ["lsq", "lsq_dampen", "lsq_freeze", "ofq", "aoq", "osc_reg", "ptq"]
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


def setup(model: str, method: str, bits: int):  # noqa: ANN201
    """A built run and a closure that performs one real training step."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *MODELS[model],
                f"method={method}",
                f"bits={bits}",
                "logger=none",
                "device=cpu",
                "trainer.epochs=100",
            ],
        )
    spec = validate(cfg)
    built = build(spec)
    opt = build_optimizer(built.model, spec.trainer)
    steps = spec.trainer.epochs * built.data.steps_per_epoch(spec.trainer.batch_size)
    for p in built.policies:
        p.setup(built.model, steps, built.data.steps_per_epoch(spec.trainer.batch_size))
    x, y = next(built.data.train_batches(0, spec.trainer.batch_size))
    built.model.train()
    counter = {"step": int(0.7 * steps)}  # late in training: every policy's schedule is on

    def step() -> None:
        train_step(
            built.model, built.model, x, y, opt, built.policies, Accel(), counter["step"], steps
        )

    return built, step


def median_time(fn, min_run_time: float) -> float:  # noqa: ANN001
    fn()  # warm-up
    return (
        benchmark.Timer("fn()", globals={"fn": fn})
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


def step_times(min_run_time: float) -> dict:
    out = {}
    for model in MODELS:
        _, fp_step = setup(model, "fp", 4)
        fp = median_time(fp_step, min_run_time)
        rows = {"fp": {"seconds": fp, "ratio": 1.0}}
        for bits in (4, 2):
            for method in METHODS:
                _, step = setup(model, method, bits)
                t = median_time(step, min_run_time)
                rows[f"{method}@{bits}"] = {"seconds": t, "ratio": t / fp}
        out[model] = rows
        print(model, {k: round(v["ratio"], 2) for k, v in rows.items()}, flush=True)
    return out


def tracker_cost(min_run_time: float) -> dict:
    built, step = setup("resnet18_cifar", "lsq", 4)
    total = median_time(step, min_run_time)
    tracker = median_time(lambda: update_trackers(built.model), min_run_time)
    tracked = [m.tracker for _, m in quantized_layers(built.model) if m.tracker is not None]
    weights = sum(t.freq.numel() for t in tracked)
    state = sum(b.numel() * b.element_size() for t in tracked for b in t.buffers() if b.dim())
    return {
        "step_s": total,
        "tracker_s": tracker,
        "share": tracker / total,
        "bytes_per_weight": state / weights,
        "tracked_weights": weights,
    }


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


def peak_memory() -> dict:
    """Peak resident memory of a training step above the memory held between steps, in a
    fresh process per configuration (Linux: the peak is reset through /proc/self/clear_refs)."""
    out = {}
    for model in MODELS:
        for method in ("fp", "lsq"):
            proc = subprocess.run(
                [sys.executable, __file__, "--memory", model, method],
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


def write(results: dict, path_md: Path) -> None:
    lines = [
        "# oscbench benchmarks",
        "",
        f"Command: `make bench` (`python bench/bench.py`). Machine: {results['machine']}.",
        "Ratios are to the full-precision step of the same model in the same process;",
        "medians of `torch.utils.benchmark` blocks. A step is the real training step",
        "(forward, backward, optimizer, policies, tracker), late in training so that every",
        "policy's schedule is active.",
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
        for m in METHODS:
            cells = [
                f"{rows[f'{m}@{b}']['seconds'] * 1e3:.1f} ms ({rows[f'{m}@{b}']['ratio']:.2f}x)"
                for b in (4, 2)
            ]
            lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
        lines.append("")
    t = results["tracker"]
    lines += [
        "## Oscillation tracker (resnet18-CIFAR, LSQ W4A4)",
        "",
        f"- update: {t['tracker_s'] * 1e3:.2f} ms of a {t['step_s'] * 1e3:.1f} ms step "
        f"({100 * t['share']:.1f} %)",
        f"- state: {t['bytes_per_weight']:.1f} bytes per tracked weight "
        f"({t['tracked_weights']:,} weights)",
        "",
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--min-run-time", type=float, default=3.0)
    args = parser.parse_args()
    if args.memory:
        return _memory_child(*args.memory)
    torch.manual_seed(0)
    start = time.time()
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
        "step": step_times(args.min_run_time),
        "tracker": tracker_cost(args.min_run_time),
        "lsq": lsq_vs_fused(args.min_run_time),
        "memory": peak_memory(),
    }
    results["seconds"] = time.time() - start
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write(results, HERE / "results.md")
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
