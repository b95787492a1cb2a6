"""The margins of the tests' bounds on learned outcomes (tests/learned.py), on every CPU
path: each test marked `learned` runs once per path (.ci/cpu_path: native, avx2, default),
under pytest-xdist's workers as `make test` runs it, and every value it checks is tabled
beside its bound.

    python bench/margins.py [--paths native avx2 default] [--out bench/margins.md] [-- PYTEST ARGS]

Slow: the learned tests train dozens of short runs (about 5 minutes a path on 2 cores).
The margin of a value is how far it is from its bound, as a share of the bound (of the
value, for a bound of 0): the smallest over the paths is the test's safety.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("native", "avx2", "default")


def measure(path: str, pytest_args: list[str]) -> list[dict]:
    """Run the learned tests on `path`; every value they checked, passed or not."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "margins.jsonl"
        cmd = [str(ROOT / ".ci" / "cpu_path"), path, sys.executable, "-m", "pytest"]
        cmd += ["-q", "-p", "no:cacheprovider", "-n", "auto", "-m", "learned", *pytest_args]
        env = {**os.environ, "OSCBENCH_MARGINS": str(out), "WANDB_SILENT": "true"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        print(f"{path}: {proc.stdout.strip().splitlines()[-1]}", file=sys.stderr)
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def gap(row: dict) -> float:
    """How far the value is on the right side of its bound (negative: it fails)."""
    return row["value"] - row["bound"] if row["op"] in (">", ">=") else row["bound"] - row["value"]


def safety(rows: list[dict]) -> float:
    """The smallest gap over the paths, in units of how much the gap moves between them
    (its range): below 1, one more path could well cross the bound."""
    gaps = [gap(r) for r in rows]
    spread = max(gaps) - min(gaps)
    return min(gaps) / spread if spread else math.inf


def table(rows: list[dict], paths: list[str]) -> str:
    checks: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        checks.setdefault((r["test"], r["what"]), {})[r["path"]] = r
    out = [
        "# Bounds on learned outcomes, on every CPU path",
        "",
        "`python bench/margins.py`: each test marked `learned` on the CPU paths of "
        "`.ci/cpu_path` (2-core AMD EPYC: native is AVX-512), run as `make test` runs them: "
        "one pytest-xdist worker per core, each on one torch thread. A cell is the "
        "value the test checks on that path, and its bound where that is another measured "
        "value. Safety: the smallest gap between value and bound over the paths, in units "
        "of the gap's range over the paths (below 1: another CPU could well cross the bound; "
        "inf: the gap is the same on every path). A missing cell: the test checked no value "
        "there (it stopped before, or took another branch: the compiled run is refused on "
        "avx2 with torch 2.14).",
        "",
        "| test | value | bound | " + " | ".join(paths) + " | safety |",
        "|---|---|---|" + "---|" * len(paths) + "---|",
    ]
    for (test, what), by_path in checks.items():
        rows = list(by_path.values())
        fixed = len({r["bound"] for r in rows}) == 1
        cells = [
            "-"
            if p not in by_path
            else f"{by_path[p]['value']:.4g}" + ("" if fixed else f" vs {by_path[p]['bound']:.4g}")
            for p in paths
        ]
        name = test.split("::", 1)[1] if "::" in test else test
        bound = f"{rows[0]['op']} " + (f"{rows[0]['bound']:.4g}" if fixed else "the other")
        out.append(f"| `{name}` | {what} | {bound} | {' | '.join(cells)} | {safety(rows):.2g} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "margins.md"))
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    rows = [r for p in args.paths for r in measure(p, args.pytest_args)]
    text = table(rows, args.paths)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
