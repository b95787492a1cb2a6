"""Records -> the comparison: tables (markdown, CSV) and figures (PNG).

    python -m oscbench.report multirun/compare_methods-cnn_small-digits [--out DIR]
    python -m oscbench.report --wandb ENTITY/PROJECT --out DIR   # runs logged online

A cell of a table averages runs that differ only in their seed: runs are grouped by their
whole results-relevant configuration (the fingerprint that identifies a run, less the
seed). Where runs of one method and bit-width differ in anything else (epochs, activation
bits, a policy's option...), those settings become columns beside the method, one row per
value. Accuracy is after BN re-estimation. Runs trained in full precision without policies
(`fp`) do not depend on the bit-width and fill every bit column; runs with `ptq=true`
(`ptq`, `osc_reg`) report the accuracy of their weights rounded to that bit-width.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from oscbench import figures as plots
from oscbench.compose import presets
from oscbench.console import warn
from oscbench.latex import latex_table
from oscbench.naming import result_key
from oscbench.quant.base import EXTRA_BIT, LOOKUP, UNIFORM, deployability
from oscbench.registry import ConfigError
from oscbench.runs import bits_free, fingerprint, run_key, scan_records
from oscbench.stats import compare, versus

RECIPE = "recipe.name"  # the setting that names a run's training recipe (conf/recipe/)
METRICS = {  # column in the runs frame -> (title, scale, decimals)
    "acc": ("Test accuracy (%) after BN re-estimation; ptq: rounded to the column's bits", 1.0, 2),
    "acc_exported": (
        "Test accuracy (%) of the exported integer model in onnxruntime (oscbench.export)",
        1.0,
        2,
    ),
    "ptq_gap_recovered": ("Share of the PTQ gap recovered (%): (QAT - PTQ) / (FP - PTQ)", 100.0, 1),
    "osc_share": ("Oscillating weights (%), last epoch", 100.0, 3),
    "stuck_share": ("Stuck weights (%): never left their level in the last epoch", 100.0, 2),
    "crossings_total": ("Threshold crossings over training", 1.0, 0),
    "dq_dw": ("Quantized over latent movement d_Q/d_w, over training (TetraJet)", 1.0, 2),
    "frozen_share": ("Frozen weights (%), end of training", 100.0, 2),
    "wall_time_s": ("Wall time (s)", 1.0, 1),
}


def load_records(root: Path) -> list[dict]:
    """Every results.json below `root`, with its directory; a file that cannot be read is
    reported (not skipped silently)."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"oscbench.report: {root} is not a directory (give a sweep or runs dir)")
    return [record | {"run_dir": str(path.parent)} for path, record in scan_records(root)]


def _method(record: dict) -> str:
    """The label of what ran (records before labels existed: the preset's name)."""
    return record.get("method") or record["config"]["method"]["name"]


def _accuracy(config: dict, final: dict, split: str = "") -> float | None:
    """The result after BN re-estimation on the test split (`split=""`) or the validation
    split (`"val_"`); a PTQ run's: its weights rounded to `bits`."""
    return final.get(result_key(bool(config.get("ptq")), config["bits"], split))


def _settings(config: dict) -> dict:
    """The run's identity less its seed: two runs average into one cell iff these agree."""
    flat = fingerprint(config)
    flat.pop("seed", None)
    return {
        k: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
        for k, v in flat.items()
    }


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run: label, bits, seed, status, the final metrics the tables use (`acc`:
    test; `val_acc`: validation), and its settings (`settings`: the configuration less the
    seed; `group`: its hash)."""
    rows = []
    for i, r in enumerate(records):
        c, f = r["config"], r.get("final", {})
        frozen = next((v for k, v in f.items() if k.endswith("frozen_share")), None)
        settings = _settings(c)
        rows.append(
            {
                "method": _method(r),
                "bits": c["bits"],
                "bits_label": r.get("bits", f"w{c['bits']}a{c['act_bits']}"),
                "seed": c["seed"],
                "bits_free": bits_free(c),
                "status": r.get("status"),
                "acc": _accuracy(c, f),
                "acc_before_bn": f.get("acc"),
                "acc_exported": r.get("export", {}).get("acc"),
                "deployable": deployability(c),
                "val_acc": _accuracy(c, f, "val_"),
                "osc_share": f.get("osc_share"),
                "stuck_share": f.get("stuck_share"),
                "ptq_gap_recovered": f.get("ptq_gap_recovered"),
                "crossings_total": f.get("crossings_total"),
                "dq_dw": f.get("dq_dw"),
                "frozen_share": frozen,
                "wall_time_s": f.get("wall_time_s", r.get("wall_time_s")),
                **{k: v for k, v in f.items() if k.startswith("acc@")},
                "error": error_line(r),
                "run_dir": r.get("run_dir"),
                "run_key": r.get("key") or run_key(c),
                "group": run_key({"settings": settings}),
                "settings": settings,
                "record": i,
            }
        )
    return _dedupe(pd.DataFrame(rows))


def error_line(record: dict) -> str:
    """The last line of a failed run's error (its exception), or "" where it has none."""
    return ((record.get("error") or "").strip().splitlines() or [""])[-1]


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """The same run (same configuration and seed) found twice counts once: the completed
    copy, else the first."""
    if df.empty:
        return df
    df = df.sort_values("status", key=lambda s: s != "completed", kind="stable")
    twice = df[df.duplicated("run_key")]
    for _, r in twice.iterrows():
        first = df[df["run_key"] == r["run_key"]].iloc[0]["run_dir"]
        warn(f"report: {r['run_dir']} repeats the run in {first}; counted once")
    return df.drop_duplicates("run_key").sort_values("record").reset_index(drop=True)


