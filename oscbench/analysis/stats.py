"""Is a method's difference from a baseline real? Per method and bit-width: the difference
of the means over seeds, its 95 % confidence interval and p-value from scipy's t-tests, and
Holm's correction across the table (statsmodels). Paired by seed (`ttest_rel`) when both
cells hold the same seeds and every run starts from its seed's FP run (`init_from=fp`), so
that a seed's two runs share their start; otherwise Welch's test (`ttest_ind`,
`equal_var=False`). The report (`oscbench/analysis/report.py: significance`) tests each
method against `--baseline` (lsq by default) this way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

COLUMNS = ["label", "bits", "seed", "init_from"]  # what `compare` needs besides the metric


def t_test(x: np.ndarray, y: np.ndarray, paired: bool, alternative: str = "two-sided"):  # noqa: ANN201
    """scipy's t-test of mean(x) - mean(y): paired by position (`ttest_rel`) or Welch's
    (`ttest_ind`, `equal_var=False`)."""
    if paired:
        return stats.ttest_rel(x, y, alternative=alternative)
    return stats.ttest_ind(x, y, equal_var=False, alternative=alternative)


def _test(a: pd.DataFrame, b: pd.DataFrame, metric: str, level: float) -> dict:
    """`a` against `b` (the baseline), each a cell's runs."""
    paired = (
        sorted(a["seed"]) == sorted(b["seed"])
        and (a["init_from"] == "fp").all()
        and (b["init_from"] == "fp").all()
    )
    x, y = a.sort_values("seed")[metric], b.sort_values("seed")[metric]
    out = {"n": len(x), "n_baseline": len(y), "diff": x.mean() - y.mean()}
    if min(len(x), len(y)) < 2:
        return out | {"test": "too few runs", "ci_low": None, "ci_high": None, "p": None}
    res = t_test(x.to_numpy(), y.to_numpy(), paired)
    ci = res.confidence_interval(confidence_level=level)
    return out | {
        "test": "paired t" if paired else "Welch t",
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "p": float(res.pvalue),
    }


def compare(
    runs: pd.DataFrame, metric: str, baseline: str = "lsq", alpha: float = 0.05
) -> pd.DataFrame:
    """A row per (label, bits) other than the baseline's: the difference of `metric` from
    the baseline's at the same bit-width (`runs`: one row per run, with `COLUMNS` and the
    metric; a baseline without a bit-width, such as fp, stands for every one), the
    (1 - alpha) interval, the p-value, Holm's adjusted p-value over the rows that have one,
    and whether it is below alpha."""
    runs = runs.dropna(subset=[metric])
    base = runs[runs["label"] == baseline]
    rows = []
    for (label, bits), cell in runs[runs["label"] != baseline].groupby(["label", "bits"]):
        ref = base[base["bits"].isin([bits]) | base["bits"].isna()]
        if ref.empty:
            continue
        rows.append(
            {"label": label, "bits": bits, "baseline": baseline, "metric": metric}
            | _test(cell, ref, metric, 1 - alpha)
        )
    return _holm(pd.DataFrame(rows), alpha)


def versus(a: pd.DataFrame, b: pd.DataFrame, metric: str, alpha: float = 0.05) -> pd.DataFrame:
    """Two sets of runs of the same methods (`a`: tuned, say; `b`: untuned), each with
    `COLUMNS` and the metric: a row per (label, bits) in both, the difference a - b with its
    interval and p-value (tested as `compare` does), Holm's correction over the rows."""
    a, b = a.dropna(subset=[metric]), b.dropna(subset=[metric])
    rows = []
    for (label, bits), cell in a.groupby(["label", "bits"]):
        ref = b[(b["label"] == label) & (b["bits"] == bits)]
        if len(ref):
            rows.append(
                {"label": label, "bits": bits, "metric": metric}
                | _test(cell, ref, metric, 1 - alpha)
            )
    return _holm(pd.DataFrame(rows), alpha)


def _holm(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm's adjusted p-values over the rows that have a p-value, and `significant`."""
    if table.empty:
        return table
    tested = table["p"].notna()
    table["p_holm"] = None
    table["significant"] = False
    if tested.any():
        reject, adjusted, _, _ = multipletests(table.loc[tested, "p"], alpha, method="holm")
        table.loc[tested, "p_holm"] = adjusted
        table.loc[tested, "significant"] = reject
    return table
