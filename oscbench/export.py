"""`python -m oscbench.export RUN_DIR`: a trained run as the integer model an integer runtime
runs, written as `model.onnx` next to its record, and its parity with the simulated model,
measured in onnxruntime on the run's test split (the record's `export` block;
`oscbench.launch.export`, `oscbench.deploy`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oscbench.launch.export import export_run, summary
from oscbench.records.runs import RESULTS
from oscbench.registry import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oscbench.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a completed run's directory (holds results.json)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch (default: the run's)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / RESULTS).exists():
        parser.exit(2, f"oscbench.export: no {RESULTS} in {run_dir}; give a run's directory\n")
    try:
        block = export_run(run_dir, args.batch_size)
    except ConfigError as e:
        parser.exit(2, f"oscbench.export: {e}\n")
    print(summary(block))
    if "refused" in block:
        sys.exit(2)


if __name__ == "__main__":
    main()
