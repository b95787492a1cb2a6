"""The report's statistics (oscbench/analysis/stats.py) against scipy on a hand-made runs.csv with a
known answer: method a differs from the baseline, method b does not."""

import io

import pandas as pd
import pytest
from scipy import stats

from oscbench.analysis.stats import compare, versus

RUNS = """label,bits,seed,init_from,acc
lsq,2,0,{init},80.0
lsq,2,1,{init},81.0
lsq,2,2,{init},82.5
lsq,2,3,{init},83.0
lsq,2,4,{init},84.0
a,2,0,{init},90.0
a,2,1,{init},91.5
a,2,2,{init},92.0
a,2,3,{init},93.0
a,2,4,{init},94.5
b,2,0,{init},80.5
b,2,1,{init},82.0
b,2,2,{init},80.0
b,2,3,{init},84.0
b,2,4,{init},83.0
"""


def _runs(init: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(RUNS.format(init=init)))


@pytest.mark.parametrize("init", ["fp", "none"])
def test_differences_agree_with_scipy_and_holm_and_only_the_real_one_is_significant(init):
    runs = _runs(init)
    table = compare(runs, "acc").set_index("label")
    base = runs[runs.label == "lsq"].sort_values("seed")["acc"].to_numpy()
    p = {}
    for label in ("a", "b"):
        x = runs[runs.label == label].sort_values("seed")["acc"].to_numpy()
        res = (
            stats.ttest_rel(x, base) if init == "fp" else stats.ttest_ind(x, base, equal_var=False)
        )
        ci = res.confidence_interval(0.95)
        row = table.loc[label]
        assert row["test"] == ("paired t" if init == "fp" else "Welch t")
        assert row["diff"] == pytest.approx(x.mean() - base.mean(), rel=1e-12)
        assert row["p"] == pytest.approx(res.pvalue, rel=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
        p[label] = res.pvalue
    low, high = sorted(p.values())  # Holm over two: 2 p_(1), then max(that, p_(2))
    holm = {k: (2 * low if v == low else max(2 * low, high)) for k, v in p.items()}
    for label in ("a", "b"):
        assert table.loc[label, "p_holm"] == pytest.approx(min(holm[label], 1.0), rel=1e-12)
    assert table.loc["a", "significant"] and not table.loc["b", "significant"]
    assert table.loc["a", "ci_low"] > 0 > table.loc["b", "ci_low"]


def test_a_baseline_without_a_bit_width_stands_for_every_one_and_lone_runs_are_not_tested():
    runs = _runs("none")
    runs.loc[runs.label == "lsq", ["label", "bits"]] = ["fp", None]
    lone = pd.DataFrame([{"label": "c", "bits": 2, "seed": 0, "init_from": "none", "acc": 1.0}])
    table = compare(pd.concat([runs, lone]), "acc", baseline="fp").set_index("label")
    assert set(table.index) == {"a", "b", "c"} and (table["baseline"] == "fp").all()
    assert table.loc["c", "test"] == "too few runs" and not table.loc["c", "significant"]


def test_the_report_marks_the_significant_difference_only():
    from oscbench.analysis.differences import significance_markdown

    text = significance_markdown(compare(_runs("fp"), "acc"), "lsq")
    rows = {
        line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "paired" in line
    }
    assert set(rows) == {"a", "b"}
    assert "**+10.10 [" in rows["a"] and "**" not in rows["b"]
    assert "no completed lsq" in significance_markdown(pd.DataFrame(), "lsq").lower()


def test_two_sets_of_runs_of_the_same_methods_are_tested_cell_by_cell_against_scipy():
    """`versus`: method a moved by tuning (Welch: no FP start), b not; Holm over both."""
    runs = _runs("none")
    tuned = runs[runs.label != "lsq"].copy()
    untuned = tuned.copy()
    untuned.loc[untuned.label == "a", "acc"] -= 10.0
    untuned.loc[untuned.label == "b", "acc"] = [81.0, 80.0, 82.5, 83.5, 82.0]
    table = versus(tuned, untuned, "acc").set_index("label")
    p = {}
    for label in ("a", "b"):
        x = tuned[tuned.label == label]["acc"].to_numpy()
        y = untuned[untuned.label == label]["acc"].to_numpy()
        res = stats.ttest_ind(x, y, equal_var=False)
        assert table.loc[label, "test"] == "Welch t"
        assert table.loc[label, "diff"] == pytest.approx(x.mean() - y.mean(), rel=1e-12)
        assert table.loc[label, "p"] == pytest.approx(res.pvalue, rel=1e-12)
        p[label] = res.pvalue
    low, high = sorted(p.values())
    holm = {k: (2 * low if v == low else max(2 * low, high)) for k, v in p.items()}
    for label in ("a", "b"):
        assert table.loc[label, "p_holm"] == pytest.approx(min(holm[label], 1.0), rel=1e-12)
    assert table.loc["a", "significant"] and not table.loc["b", "significant"]
