"""Records -> the comparison: tables (markdown, CSV) and figures (PNG).

    python -m oscbench.report multirun/compare_methods-cnn_small-digits [--out DIR]
    python -m oscbench.report --wandb ENTITY/PROJECT --out DIR   # runs logged online

Accuracy is after BN re-estimation. Runs trained in full precision without policies (`fp`)
do not depend on the bit-width and fill every bit column; `ptq` and `osc_reg` report the
accuracy of their weights rounded to that bit-width (`acc@Nbit`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from oscbench.runs import RESULTS  # noqa: E402

ORDER = ["fp", "ptq", "lsq", "lsq_dampen", "lsq_freeze", "ofq", "aoq", "osc_reg"]
METRICS = {  # column in the runs frame -> (title, scale, decimals)
    "acc": ("Test accuracy (%), after BN re-estimation", 1.0, 2),
    "osc_share": ("Oscillating weights (%), last epoch", 100.0, 3),
    "crossings_total": ("Threshold crossings over training", 1.0, 0),
    "frozen_share": ("Frozen weights (%), end of training", 100.0, 2),
    "wall_time_s": ("Wall time (s)", 1.0, 1),
}


def load_records(root: Path) -> list[dict]:
    """Every results.json below `root`, with its directory."""
    records = []
    for path in sorted(Path(root).rglob(RESULTS)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        record["run_dir"] = str(path.parent)
        records.append(record)
    return records


def _bits_free(config: dict) -> bool:
    return (
        config["quantizer"]["name"] == "none"
        and not config.get("policy")
        and not config.get("cross_bits")
    )


def _accuracy(config: dict, final: dict) -> float | None:
    if config["quantizer"]["name"] == "none" and config.get("cross_bits"):
        return final.get(f"acc@{config['bits']}bit")
    return final.get("acc_bn")


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run: identity, status, the final metrics the tables use."""
    rows = []
    for r in records:
        c, f = r["config"], r.get("final", {})
        frozen = next((v for k, v in f.items() if k.endswith("frozen_share")), None)
        rows.append(
            {
                "method": c["method"]["name"],
                "bits": c["bits"],
                "act_bits": c["act_bits"],
                "seed": c["seed"],
                "model": c["model"]["name"],
                "dataset": c["dataset"]["name"],
                "bits_free": _bits_free(c),
                "status": r.get("status"),
                "acc": _accuracy(c, f),
                "acc_before_bn": f.get("acc"),
                "osc_share": f.get("osc_share"),
                "crossings_total": f.get("crossings_total"),
                "frozen_share": frozen,
                "wall_time_s": f.get("wall_time_s", r.get("wall_time_s")),
                **{k: v for k, v in f.items() if k.startswith("acc@")},
                "error": (r.get("error") or "").strip().splitlines()[-1:] or None,
                "run_dir": r.get("run_dir"),
            }
        )
    df = pd.DataFrame(rows)
    if not df.empty:
        df["error"] = df["error"].map(lambda e: e[0] if e else "")
    return df


