"""The curvature probe's figure: each low-bit layer's Hessian trace beside its oscillating
share, at the three probed epochs of an LSQ W2A2 run on the claims benchmark (README.md).

    python -m oscbench.run experiment=claims method=lsq bits=2 seed=0 logger=none \\
        "probe.hessian_epochs=[1,5,10]" probe.hessian_matvecs=6 probe.hessian_batches=1 \\
        hydra.sweep.dir=multirun/claims
    python experiments/claims/hessian/figure.py multirun/claims/lsq/<the run>

Writes hessian_vs_oscillation.png and hessian.csv here, and prints each epoch's Spearman
rank correlation between the layers' traces and their oscillating shares (scipy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from oscbench.analysis.figures import colours  # noqa: E402
from oscbench.records.record import load_results  # noqa: E402

HERE = Path(__file__).resolve().parent


def table(run_dir: Path) -> pd.DataFrame:
    """One row per (probed epoch, tracked layer): the trace and the oscillating share."""
    rows = []
    for record in load_results(run_dir)["history"]:
        if "hessian_trace" not in record:
            continue
        for i, (name, layer) in enumerate(record["osc"]["layers"].items()):
            rows.append(
                {
                    "epoch": record["epoch"],
                    "layer": name,
                    "index": i,
                    "weights": layer["numel"],
                    "hessian_trace": record["hessian_trace"][name],
                    "osc_share": 100 * layer["osc_share"],
                }
            )
    return pd.DataFrame(rows)


def figure(df: pd.DataFrame, out: Path) -> None:
    epochs = sorted(df.epoch.unique())
    fig, (top, bottom, right) = plt.subplots(
        1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1.3, 1]}
    )
    for colour, epoch in zip(colours(len(epochs)), epochs, strict=True):
        part = df[df.epoch == epoch]
        label = f"after epoch {epoch}"
        top.plot(part["index"], part.hessian_trace.abs(), "o-", ms=3, color=colour, label=label)
        bottom.plot(part["index"], part.osc_share, "o-", ms=3, color=colour, label=label)
        rho = spearmanr(part.hessian_trace, part.osc_share).statistic
        right.scatter(
            part.hessian_trace.abs(),
            part.osc_share,
            s=12,
            color=colour,
            label=f"{label} (Spearman {rho:+.2f})",
        )
    top.set(yscale="log", xlabel="low-bit layer (model order)", ylabel="|Hessian trace|")
    bottom.set(xlabel="low-bit layer (model order)", ylabel="oscillating weights (%)")
    right.set(xscale="log", xlabel="|Hessian trace|", ylabel="oscillating weights (%)")
    right.xaxis.set_minor_formatter(NullFormatter())  # only the decades: no colliding labels
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title("curvature per layer (Hutch++)")
    bottom.set_title("oscillating share per layer")
    right.set_title("one point per layer")
    handles, labels = right.get_legend_handles_labels()
    fig.suptitle("LSQ W2A2, mobilenetv2_small on glyphs (claims benchmark), seed 0")
    fig.legend(handles, labels, loc="lower center", ncol=len(epochs), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    df = table(args.run_dir)
    df.to_csv(HERE / "hessian.csv", index=False)
    figure(df, HERE / "hessian_vs_oscillation.png")
    for epoch, part in df.groupby("epoch"):
        rho = spearmanr(part.hessian_trace, part.osc_share)
        print(
            f"epoch {epoch}: Spearman {rho.statistic:+.3f} (p {rho.pvalue:.3g}), {len(part)} layers"
        )


if __name__ == "__main__":
    main()
