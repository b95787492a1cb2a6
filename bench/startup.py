"""Start-up of `python -m oscbench.run`, from launch (issue 11's goals, on a 2-core CPU):

- a bad value (`bits=9`) rejected, and `--help` shown, within 4 s;
- the default run's first epoch starting within 6 s (W&B offline, as `make run`).

    python bench/startup.py [--repeat 5] [--out bench/startup.md]

Each command runs `--repeat` times in a fresh interpreter (nothing else should run on the
machine meanwhile); medians are reported. The first epoch's start is the arrival of the
"epoch 1/1 ... (x s)" line less the x seconds the epoch took.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"reject_s": 4.0, "help_s": 4.0, "first_epoch_s": 6.0}


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    return time.perf_counter() - start, proc.stdout + proc.stderr


def first_epoch_start(cwd: Path) -> float:
    """Seconds from launch to the start of the first epoch of the default run."""
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "oscbench.run", "trainer.epochs=1", f"hydra.run.dir={run_dir}"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "WANDB_SILENT": "true"},
        )
        for line in proc.stdout:
            if line.startswith("epoch 1/1"):
                arrived = time.perf_counter() - start
                took = float(re.search(r"\(([\d.]+) s\)$", line.strip()).group(1))
                proc.wait()
                return arrived - took
        proc.wait()
        raise RuntimeError("the run printed no epoch line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "startup.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cwd:  # rejected runs must leave nothing: check it
        results = {
            "import_s": [
                timed(["-c", "import oscbench.run"], Path(cwd))[0] for _ in range(args.repeat)
            ],
            "reject_s": [],
            "help_s": [],
            "first_epoch_s": [],
        }
        for _ in range(args.repeat):
            seconds, output = timed(["-m", "oscbench.run", "bits=9"], Path(cwd))
            assert "bits=9 is invalid" in output, output
            results["reject_s"].append(seconds)
            seconds, output = timed(["-m", "oscbench.run", "--help"], Path(cwd))
            assert "Powered by Hydra" in output, output
            results["help_s"].append(seconds)
        assert not any(Path(cwd).iterdir()), "a rejected run left files behind"
    results["first_epoch_s"] = [first_epoch_start(ROOT) for _ in range(args.repeat)]
    lines = [
        "# Start-up of `python -m oscbench.run`",
        "",
        f"`python bench/startup.py --repeat {args.repeat}`: median (min-max) of "
        f"{args.repeat} fresh interpreters, {os.cpu_count()} CPU cores.",
        "",
        "| measure | median | min-max | goal |",
        "|---|---|---|---|",
    ]
    names = {
        "import_s": "`import oscbench.run`",
        "reject_s": "`bits=9` rejected (launch to exit)",
        "help_s": "`--help` (launch to exit)",
        "first_epoch_s": "default run: launch to the first epoch's start",
    }
    for key, values in results.items():
        goal, median = GOALS.get(key), statistics.median(values)
        met = "" if goal is None else f"<= {goal:.0f} s: {'met' if median <= goal else 'NOT met'}"
        lines.append(
            f"| {names[key]} | {median:.2f} s | {min(values):.2f}-{max(values):.2f} s | {met} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
