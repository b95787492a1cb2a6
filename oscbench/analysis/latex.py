"""The comparison as a LaTeX table for a paper (booktabs rules), written by pandas' Styler:
a row per method (and varying setting), test accuracy and the oscillating share per
bit-width, mean $\\pm$ std over seeds, bold where the difference from the baseline is
significant after Holm's correction (the report's significance table)."""

from __future__ import annotations

import math

import pandas as pd

COLUMNS = {  # metric -> (header, scale, decimals)
    "acc": ("Test accuracy (%)", 1.0, 2),  # headers are escaped for LaTeX by the Styler
    "osc_share": ("Oscillating weights (%)", 100.0, 2),
}


def _cell(row: pd.Series, metric: str, scale: float, decimals: int) -> str:
    mean, std = row.get(f"{metric}_mean", math.nan), row.get(f"{metric}_std", math.nan)
    if mean is None or pd.isna(mean):
        return "--"
    text = f"{mean * scale:.{decimals}f}"
    return text if pd.isna(std) else f"{text} $\\pm$ {std * scale:.{decimals}f}"


def latex_table(stats: pd.DataFrame, tested: pd.DataFrame, baseline: str) -> str:
    """`stats`: the report's summary (index: method, varying settings, bits); `tested`: its
    significance table against `baseline`."""
    keys = list(stats.index.names[:-1])
    bits = sorted(stats.index.get_level_values("bits").unique())
    rows = list(dict.fromkeys(idx[:-1] for idx in stats.index))
    significant = set()
    if not tested.empty:
        for _, r in tested[tested["significant"].astype(bool)].iterrows():
            settings = tuple(r[k] for k in keys[1:])
            significant.add((r["metric"], r["label"], *settings, r["bits"]))
    cells, bold = {}, {}
    for metric, (header, scale, decimals) in COLUMNS.items():
        for b in bits:
            column = (header, f"{b}-bit")
            cells[column] = [
                _cell(stats.loc[(*row, b)], metric, scale, decimals)
                if (*row, b) in stats.index
                else ""
                for row in rows
            ]
            bold[column] = [(metric, *row, b) in significant for row in rows]
    if len(keys) > 1:
        index = pd.MultiIndex.from_tuples(rows, names=keys)
    else:
        index = pd.Index([r[0] for r in rows], name=keys[0])
    frame = pd.DataFrame(cells, index=index)
    css = pd.DataFrame(bold, index=index).map(lambda b: "font-weight: bold;" if b else "")
    styler = (
        frame.style.format_index(escape="latex", axis=0)
        .format_index(escape="latex", axis=1)
        .apply(lambda _: css, axis=None)
    )
    caption = (
        f"Mean $\\pm$ std over seeds. Bold: different from {baseline.replace('_', '-')} "
        "($p < 0.05$ after Holm's correction)."
    )
    return styler.to_latex(
        hrules=True,
        multicol_align="c",
        multirow_align="naive",  # a row label repeated, not \\multirow: booktabs alone
        convert_css=True,
        caption=caption,
        position="t",
        position_float="centering",
    )


def document(table: str) -> str:
    """A standalone document around `table`, to compile it as a check."""
    return (
        "\\documentclass{article}\n\\usepackage{booktabs}\n"
        "\\begin{document}\n" + table + "\\end{document}\n"
    )