def _expand_bits_free(df: pd.DataFrame) -> pd.DataFrame:
    """Copy each bit-independent run into every bit-width column of the sweep."""
    bits = sorted(df.loc[~df["bits_free"], "bits"].unique()) or sorted(df["bits"].unique())
    free = df[df["bits_free"]]
    copies = [free.assign(bits=b) for b in bits]
    return pd.concat([df[~df["bits_free"]], *copies], ignore_index=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of each metric, per method and bit-width (completed
    runs), with the number of failed runs."""
    done = _expand_bits_free(df[df["status"] == "completed"])
    stats = done.groupby(["method", "bits"])[list(METRICS)].agg(["mean", "std", "count"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    failed = _expand_bits_free(df[df["status"] != "completed"]).groupby(["method", "bits"]).size()
    stats["not_completed"] = failed.reindex(stats.index, fill_value=0)
    extra = failed.index.difference(stats.index)
    if len(extra):
        stats = pd.concat([stats, pd.DataFrame({"not_completed": failed[extra]})])
    order = {m: i for i, m in enumerate(ORDER)}
    return stats.sort_index(
        key=lambda idx: idx.map(lambda v: order.get(v, len(order))) if idx.name == "method" else idx
    )


def _cell(mean: float, std: float, n: int, scale: float, decimals: int) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean * scale:,.{decimals}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:,.{decimals}f}"
    return text


def markdown(stats: pd.DataFrame, df: pd.DataFrame) -> str:
    """One table per metric: a row per method, a column per bit-width."""
    out = []
    bits = sorted(stats.index.get_level_values("bits").unique())
    methods = list(dict.fromkeys(stats.index.get_level_values("method")))
    seeds = sorted(df["seed"].unique())
    out.append(
        f"Runs: {len(df)} ({(df['status'] == 'completed').sum()} completed), seeds "
        f"{', '.join(map(str, seeds))}; mean ± std over seeds.\n"
    )
    for metric, (title, scale, decimals) in METRICS.items():
        out.append(f"### {title}\n")
        out.append("| method | " + " | ".join(f"{b}-bit" for b in bits) + " |")
        out.append("|---|" + "---|" * len(bits))
        for m in methods:
            cells = []
            for b in bits:
                if (m, b) not in stats.index:
                    cells.append("")
                    continue
                row = stats.loc[(m, b)]
                cell = _cell(
                    row.get(f"{metric}_mean"),
                    row.get(f"{metric}_std"),
                    int(row.get(f"{metric}_count", 0) or 0),
                    scale,
                    decimals,
                )
                if metric == "acc" and row.get("not_completed", 0):
                    cell += f" ({int(row['not_completed'])} failed)"
                cells.append(cell)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    bad = df[df["status"] != "completed"]
    if len(bad):
        out.append("### Runs that did not complete\n")
        out.append("| method | bits | seed | status | error | run |")
        out.append("|---|---|---|---|---|---|")
        for _, r in bad.iterrows():
            out.append(
                f"| {r['method']} | {r['bits']} | {r['seed']} | {r['status']} | "
                f"{r['error'] or '-'} | {r['run_dir']} |"
            )
        out.append("")
    return "\n".join(out)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(records: list[dict], df: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy vs bits, oscillating share over training, per-weight oscillation counts,
    distance to the nearest threshold, and cross-bit accuracy of PTQ / osc_reg."""
    done = [r for r in records if r.get("status") == "completed"]
    ok = df[df["status"] == "completed"]
    paths = []
    methods = [m for m in ORDER if m in set(ok["method"])] + sorted(set(ok["method"]) - set(ORDER))

    fig, ax = plt.subplots(figsize=(6, 4))
    exp = _expand_bits_free(ok)
    for m in methods:
        g = exp[exp["method"] == m].groupby("bits")["acc"]
        ax.errorbar(
            g.mean().index,
            g.mean().values,
            yerr=g.std().fillna(0).values,
            marker="o",
            capsize=3,
            label=m,
        )
    ax.set(xlabel="weight bits", ylabel="test accuracy (%)", title="Accuracy vs bit-width")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_vs_bits.png"))

    tracked = [r for r in done if r["history"] and "osc" in r["history"][-1]]
    bits = sorted({r["config"]["bits"] for r in tracked})
    if tracked:
        fig, axes = plt.subplots(1, len(bits), figsize=(4.5 * len(bits), 3.6), squeeze=False)
        for ax, b in zip(axes[0], bits, strict=True):
            for m in methods:
                curves = [
                    [h["osc"]["osc_share"] * 100 for h in r["history"] if "osc" in h]
                    for r in tracked
                    if r["config"]["method"]["name"] == m and r["config"]["bits"] == b
                ]
                if curves:
                    mean = pd.DataFrame(curves).mean()
                    ax.plot(mean.index + 1, mean.values, label=m)
            ax.set(xlabel="epoch", ylabel="oscillating weights (%)", title=f"{b}-bit")
        axes[0][0].legend(fontsize=8)
        paths.append(_save(fig, out / "oscillating_share.png"))

        low = min(bits)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m in methods:
            runs = [
                r
                for r in tracked
                if r["config"]["method"]["name"] == m and r["config"]["bits"] == low
            ]
            if not runs:
                continue
            hists = [r["final"]["osc_count_hist"] for r in runs]
            width = max(map(len, hists))
            counts = pd.DataFrame([h + [0] * (width - len(h)) for h in hists]).sum()
            share = counts / counts.sum()
            axes[0].plot(share.index, share.values, marker=".", label=m)
            dist = pd.DataFrame(
                [r["final"]["threshold_distance"]["counts"][:-1] for r in runs]
            ).sum()
            edges = runs[0]["final"]["threshold_distance"]["edges"]
            axes[1].plot(
                [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)],
                (dist / dist.sum()).values,
                label=m,
            )
        axes[0].set(
            yscale="log",
            xlabel="oscillations of a weight over training",
            ylabel="share of weights",
            title=f"Per-weight oscillation counts, {low}-bit",
        )
        axes[1].set(
            xlabel="distance to nearest threshold (steps)",
            ylabel="share of weights",
            title=f"Latent weights vs thresholds, {low}-bit, end of training",
        )
        axes[0].legend(fontsize=8)
        paths.append(_save(fig, out / "oscillation_histograms.png"))

    cross = (
        ok[ok.filter(like="acc@").notna().any(axis=1)] if ok.filter(like="acc@").size else ok[:0]
    )
    if len(cross):
        fig, ax = plt.subplots(figsize=(6, 4))
        cols = sorted(cross.filter(like="acc@").columns, key=lambda c: int(c[4:-3]))
        xs = [int(c[4:-3]) for c in cols]
        for (m, b), g in cross.groupby(["method", "bits"]):
            ax.plot(xs, g[cols].mean().values, marker="o", label=f"{m} (trained for {b}-bit)")
        ax.set(
            xlabel="bits of rounded weights",
            ylabel="test accuracy (%)",
            title="Cross-bit accuracy (round to nearest)",
        )
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "cross_bit_accuracy.png"))
    return paths


