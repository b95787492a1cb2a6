"""`make gpu-check`: every GPU check of issue 26 in one run on one CUDA device (goal: at most
8 minutes on an H100), under the torch that machine has. Writes bench/gpu.md (device, torch,
date) and exits 1 where a goal is missed.

1. Throughput: a training step of resnet18-CIFAR at batch 256, bf16 autocast and
   channels_last (the trainer's auto on CUDA), images/s of FP and of every method preset at
   4 bits, eager and compiled (trainer.compile), median of blocks (torch.utils.benchmark,
   which synchronises the device); the tracker's update as a share of LSQ's eager step; and
   a profile of FP's and LSQ's eager steps: kernel launches per step and the top kernels
   by device time. Goals: LSQ >= 0.8x FP, every other preset >= 0.6x, the tracker <= 5 %,
   compiled never slower than eager.
2. Host synchronisation: the CUDA-against-CPU runs below train with every per-step call of
   the loop (`oscbench.training.loop.PER_STEP`) under `torch.cuda.set_sync_debug_mode("warn")`, each
   warning recorded (not "error": a step stopped half way would change the run); per-epoch
   code may synchronise. Goal: none.
3. CUDA against the CPU: every preset, 3 epochs of glyphs (10,000 training images, 2,000
   test images) with mobilenetv2_small in fp32
   (`trainer.precision=fp32`, the CPU's arithmetic; cuDNN's TF32 convolutions, PyTorch's
   default, stay on) on CUDA, against the same runs on the CPU's own code paths (native,
   avx2, default: .ci/cpu_path), measured beforehand on a CPU (for each path,
   `.ci/cpu_path PATH python bench/gpu_check.py --cpu-paths PATH`: bench/cpu_paths.json).
   Goal: the CUDA run's test accuracy, oscillating share and crossings each lie in the
   CPU paths' range widened by that range on either side (CUDA is one more code path; the
   CPU paths' own distance is the scale of what a code path moves).
4. The numeric tests (`pytest -m numeric`) on that machine.

`--only` runs some sections (a second call keeps the others from bench/gpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench import median_time, setup  # noqa: E402
from oscbench.launch.compose import compose, presets  # noqa: E402
from oscbench.launch.config import resolved, validate  # noqa: E402
from oscbench.launch.execute import execute  # noqa: E402
from oscbench.training.loop import per_step_wrapped  # noqa: E402

METHODS = [p.name for p in presets()]
BATCH = 256
THROUGHPUT = ("trainer.batch_size=256", "dataset.train_size=256")
AGAINST_CPU = [
    "model=mobilenetv2_small",
    "dataset=glyphs",
    "dataset.train_size=10000",  # 3 epochs of every preset on 3 CPU paths: 35 min here
    "dataset.test_size=2000",  # standard error of an accuracy of 85 %: 0.8 points
    "trainer.epochs=3",
    "trainer.precision=fp32",
    "bits=3",
    "logger=none",
]
COMPARED = ("acc", "osc_share", "crossings_total")
CPU_PATHS = HERE / "cpu_paths.json"
GPU_JSON = HERE / "gpu.json"


def goal(ok: bool, text: str, missed: list[str]) -> str:
    if not ok:
        missed.append(text)
    return f"- [{'x' if ok else ' '}] {text}"


def throughput(min_run_time: float) -> dict:
    """Images/s of every preset, eager and compiled, and the tracker's share of LSQ's step."""
    out: dict[str, dict] = {}
    for method in METHODS:
        for mode, layout in (("eager", None), ("compiled", False)):
            built, step = setup("resnet18_cifar", method, 4, THROUGHPUT, layout, device="cuda")
            seconds = median_time(step, min_run_time)
            out.setdefault(method, {})[mode] = BATCH / seconds
            if method == "lsq" and mode == "eager":
                out["tracker_share"] = median_time(built.tracker.update, min_run_time) / seconds
            print(f"throughput {method} {mode}: {BATCH / seconds:,.0f} images/s", flush=True)
            del built, step
            torch.cuda.empty_cache()
    return out


def profile(method: str, steps: int = 5) -> dict:
    """Kernel launches per step and the top kernels by device time of an eager step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step = setup("resnet18_cifar", method, 4, THROUGHPUT, None, device="cuda")
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    launches = sum(e.count for e in prof.key_averages() if e.key == "cudaLaunchKernel")
    total = sum(e.self_device_time_total for e in kernels)
    return {
        "launches_per_step": launches / steps,
        "device_ms_per_step": total / steps / 1e3,
        "top": [
            {"kernel": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1e3}
            for e in kernels[:12]
        ],
    }


