"""The deploy study's export parity, summed over its runs (parity.md): weight codes, images
against the record, logits against their bound, activation codes at rounding ties, and
onnxruntime's optimized graph against the graph as written (each run's `export` block).

    python experiments/deploy/parity.py [multirun/deploy]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from oscbench.analysis.frame import load_records

HERE = Path(__file__).resolve().parent


def main(root: Path) -> None:
    runs = [r for r in load_records(root) if r.get("status") == "completed" and r.get("export")]
    exported = [r for r in runs if "weights" in r["export"]]
    refused = Counter(
        str(r["export"].get("refused") or r["export"].get("error"))
        for r in runs
        if "weights" not in r["export"]
    )
    images = Counter(r["export"]["images_vs_record"]["difference"] for r in exported)
    ties = [r["export"]["input_codes"] for r in exported]
    equal = sum(r["export"]["weights"]["codes_equal"] for r in exported)
    over = sum(r["export"]["logits"]["images_over_bound"] for r in exported)
    tied = sum(t["differ"] > 0 for t in ties)
    moved = []
    for r in exported:
        e = r["export"]
        if e["optimized"]["acc"] != e["acc"]:
            folded = r["config"].get("bn_fold", {}).get("enabled", False)
            moved.append((r["run_dir"], e["acc"], e["optimized"]["acc"], folded))
    gaps = [abs(a - b) for _, a, b, _ in moved]
    lines = [
        "# Export parity over the deploy study's runs",
        "",
        f"- exported runs: {len(exported)}; refused: "
        + (", ".join(f"{n} ({why})" for why, n in refused.items()) or "none"),
        f"- weight codes equal to oscbench's: {equal}",
        "- test images classified otherwise than the record says (runs): "
        + ", ".join(f"{d:+d}: {n}" for d, n in sorted(images.items())),
        f"- images with a logit outside the bound: {over}",
        f"- runs with an activation code one rounding tie apart: {tied}"
        f" (at most {max(t['images_with_a_difference'] for t in ties)} of 10,000 images in a run;"
        f" the largest code difference downstream: {max(t['max_difference'] for t in ties)})",
        f"- runs whose accuracy moves in onnxruntime's optimized graph: {len(moved)}, of them"
        f" folded: {sum(m[3] for m in moved)}; by "
        f"{min(gaps):.2f}-{max(gaps):.2f} points",
        "",
        "| run | as written (%) | optimized (%) | folded |",
        "|---|---|---|---|",
        *[f"| {d} | {a:.2f} | {b:.2f} | {'yes' if f else 'no'} |" for d, a, b, f in sorted(moved)],
        "",
    ]
    (HERE / "parity.md").write_text("\n".join(lines))
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/deploy"))
