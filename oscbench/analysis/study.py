"""A claims study (`python -m oscbench.claims STUDY.yaml`): run its sweeps, test each claim
on their runs (`oscbench.analysis.claims`), and write the verdicts, the benchmark's table
and the figures.

    python -m oscbench.claims experiments/claims/study.yaml [--runs-only | --table-only]
        [--sweep-dir multirun/claims] [--out DIR] [overrides for every run ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from oscbench.analysis import figures as plots
from oscbench.analysis import frame, report
from oscbench.analysis.claims import (
    FAILED,
    METRICS,
    NOT_RUN,
    VERDICTS,
    cells,
    differing,
    metric_values,
    parse_claims,
    test_claim,
    verdicts,
)
from oscbench.registry import ConfigError


def _num(v: float, digits: int = 2) -> str:
    return "-" if pd.isna(v) else f"{v:.{digits}f}"


def markdown(table: pd.DataFrame) -> str:
    out = [
        "| paper | claim | setting (a - b) | regime | a | b | a - b [95 % CI] | margin "
        "| p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        if pd.isna(r.get("ci_low")):
            cells_ = ["-", "-", "-", "-", "-"]
            reason = r["test"]
        else:
            cells_ = [
                f"{_num(r['a_mean'])} ± {_num(r['a_std'])}",
                f"{_num(r['b_mean'])} ± {_num(r['b_std'])}",
                f"{r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
                f"{'+' if r['expect'] == 'higher' else '≥ -'}{r['margin']:g}",
                f"{r['p_holm']:.3g}",
            ]
            reason = r["why"]
        verdict = f"**{r['verdict']}**" + (f" ({reason})" if reason else "")
        regime_ = r.get("regime")
        regime_ = "-" if pd.isna(regime_) else regime_
        out.append(
            f"| {r['paper']} | {r['claim']} | {r['setting']} | {regime_} | {' | '.join(cells_)} "
            f"| {verdict} |"
        )
    return "\n".join(out) + "\n"


def benchmark_markdown(by_cell: dict) -> str:
    """The benchmark's targets: FP and LSQ test accuracy per bit-width over seeds (every cell
    of theirs, named as `labelled` names them), the loss against FP (where there is one FP
    cell), and the time per run."""
    out = [
        "| run | seeds | test accuracy (%) | std | min - max | loss vs FP "
        "| time per run (s, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    fp_cells = by_cell.get(("fp", "fp32"), [])
    fp = metric_values(fp_cells[0].runs, "acc") if len(fp_cells) == 1 else pd.Series(dtype=float)
    subset = {k: v for k, v in by_cell.items() if k[0] in ("fp", "lsq")}
    for name, runs in sorted(labelled(subset), key=lambda nr: not nr[0].startswith("fp")):
        acc = metric_values(runs, "acc")
        wall = np.median([r.get("wall_time_s", np.nan) for r in runs])
        loss = "-" if name.startswith("fp") or fp.empty else f"{fp.mean() - acc.mean():.2f}"
        method, bits, *variant = name.split("\n")
        label = f"{method} {bits.upper()}" + (f" ({variant[0]})" if variant else "")
        out.append(
            f"| {label} | {len(acc)} | {acc.mean():.2f} | {acc.std():.2f} | "
            f"{acc.min():.2f} - {acc.max():.2f} | {loss} | {wall:.0f} |"
        )
    return "\n".join(out) + "\n"


def labelled(by_cell: dict) -> list[tuple[str, list[dict]]]:
    """Every cell's runs and its name: method and bits, and where that method and bit-width
    has several cells, what tells them apart (the recipe, or the settings that differ)."""
    out = []
    for (method, bits), group in sorted(by_cell.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        differ = differing(group)
        if frame.RECIPE in differ:
            differ = [frame.RECIPE]
        full = [[(k.rsplit(".", 1)[-1], c.settings.get(k)) for k in differ] for c in group]
        for c, variant in zip(group, plots.without_unset(full), strict=True):
            text = ", ".join(f"{k}={v}" for k, v in variant)
            out.append((f"{method}\n{bits}" + (f"\n{text}" if text else ""), c.runs))
    return out


def bn_figure(by_cell: dict, out: Path) -> Path:
    """Test accuracy before and after BN re-estimation, per QAT cell (mean ± std)."""
    named = [(n, r) for n, r in labelled(by_cell) if "\nfp32" not in n]
    named = [(n, r) for n, r in named if not metric_values(r, "acc_before_bn").empty]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(named)), 3.6), layout="constrained")
    xs = np.arange(len(named))
    for shift, name, label in ((-0.2, "acc_before_bn", "before"), (0.2, "acc", "after")):
        vals = [metric_values(runs, name) for _, runs in named]
        ax.bar(
            xs + shift,
            [v.mean() for v in vals],
            0.4,
            yerr=[v.std() for v in vals],
            label=f"{label} BN re-estimation",
            capsize=2,
        )
    ax.set_xticks(xs, [n for n, _ in named], fontsize=7, rotation=90)
    low = min(metric_values(r, "acc_before_bn").min() for _, r in named) if named else 0
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    return plots.save(fig, out / "bn_reestimation.png")


def write(study: dict, records: list[dict], out: Path) -> pd.DataFrame:
    """The verdict table (claims.md, claims.csv), the benchmark table and the BN figure in
    `out`, beside oscbench.analysis.report's tables and figures of the same runs."""
    out.mkdir(parents=True, exist_ok=True)
    by_cell, failed = cells(records), cells(records, "failed")
    claims = parse_claims(study["claims"])
    table = verdicts(pd.DataFrame([test_claim(c, by_cell, failed) for c in claims]))
    table.to_csv(out / "claims.csv", index=False)
    counts = table["verdict"].value_counts()
    text = [
        "# Claims: verdicts\n",
        "a - b: the difference of the means over seeds with its 95 % interval; p: one-sided, "
        "in the claimed direction, Holm-adjusted over the table. Reproduced: p < 0.05. "
        "Not reproduced: the interval lies below the margin (`+m`: an effect of m or more is "
        "ruled out; `≥ -m`: a loss beyond m) or the difference is significant the other way. "
        "Mean ± std over seeds.\n",
        ", ".join(f"{counts.get(v, 0)} {v}" for v in (*VERDICTS, FAILED, NOT_RUN)) + ".\n",
        markdown(table),
        "\n## The benchmark (FP and LSQ)\n",
        benchmark_markdown(by_cell),
        "\n## Metrics\n",
        *[f"- `{k}`: {what} ({unit})" for k, (what, unit) in METRICS.items()],
        "",
    ]
    (out / "claims.md").write_text("\n".join(text))
    bn_figure(by_cell, out)
    report.write_report(records, out)
    return table