def _expand_bits_free(df: pd.DataFrame) -> pd.DataFrame:
    """Copy each bit-independent run into every bit-width column of the sweep."""
    bits = sorted(df.loc[~df["bits_free"], "bits"].unique()) or sorted(df["bits"].unique())
    free = df[df["bits_free"]]
    copies = [free.assign(bits=b) for b in bits]
    return pd.concat([df[~df["bits_free"]], *copies], ignore_index=True)


def varying_settings(df: pd.DataFrame) -> list[str]:
    """Settings that differ between runs of the same method and bit-width (other than the
    seed): the table shows them as columns, and never averages across them. Runs under
    different recipes differ in the recipe's many settings: `recipe.name` is then the one
    column for them, and other settings count only where they vary within a recipe."""
    exp = _expand_bits_free(df)
    exp = exp.assign(recipe=[s.get(RECIPE, "common") for s in exp["settings"]])
    by_recipe = any(g["recipe"].nunique() > 1 for _, g in exp.groupby(["method", "bits"]))
    varying: set[str] = set()
    for _, g in exp.groupby(["method", "recipe", "bits"] if by_recipe else ["method", "bits"]):
        keys = set().union(*g["settings"])
        for k in keys:
            if len({json.dumps(s.get(k, "-"), default=str) for s in g["settings"]}) > 1:
                varying.add(k)
    return [RECIPE] * by_recipe + sorted(varying - {"bits", RECIPE})


def _with_setting_columns(df: pd.DataFrame, varying: list[str]) -> pd.DataFrame:
    """A column per varying setting: "-" where a run lacks it, "null" where it is None (as
    YAML writes it: pandas would drop a None key from every grouping, and the row with it)."""
    df = df.copy()
    for k in varying:
        df[k] = ["null" if s.get(k, "-") is None else s.get(k, "-") for s in df["settings"]]
    return df


def _method_order(methods) -> list[str]:  # noqa: ANN001
    """The presets in their declared `order` (conf/method/), then any other label."""
    methods, order = set(methods), [p.name for p in presets()]
    return [m for m in order if m in methods] + sorted(methods - set(order))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of each metric (completed runs), per method, varying
    setting and bit-width, with the number of runs that did not complete. Each cell holds
    runs of one configuration (asserted), differing only in the seed."""
    varying = varying_settings(df)
    keys = ["method", *varying, "bits"]
    exp = _with_setting_columns(_expand_bits_free(df), varying)
    for _, g in exp.groupby(keys):
        assert g["group"].nunique() == 1, "a cell would average different configurations"
    done = exp[exp["status"] == "completed"]
    stats = done.groupby(keys)[list(METRICS)].agg(["mean", "std", "count"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats["deployable"] = done.groupby(keys)["deployable"].first()
    failed = exp[exp["status"] != "completed"].groupby(keys).size()
    stats["not_completed"] = failed.reindex(stats.index, fill_value=0)
    extra = failed.index.difference(stats.index)
    if len(extra):
        stats = pd.concat([stats, pd.DataFrame({"not_completed": failed[extra]})])
    order = {m: i for i, m in enumerate(_method_order(exp["method"]))}

    def key(idx: pd.Index) -> pd.Index:
        if idx.name == "method":
            return idx.map(order.get)
        if idx.name == RECIPE:  # the common recipe first, then the papers'
            return idx.map(lambda r: (r != "common", str(r)))
        return idx.map(_numbers_first)

    return stats.sort_index(key=key)


def _numbers_first(value: object) -> tuple[bool, float, str]:
    """A setting's value as rows are sorted: numbers by size (10, 20, 80, 160), then text."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    return (True, 0.0, str(value)) if math.isnan(number) else (False, number, "")