@contextmanager
def per_step_sync_check() -> Iterator[list[str]]:
    """Every per-step call of the training loop (`oscbench.training.loop.PER_STEP`) under sync debug
    mode "warn", its warnings recorded; yields the list of synchronisations found, each with
    the call it was in. Warnings, not "error": a step stopped half way and run again would
    change the run that is compared with the CPU's."""
    found: list[str] = []

    def checked(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                found.extend(
                    f"{fn.__qualname__}: {str(w.message).splitlines()[0][:200]}"
                    for w in caught
                    if "synchroniz" in str(w.message)
                )

        return inner

    with per_step_wrapped(checked):
        yield found


def run_preset(method: str, device: str) -> dict:
    overrides = [f"method={method}", f"device={device}", *AGAINST_CPU]
    cfg = compose(overrides)
    with tempfile.TemporaryDirectory() as d:
        final = execute(validate(cfg), resolved(cfg), Path(d), overrides)
    return {k: float(final[k]) for k in COMPARED if k in final}


def cpu_paths(path: str) -> None:
    """`--cpu-paths`: this CPU path's numbers for every preset, into bench/cpu_paths.json
    (run under each of .ci/cpu_path's paths)."""
    table = json.loads(CPU_PATHS.read_text()) if CPU_PATHS.exists() else {}
    for method in METHODS:
        start = time.time()
        table.setdefault(method, {})[path] = run_preset(method, "cpu")
        print(f"{path} {method}: {table[method][path]} ({time.time() - start:.0f} s)", flush=True)
        CPU_PATHS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def against_cpu() -> dict:
    """Every preset on CUDA, with the per-step sync check (the CPU's are in CPU_PATHS)."""
    runs = {}
    with per_step_sync_check() as syncs:
        for method in METHODS:
            runs[method] = run_preset(method, "cuda")
            print(f"cuda {method}: {runs[method]}", flush=True)
    return {"runs": runs, "syncs": syncs}


def within(value: float, paths: dict[str, dict], key: str) -> tuple[bool, float, float]:
    values = [p[key] for p in paths.values() if key in p]
    spread = max(values) - min(values)
    lo, hi = min(values) - spread, max(values) + spread
    return lo <= value <= hi, lo, hi


def numeric_tests() -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "numeric", "-q", "-p", "no:cacheprovider"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
    )
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1]


def write(results: dict, missed: list[str], path: Path) -> None:
    """bench/gpu.md from what `results` holds; a section not measured is a missed goal."""
    lines = [
        "# GPU check (`make gpu-check`, bench/gpu_check.py)",
        "",
        f"{results['device']}, torch {results['torch']}, Python {platform.python_version()}, "
        f"{results['date']}; {results['seconds']:.0f} s.",
        "",
    ]
    for section in SECTIONS:
        if section not in results:
            lines += [goal(False, f"{section}: not measured", missed), ""]
    if "throughput" in results:
        lines += throughput_lines(results["throughput"], missed)
    for method, prof in results.get("profile", {}).items():
        lines += [
            f"### Profile of a {method} eager step: {prof['launches_per_step']:.0f} kernel "
            f"launches, {prof['device_ms_per_step']:.2f} ms of kernels",
            "",
            "| kernel | ms per step |",
            "|---|---|",
            *[f"| `{k['kernel']}` | {k['ms_per_step']:.3f} |" for k in prof["top"]],
            "",
        ]
    if "cuda" in results:
        lines += cuda_lines(results["cuda"], missed)
    if "numeric" in results:
        code, summary = results["numeric"]
        lines += ["## Numeric tests on this machine", ""]
        lines += [goal(code == 0, f"`pytest -m numeric`: {summary}", missed), ""]
    lines += [f"Goals missed: {len(missed)}", *[f"- {m}" for m in missed]]
    path.write_text("\n".join(lines) + "\n")