def load_study(path: Path) -> dict:
    """The study file, checked before any run: YAML with `base` (a list of overrides),
    `sweeps` (lists of overrides) and `claims` that parse (`parse_claims`)."""
    fix = f"fix {path} (experiments/claims/study.yaml shows the form)"
    try:
        study = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path} is damaged (not YAML: {first}); {fix}") from None
    if not isinstance(study, dict):
        raise ConfigError(f"{path} holds a {type(study).__name__}, not a study; {fix}")

    def overrides(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(o, str) for o in v)

    if not overrides(study.get("base", [])):
        raise ConfigError(f"{path}: base is a list of overrides; {fix}")
    if not isinstance(study.get("sweeps"), list) or not all(map(overrides, study["sweeps"])):
        raise ConfigError(f"{path}: sweeps is a list of lists of overrides; {fix}")
    if not isinstance(study.get("claims"), list):
        raise ConfigError(f"{path}: claims is a list of claims; {fix}")
    try:
        parse_claims(study["claims"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {"base": [], **study}


def run_sweeps(study: dict, sweep_dir: Path, extra: list[str]) -> list[str]:
    """Each sweep of the study, one after another, into `sweep_dir`; completed runs are
    skipped and interrupted ones resumed (trainer.resume=auto), so the same command again
    continues a killed study. A sweep with failed runs (a configuration that diverges, say:
    its records say why, and the tables count them) does not stop the others; returns
    those sweeps."""
    failed = []
    for sweep in study["sweeps"]:
        cmd = [sys.executable, "-m", "oscbench.run", "-m", *study["base"], *sweep]
        cmd += [f"hydra.sweep.dir={sweep_dir}", *extra]
        print("oscbench.claims: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(" ".join(sweep))
            print(f"oscbench.claims: the sweep {failed[-1]} failed; going on", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oscbench.claims", description=__doc__.split("\n")[0]
    )
    parser.add_argument("study", help="the study file (experiments/claims/study.yaml)")
    parser.add_argument("--sweep-dir", default="multirun/claims", help="where the runs go")
    parser.add_argument("--out", help="the table and figures (default: the study file's folder)")
    parser.add_argument("--runs-only", action="store_true", help="run the sweeps, no table")
    parser.add_argument("--table-only", action="store_true", help="the table of the runs there")
    parser.add_argument("overrides", nargs="*", help="added to every run (a smaller study)")
    args = parser.parse_intermixed_args(argv)
    path = Path(args.study)
    if not path.is_file():
        parser.exit(2, f"oscbench.claims: no study file {path} (experiments/claims/study.yaml)\n")
    try:
        study = load_study(path)
    except ConfigError as e:
        parser.exit(2, f"oscbench.claims: {e}\n")
    sweep_dir = Path(args.sweep_dir)
    failed = [] if args.table_only else run_sweeps(study, sweep_dir, args.overrides)
    why = f"{len(failed)} sweep(s) had failed runs (their records in {sweep_dir} say why): "
    if failed and args.runs_only:
        parser.exit(1, f"oscbench.claims: {why}{'; '.join(failed)}\n")
    if args.runs_only:
        return
    out = Path(args.out) if args.out else path.parent
    try:
        table = write(study, frame.load_records(sweep_dir), out)
    except ConfigError as e:
        parser.exit(2, f"oscbench.claims: {e}\n")
    print((out / "claims.md").read_text())
    print(f"oscbench.claims: {len(table)} claims; wrote {out}", file=sys.stderr)
    if failed:
        parser.exit(1, f"oscbench.claims: {why}{'; '.join(failed)}\n")