def recipe_differences(stats: pd.DataFrame) -> str:
    """Each method under its paper's recipe against the common one: the difference of the
    means per bit-width, for accuracy and the oscillating share, between rows that agree in
    every other setting that varies (empty without recipes; '-' where the common recipe has
    no such row)."""
    if RECIPE not in stats.index.names:
        return ""
    bits = sorted(stats.index.get_level_values("bits").unique())
    others = [n for n in stats.index.names if n not in ("method", RECIPE, "bits")]
    metrics = ("acc", "osc_share")
    head = [f"Δ{m} {b}-bit" for m in ("acc", "osc") for b in bits]
    out = [
        "\n### Each paper's recipe against the common one\n",
        "Difference of the means (the paper's recipe minus common) for the methods run under "
        "both, between rows alike in every other setting; the tables above give each with its "
        "spread over seeds.\n",
        "| " + " | ".join(["method", "recipe", *others, *head]) + " |",
        "|---" * (2 + len(others) + len(head)) + "|",
    ]
    flat = stats.reset_index()
    for method, g in flat.groupby("method", sort=False):
        common = g[g[RECIPE] == "common"]
        for key, h in g[g[RECIPE] != "common"].groupby([RECIPE, *others], sort=False):
            alike = common
            for k, v in zip(others, key[1:], strict=True):
                alike = alike[alike[k] == v]
            base, h = alike.set_index("bits"), h.set_index("bits")
            cells = []
            for metric in metrics:
                _, scale, decimals = METRICS[metric]
                col = f"{metric}_mean"
                for b in bits:
                    d = h[col].get(b, math.nan) - base[col].get(b, math.nan)
                    cells.append("-" if math.isnan(d) else f"{d * scale:+,.{decimals}f}")
            out.append("| " + " | ".join([method, *map(str, key), *cells]) + " |")
    return "\n".join(out) + "\n"


def _cell(mean: float, std: float, n: int, scale: float, decimals: int) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean * scale:,.{decimals}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:,.{decimals}f}"
    return text


def _deployable(stats: pd.DataFrame, row: tuple) -> str:
    """A row's deployability: one value for all its bit-widths (the quantizers decide it)."""
    values = stats.xs(row, level=list(range(len(row))))["deployable"].dropna().unique()
    return ", ".join(map(str, values)) or "-"