def write_report(records: list[dict], out: Path) -> dict[str, Path]:
    """Write table.md, table.csv, runs.csv and the figures into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    df = runs_frame(records)
    if df.empty:
        raise SystemExit("oscbench.report: no results.json found")
    stats = summary(df)
    (out / "table.md").write_text(markdown(stats, df))
    stats.to_csv(out / "table.csv")
    df.to_csv(out / "runs.csv", index=False)
    paths = {
        "table.md": out / "table.md",
        "table.csv": out / "table.csv",
        "runs.csv": out / "runs.csv",
    }
    paths |= {p.name: p for p in figures(records, df, out)}
    return paths


def records_from_wandb(path: str) -> list[dict]:
    """The same records from W&B runs logged online (config, summary, per-epoch history)."""
    import wandb

    records = []
    for run in wandb.Api().runs(path):
        history = [
            {"epoch": h["epoch"], "osc": {"osc_share": h["osc/osc_share"]}}
            for h in run.scan_history(keys=["epoch", "osc/osc_share"])
        ]
        status = {"finished": "completed", "crashed": "failed", "failed": "failed"}.get(
            run.state, run.state
        )
        records.append(
            {
                "status": status,
                "config": dict(run.config),
                "history": history,
                "final": dict(run.summary),
                "run_dir": run.url,
            }
        )
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oscbench.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", nargs="?", help="a sweep or runs directory")
    parser.add_argument("--out", help="output directory (default: ROOT/report)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead")
    args = parser.parse_args(argv)
    if bool(args.root) == bool(args.wandb):
        parser.error("give a directory or --wandb ENTITY/PROJECT")
    records = records_from_wandb(args.wandb) if args.wandb else load_records(Path(args.root))
    out = Path(args.out or Path(args.root or ".") / "report")
    paths = write_report(records, out)
    print((out / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
