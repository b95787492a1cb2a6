"""Records -> the comparison: tables (markdown, CSV) and figures (PNG).

    python -m oscbench.report multirun/compare_methods-cnn_small-digits [--out DIR]
    python -m oscbench.report --wandb ENTITY/PROJECT --out DIR   # runs logged online

The runs frame and its cells are `oscbench.analysis.frame`'s; the tests of differences,
`oscbench.analysis.differences`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from oscbench.analysis import figures as plots
from oscbench.analysis.differences import (
    recipe_differences,
    significance,
    significance_markdown,
    versus_markdown,
)
from oscbench.analysis.frame import (
    METRICS,
    cell_text,
    expand_bits_free,
    load_records,
    method_order,
    runs_frame,
    summary,
    varying_settings,
    with_setting_columns,
)
from oscbench.analysis.latex import latex_table
from oscbench.quant.base import EXTRA_BIT, LOOKUP, UNIFORM
from oscbench.registry import ConfigError


def _deployable(stats: pd.DataFrame, row: tuple) -> str:
    """A row's deployability: one value for all its bit-widths (the quantizers decide it)."""
    values = stats.xs(row, level=list(range(len(row))))["deployable"].dropna().unique()
    return ", ".join(map(str, values)) or "-"


def markdown(stats: pd.DataFrame, df: pd.DataFrame) -> str:
    """One table per metric that some run has: a row per method (and varying setting), a
    column per bit-width."""
    out = []
    names = list(stats.index.names)
    row_keys = names[:-1]  # method and the varying settings
    bits = sorted(stats.index.get_level_values("bits").unique())
    rows = list(dict.fromkeys(idx[:-1] for idx in stats.index))
    seeds = sorted(df["seed"].unique())
    out.append(
        f"Runs: {len(df)} ({(df['status'] == 'completed').sum()} completed), seeds "
        f"{', '.join(map(str, seeds))}; mean ± std over seeds: each cell averages runs whose "
        "configurations differ only in the seed.\n"
    )
    if len(row_keys) > 1:
        out.append(
            "Settings that differ between runs of a method, one row per value: "
            f"{', '.join(row_keys[1:])}.\n"
        )
    for metric, (title, scale, decimals) in METRICS.items():
        if not stats.get(f"{metric}_count", pd.Series(dtype=float)).fillna(0).any():
            continue  # no run has it (no run exported, none froze a weight): no empty table
        extra = ["deployable"] if metric.startswith("acc") else []
        out.append(f"### {title}\n")
        head = [*row_keys, *extra, *(f"{b}-bit" for b in bits)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---" * len(head) + "|")
        for row in rows:
            cells = [_deployable(stats, row)] if extra else []
            for b in bits:
                if (*row, b) not in stats.index:
                    cells.append("")
                    continue
                r = stats.loc[(*row, b)].fillna(0)  # a cell of failed runs only has no stats
                cell = cell_text(
                    r.get(f"{metric}_mean"),
                    r.get(f"{metric}_std"),
                    int(r.get(f"{metric}_count", 0)),
                    scale,
                    decimals,
                )
                if metric == "acc" and r.get("not_completed", 0):
                    cell += f" ({int(r['not_completed'])} failed)"
                cells.append(cell)
            out.append("| " + " | ".join([*map(str, row), *cells]) + " |")
        out.append("")
    out.append(
        "deployable: how the run's quantizers' levels map to integers (`Quantizer.deploy`): "
        f"{UNIFORM} (QuantizeLinear at b bits), {EXTRA_BIT} (mid-rise levels, the odd "
        f"integers at one more bit), {LOOKUP} (learned thresholds, counted, or uneven levels, "
        "a table the codes index; no QuantizeLinear); "
        "fp: full precision.\n"
    )
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


def figures(records: list[dict], df: pd.DataFrame, out: Path) -> list[Path]:
    """The report's figures (oscbench/analysis/figures.py) of the completed runs: accuracy vs bits,
    oscillation over training and per layer, per-weight oscillation counts and distances
    to the thresholds at the lowest bit-width, and cross-bit accuracy where runs were
    rounded to other widths. One colour per method in all of them."""
    ok = df[df["status"] == "completed"]
    if ok.empty:
        return []
    order = method_order(ok["method"])
    ok = ok.assign(label=plots.series(ok))
    rank = {m: i for i, m in enumerate(order)}
    ok = ok.sort_values(["method", "label"], key=lambda c: c.map(rank) if c.name == "method" else c)
    style = plots.looks(ok, order)
    paths = [plots.accuracy_vs_bits(expand_bits_free(ok), style, out)]
    has_osc = [
        bool(records[i]["history"]) and "osc" in records[i]["history"][-1] for i in ok["record"]
    ]
    tracked = ok[has_osc]
    if len(tracked):
        paths += [
            plots.over_training(records, tracked, style, out),
            plots.by_layer(records, tracked, style, out),
        ]
        paths += [p for p in [plots.histograms(records, tracked, style, out)] if p]
    rounded = ok.filter(like="acc@")
    cross = ok[rounded.notna().any(axis=1)] if rounded.size else ok[:0]
    if len(cross):
        paths.append(plots.cross_bits(cross, style, out))
    return paths


def tuning_markdown(rows: list[dict]) -> str:
    """The best parameters each tuning study found (oscbench.launch.tune.summary's rows)."""
    out = [
        "\n### Best hyper-parameters per method and bit-width (tuning studies)\n",
        "Objective: validation accuracy after BN re-estimation (%), on the tuning seed.\n",
        "| study | trials (failed) | best trial | validation acc. | parameters |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
        )
        value = "-" if r["best_value"] is None else f"{r['best_value']:.2f}"
        trials = f"{r['complete'] + r['failed']} ({r['failed']})"
        out.append(f"| {r['study']} | {trials} | {r['best_trial']} | {value} | {params or '-'} |")
    return "\n".join(out) + "\n"


def write_report(
    records: list[dict],
    out: Path,
    baseline: str = "lsq",
    tuned: Path | None = None,
    versus_dir: Path | None = None,
) -> dict[str, Path]:
    """Write table.md (with the differences from `baseline`, the best parameters of the
    tuning sweep `tuned` and the differences from the runs below `versus_dir`, if given),
    table.tex (LaTeX, booktabs), table.csv, significance.csv, runs.csv, best_params.csv
    (with `tuned`), versus.csv (with `versus_dir`) and the figures into `out`."""
    df = runs_frame(records)
    if df.empty:
        raise SystemExit("oscbench.report: no results.json found")
    out.mkdir(parents=True, exist_ok=True)
    stats = summary(df)
    tested = significance(df, baseline)
    text = markdown(stats, df) + recipe_differences(stats) + significance_markdown(tested, baseline)
    paths = {}
    if tuned is not None:
        from oscbench.launch.tune import summary as tune_summary  # Optuna: slow to import

        best = tune_summary(tuned)
        text += tuning_markdown(best)
        pd.DataFrame(best).to_csv(out / "best_params.csv", index=False)
        paths["best_params.csv"] = out / "best_params.csv"
    if versus_dir is not None:
        other = runs_frame(load_records(versus_dir))
        section, table = versus_markdown(df, other, versus_dir.name)
        text += section
        table.to_csv(out / "versus.csv", index=False)
        paths["versus.csv"] = out / "versus.csv"
    (out / "table.md").write_text(text)
    (out / "table.tex").write_text(latex_table(stats, tested, baseline))
    stats.to_csv(out / "table.csv")
    tested.to_csv(out / "significance.csv", index=False)
    varying = varying_settings(df)
    runs = with_setting_columns(df, varying).drop(columns=["settings"])
    runs.to_csv(out / "runs.csv", index=False)
    paths |= {
        "table.md": out / "table.md",
        "table.tex": out / "table.tex",
        "table.csv": out / "table.csv",
        "significance.csv": out / "significance.csv",
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
                "method": run.job_type,
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
    parser.add_argument(
        "--baseline", default="lsq", help="the method the others are tested against (or fp)"
    )
    parser.add_argument(
        "--tuned",
        metavar="DIR",
        help="a tuning sweep (experiment=tune_methods): its best parameters",
    )
    parser.add_argument(
        "--versus", metavar="DIR", help="runs of the same methods to test these against (untuned)"
    )
    args = parser.parse_args(argv)
    if bool(args.root) == bool(args.wandb):
        parser.error("give a directory or --wandb ENTITY/PROJECT")
    records = records_from_wandb(args.wandb) if args.wandb else load_records(Path(args.root))
    out = Path(args.out or Path(args.root or ".") / "report")
    tuned = Path(args.tuned) if args.tuned else None
    try:
        versus_dir = Path(args.versus) if args.versus else None
        paths = write_report(records, out, args.baseline, tuned, versus_dir)
    except ConfigError as e:
        parser.exit(2, f"oscbench.report: {e}\n")
    except OSError as e:
        parser.exit(
            2,
            f"oscbench.report: cannot write the report to {out} ({e.strerror or e}); choose "
            "another with --out DIR, or make it writable\n",
        )
    print((out / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