def markdown(stats: pd.DataFrame, df: pd.DataFrame) -> str:
    """One table per metric: a row per method (and varying setting), a column per bit-width."""
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
                cell = _cell(
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
        f"integers at one more bit), {LOOKUP} (learned thresholds: a table, no QuantizeLinear); "
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
    """The report's figures (oscbench/figures.py) of the completed runs: accuracy vs bits,
    oscillation over training and per layer, per-weight oscillation counts and distances
    to the thresholds at the lowest bit-width, and cross-bit accuracy where runs were
    rounded to other widths. One colour per method in all of them."""
    ok = df[df["status"] == "completed"]
    if ok.empty:
        return []
    order = _method_order(ok["method"])
    ok = ok.assign(label=plots.series(ok))
    rank = {m: i for i, m in enumerate(order)}
    ok = ok.sort_values(["method", "label"], key=lambda c: c.map(rank) if c.name == "method" else c)
    style = plots.looks(ok, order)
    paths = [plots.accuracy_vs_bits(_expand_bits_free(ok), style, out)]
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


TESTED = ("acc", "osc_share", "crossings_total")  # the metrics compared with the baseline


def significance(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each method against `baseline` at every bit-width (`oscbench.stats.compare`) for the
    TESTED metrics, within each combination of the settings that vary (a recipe, say)."""
    varying = varying_settings(df)
    if not (df["status"] == "completed").any():
        return pd.DataFrame()
    exp = _with_setting_columns(_tested_frame(df), varying)
    tables = []
    for values, group in exp.groupby(varying) if varying else [((), exp)]:
        for metric in TESTED:
            table = compare(group, metric, baseline)
            for k, v in zip(varying, values, strict=True):
                table.insert(0, k, v)
            tables.append(table)
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _difference(r: pd.Series, scale: float, decimals: int) -> tuple[str, str]:
    """A tested row's difference with its interval, and its Holm-adjusted p (markdown;
    bold where significant); the difference alone where too few runs were tested."""
    if r["p"] is None or pd.isna(r["p"]):
        return f"{r['diff'] * scale:+.{decimals}f}", "-"
    lo, hi = r["ci_low"] * scale, r["ci_high"] * scale
    diff = f"{r['diff'] * scale:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"
    p = f"{r['p_holm']:.3g}"
    return (f"**{diff}**", f"**{p}**") if r["significant"] else (diff, p)


def significance_markdown(table: pd.DataFrame, baseline: str) -> str:
    """One table per metric: difference [95 % interval], Holm-adjusted p; bold where it is
    below 0.05."""
    if table.empty:
        return (
            f"\n### Differences from {baseline}\n\nNo completed {baseline} runs beside the "
            "others: pick a baseline present in the sweep with --baseline.\n"
        )
    out = [
        f"\n### Differences from {baseline} (mean over seeds, 95 % interval, Holm-adjusted p)\n",
        "Paired t-test by seed where both share their seeds and an FP start, else Welch's; "
        "Holm's correction over each metric's table. **Bold**: p < 0.05 after it.\n",
    ]
    keys = [c for c in table.columns if c not in ("label", "bits", "baseline", "metric")]
    keys = keys[: keys.index("n")]  # the varying settings, if any
    for metric, rows in table.groupby("metric", sort=False):
        title, scale, decimals = METRICS[metric]
        out += [
            f"#### {title}\n",
            "| " + " | ".join([*keys, "method", "bits"]) + " | difference | p (Holm) | test | n |",
        ]
        out.append("|---" * (len(keys) + 6) + "|")
        for _, r in rows.iterrows():
            diff, p = _difference(r, scale, decimals)
            cells = [
                *(str(r[k]) for k in keys),
                r["label"],
                str(r["bits"]),
                diff,
                p,
                r["test"],
                f"{r['n']} / {r['n_baseline']}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _tested_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Completed runs with what `oscbench.stats` needs: label (the method), bits, seed,
    init_from, and the metrics."""
    done = _expand_bits_free(df[df["status"] == "completed"]).copy()
    done["label"] = done["method"]
    done["init_from"] = [s.get("init_from") for s in done["settings"]]
    return done


def versus_markdown(df: pd.DataFrame, other: pd.DataFrame, name: str) -> tuple[str, pd.DataFrame]:
    """These runs against `other` (the same methods run otherwise: untuned, say) per method
    and bit-width: test accuracy of each, the difference with its 95 % interval and Holm's
    p over the table (oscbench.stats.versus); bold where significant."""
    a, b = _tested_frame(df), _tested_frame(other)
    table = versus(a, b, "acc")
    if table.empty:
        shared = sorted(set(a["label"]) & set(b["label"]))
        return (
            f"\n### Against {name}\n\nNo method at a bit-width that both hold (these: "
            f"{', '.join(sorted(set(a['label'])))}; {name}: {', '.join(sorted(set(b['label'])))}"
            + (f"; both: {', '.join(shared)}, at other bit-widths" if shared else "")
            + "): nothing to compare.\n",
            table,
        )
    out = [
        f"\n### Against {name} (these runs minus those, test accuracy %)\n",
        "Mean ± std over seeds; the difference of the means, its 95 % interval and Holm's "
        "adjusted p over this table. **Bold**: p < 0.05 after it.\n",
        f"| method | bits | these | {name} | difference | p (Holm) | test |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(_method_order(table["label"]))} if len(table) else {}
    rows = table.sort_values("bits", kind="stable")
    rows = rows.sort_values("label", key=lambda c: c.map(order), kind="stable")
    for _, r in rows.iterrows():
        cells = []
        for frame in (a, b):
            x = frame[(frame["label"] == r["label"]) & (frame["bits"] == r["bits"])]["acc"]
            cells.append(_cell(x.mean(), x.std(), len(x), 1.0, 2))
        diff, p = _difference(r, 1.0, 2)
        out.append(
            f"| {r['label']} | {r['bits']} | {' | '.join(cells)} | {diff} | {p} | {r['test']} |"
        )
    return "\n".join(out) + "\n", table


def tuning_markdown(rows: list[dict]) -> str:
    """The best parameters each tuning study found (oscbench.tune.summary's rows)."""
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
        from oscbench.tune import summary as tune_summary  # Optuna: slow to import

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
    runs = _with_setting_columns(df, varying).drop(columns=["settings"])
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


if __name__ == "__main__":
    main()