def throughput_lines(t: dict, missed: list[str]) -> list[str]:
    fp = t["fp"]
    lines = [
        "## Throughput: resnet18-CIFAR, batch 256, bf16 autocast, channels_last",
        "",
        "| method | eager images/s | x FP | compiled images/s | x FP compiled | compiled / eager |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        e, c = t[method]["eager"], t[method]["compiled"]
        lines.append(
            f"| {method} | {e:,.0f} | {e / fp['eager']:.2f} | {c:,.0f} | "
            f"{c / fp['compiled']:.2f} | {c / e:.2f} |"
        )
    lsq, share = t["lsq"]["eager"] / fp["eager"], 100 * t["tracker_share"]
    lines += ["", goal(lsq >= 0.8, f"LSQ W4A4 eager {lsq:.2f}x FP (>= 0.8x)", missed)]
    for method in METHODS:
        if method not in ("fp", "lsq"):
            r = t[method]["eager"] / fp["eager"]
            lines.append(goal(r >= 0.6, f"{method} eager {r:.2f}x FP (>= 0.6x)", missed))
    lines.append(goal(share <= 5, f"tracker {share:.1f} % of LSQ's eager step (<= 5 %)", missed))
    for method in METHODS:
        r = t[method]["compiled"] / t[method]["eager"]
        lines.append(goal(r >= 1.0, f"{method} compiled {r:.2f}x eager (>= 1)", missed))
    return [*lines, ""]


def cuda_lines(cuda: dict, missed: list[str]) -> list[str]:
    syncs = cuda["syncs"]
    lines = [
        "## CUDA against the CPU: mobilenetv2_small, glyphs (10,000 images), 3 epochs, W3A3, fp32",
        "",
        goal(not syncs, f"{len(syncs)} host synchronisations in the steps of these runs", missed),
        *[f"  - {s}" for s in syncs[:20]],
        "",
        "Each CPU column: the range over the native, avx2 and default paths "
        "(bench/cpu_paths.json); CUDA must lie in it widened by its width on either side.",
        "",
        "| method | " + " | ".join(f"{k} CUDA | {k} CPU paths" for k in COMPARED) + " |",
        "|---|" + "---|---|" * len(COMPARED),
    ]
    reference = json.loads(CPU_PATHS.read_text())
    for method, row in cuda["runs"].items():
        cells = []
        for key in COMPARED:
            if key not in row:  # a run in full precision has no oscillation
                cells += ["", ""]
                continue
            ok, lo, hi = within(row[key], reference[method], key)
            goal(ok, f"{method}: {key} on CUDA {row[key]:g} in [{lo:g}, {hi:g}]", missed)
            values = [p[key] for p in reference[method].values()]
            cells += [f"{row[key]:g}{'' if ok else ' (out)'}", f"{min(values):g} - {max(values):g}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


SECTIONS = {
    "numeric": lambda args: numeric_tests(),
    "throughput": lambda args: throughput(args.min_run_time),
    "profile": lambda args: {m: profile(m) for m in ("fp", "lsq")},
    "cuda": lambda args: against_cpu(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-paths", metavar="PATH", help="measure this CPU path's numbers")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"of {', '.join(SECTIONS)}; the others "
        "are kept from an earlier run's bench/gpu.json on the same device and torch",
    )
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    if args.cpu_paths:
        cpu_paths(args.cpu_paths)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine (make gpu-check)")
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        sys.exit(f"gpu_check: no section {', '.join(sorted(unknown))}; use {', '.join(SECTIONS)}")
    start = time.time()
    here = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    earlier = json.loads(GPU_JSON.read_text()) if GPU_JSON.exists() else {}
    results = earlier if all(earlier.get(k) == v for k, v in here.items()) else here
    for section in args.only.split(","):
        results[section] = SECTIONS[section](args)
        GPU_JSON.write_text(json.dumps(results, indent=1) + "\n")
    results |= {"date": datetime.date.today().isoformat(), "seconds": time.time() - start}
    missed: list[str] = []
    write(results, missed, HERE / "gpu.md")
    print((HERE / "gpu.md").read_text())
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
