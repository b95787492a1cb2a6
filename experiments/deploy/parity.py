"""Export parity summed over a sweep's exported runs (parity.md): weight codes, images
against the record, logits against their bound, activation codes at rounding ties, weights
off their level (uneven levels), and onnxruntime's optimized graph against the graph as
written (each run's `export` block).

    python experiments/deploy/parity.py [SWEEP_DIR] [--out FILE]

(defaults: multirun/deploy, experiments/deploy/parity.md)
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from oscbench.analysis.frame import load_records

HERE = Path(__file__).resolve().parent


def main(root: Path, out: Path) -> None:
    runs = [r for r in load_records(root) if r.get("status") == "completed" and r.get("export")]
    exported = [r for r in runs if "weights" in r["export"]]
    refused = Counter(
        str(r["export"].get("refused") or r["export"].get("error"))
        for r in runs
        if "weights" not in r["export"]
    )
    images = Counter(r["export"]["images_vs_record"]["difference"] for r in exported)
    ties = [r["export"]["input_codes"] for r in exported if r["export"]["input_codes"]["compared"]]
    equal = sum(r["export"]["weights"]["codes_equal"] for r in exported)
    bounded = [r for r in exported if r["export"]["logits"]["bound"]]
    over = sum(r["export"]["logits"]["images_over_bound"] for r in bounded)
    free = [r for r in exported if not r["export"]["logits"]["bound"]]
    tied = sum(t["differ"] > 0 for t in ties)
    off = [r["export"]["weights"].get("off_level", 0) for r in exported]
    worst_off = max((r["export"]["weights"].get("max_off_level", 0.0) for r in exported), default=0)
    moved = []
    for r in exported:
        e = r["export"]
        if e["optimized"]["acc"] != e["acc"]:
            folded = r["config"].get("bn_fold", {}).get("enabled", False)
            moved.append((r["run_dir"], e["acc"], e["optimized"]["acc"], folded))
    gaps = [abs(a - b) for _, a, b, _ in moved]
    by_method = Counter(r["method"] for r in exported)
    lines = [
        f"# Export parity over the runs of {root}",
        "",
        f"- exported runs: {len(exported)} ("
        + ", ".join(f"{m} {n}" for m, n in sorted(by_method.items()))
        + "); refused: "
        + (", ".join(f"{n} ({why})" for why, n in refused.items()) or "none"),
        f"- weight codes (and tables of levels) equal to oscbench's: {equal}",
        "- test images classified otherwise than the record says (runs): "
        + ", ".join(f"{d:+d}: {n}" for d, n in sorted(images.items())),
        f"- images with a logit outside the bound: {over}, in the {len(bounded)} runs whose last"
        " layer has a quantized input (the others' logits: at most "
        + f"{max((r['export']['logits']['max_abs_difference'] for r in free), default=0):.2g}"
        + " apart)",
        f"- runs with an activation code one rounding tie apart: {tied} of {len(ties)} with"
        " quantized inputs"
        + (
            f" (at most {max(t['images_with_a_difference'] for t in ties)} images in a run;"
            f" the largest code difference downstream: {max(t['max_difference'] for t in ties)})"
            if tied
            else ""
        ),
        f"- weights off their level in the simulated model (uneven levels): {sum(off)} in"
        f" {sum(n > 0 for n in off)} runs, at most {worst_off:.2g} off",
        f"- runs whose accuracy moves in onnxruntime's optimized graph: {len(moved)}"
        + (
            f", of them folded: {sum(m[3] for m in moved)}; by "
            f"{min(gaps):.2f}-{max(gaps):.2f} points"
            if moved
            else ""
        ),
        "",
    ]
    if moved:
        lines += [
            "| run | as written (%) | optimized (%) | folded |",
            "|---|---|---|---|",
            *[
                f"| {d} | {a:.2f} | {b:.2f} | {'yes' if f else 'no'} |"
                for d, a, b, f in sorted(moved)
            ],
            "",
        ]
    out.write_text("\n".join(lines))
    print("\n".join(lines[:10]))


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("root", nargs="?", default="multirun/deploy", type=Path)
    args.add_argument("--out", default=HERE / "parity.md", type=Path)
    a = args.parse_args()
    main(a.root, a.out)
