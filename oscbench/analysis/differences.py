"""Is a difference real? Each method against the baseline (`--baseline`), one recipe against
another (`recipe=`), and a sweep against another (`--versus`): differences of the means
over seeds with their confidence intervals and p-values (`oscbench.analysis.stats`)."""

from __future__ import annotations

import math

import pandas as pd

from oscbench.analysis.frame import (
    METRICS,
    RECIPE,
    cell_text,
    expand_bits_free,
    method_order,
    varying_settings,
    with_setting_columns,
)
from oscbench.analysis.stats import compare, versus


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


TESTED = ("acc", "osc_share", "crossings_total")  # the metrics compared with the baseline


def significance(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each method against `baseline` at every bit-width (`oscbench.analysis.stats.compare`) for the
    TESTED metrics, within each combination of the settings that vary (a recipe, say)."""
    varying = varying_settings(df)
    if not (df["status"] == "completed").any():
        return pd.DataFrame()
    exp = with_setting_columns(_tested_frame(df), varying)
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
    """Completed runs with what `oscbench.analysis.stats` needs: label (the method), bits, seed,
    init_from, and the metrics."""
    done = expand_bits_free(df[df["status"] == "completed"]).copy()
    done["label"] = done["method"]
    done["init_from"] = [s.get("init_from") for s in done["settings"]]
    return done


def versus_markdown(df: pd.DataFrame, other: pd.DataFrame, name: str) -> tuple[str, pd.DataFrame]:
    """These runs against `other` (the same methods run otherwise: untuned, say) per method
    and bit-width: test accuracy of each, the difference with its 95 % interval and Holm's
    p over the table (oscbench.analysis.stats.versus); bold where significant."""
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
    order = {m: i for i, m in enumerate(method_order(table["label"]))} if len(table) else {}
    rows = table.sort_values("bits", kind="stable")
    rows = rows.sort_values("label", key=lambda c: c.map(order), kind="stable")
    for _, r in rows.iterrows():
        cells = []
        for frame in (a, b):
            x = frame[(frame["label"] == r["label"]) & (frame["bits"] == r["bits"])]["acc"]
            cells.append(cell_text(x.mean(), x.std(), len(x), 1.0, 2))
        diff, p = _difference(r, 1.0, 2)
        out.append(
            f"| {r['label']} | {r['bits']} | {' | '.join(cells)} | {diff} | {p} | {r['test']} |"
        )
    return "\n".join(out) + "\n", table
