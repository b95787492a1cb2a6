"""The claims study: run its sweeps, then give each paper's claim a verdict.

A study file (experiments/claims/study.yaml) lists the sweeps that make the runs, each
`python -m oscbench.run <base> <sweep>` into one sweep directory, and the claims. A claim is
a difference `a - b` between two cells of runs (a method at a bit-width label such as
`w3a3`), or between two metrics of one cell, with the direction its paper states:

- `expect: higher`: a exceeds b. **Reproduced** when the one-sided t-test of `a - b > 0` is
  significant after Holm's correction over every claim of the study; **not reproduced** when
  the 95 % interval of `a - b` lies below `margin` (the data rule out an effect of the size
  that matters) or the difference is significant the other way; else **inconclusive**.
- `expect: not_lower`: a is not worse than b by more than `margin` (a paper's "matches" or
  "without losing accuracy"). Reproduced when the one-sided test of `a - b > -margin` is
  significant after Holm; not reproduced when the interval lies below `-margin`.

Runs pair by seed (scipy's `ttest_rel`) when both cells hold the same seeds and each run
starts from its seed's FP run (`init_from=fp`, or is that run), as do two metrics of one
cell; otherwise Welch's test.

    python -m oscbench.claims experiments/claims/study.yaml [--runs-only | --table-only]
        [--sweep-dir multirun/claims] [--out DIR] [overrides for every run ...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from statsmodels.stats.multitest import multipletests

from oscbench import figures as plots
from oscbench import report
from oscbench.registry import ConfigError
from oscbench.stats import t_test

ALPHA = 0.05
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
NOT_RUN = "not run"  # a claim whose cells the runs lack
DEPTHWISE, POINTWISE = ("conv_dw",), ("conv_pw", "conv_pwl")  # timm's inverted residuals


def _layer_share(record: dict, names: tuple[str, ...]) -> float | None:
    """Share (%) of the weights of the layers named `names` (the last part of the module
    name) that oscillate at the end of training, weighted by each layer's size."""
    layers = record["history"][-1].get("osc", {}).get("layers", {})
    chosen = [v for k, v in layers.items() if k.rsplit(".", 1)[-1] in names]
    if not chosen:
        return None
    return 100 * sum(v["osc_share"] * v["numel"] for v in chosen) / sum(v["numel"] for v in chosen)


def _epoch_osc(record: dict, epoch: int, key: str) -> float | None:
    history = record["history"]
    osc = history[epoch - 1].get("osc") if epoch <= len(history) else None
    if not osc:
        return None
    if key == "crossings":
        return osc["crossings"] / osc["tracked_weights"]
    return 100 * osc["osc_share"]


METRICS = {  # name: (what it is, unit)
    "acc": ("test accuracy after BN re-estimation (PTQ: rounded to its bits)", "%"),
    "acc_before_bn": ("test accuracy before BN re-estimation (PTQ: none)", "%"),
    "acc@Nbit": ("test accuracy with the weights rounded to N bits", "%"),
    "osc_share": ("oscillating weights at the end of training", "% of weights"),
    "osc_share@epochN": ("oscillating weights at the end of epoch N", "% of weights"),
    "osc_share_depthwise": ("oscillating weights of the depthwise layers, at the end", "%"),
    "osc_share_pointwise": ("oscillating weights of the pointwise layers, at the end", "%"),
    "crossings@epochN": ("threshold crossings per tracked weight in epoch N", "per weight"),
}


def metric(record: dict, name: str) -> float | None:
    """The value of one of `METRICS` for a run's record."""
    final = record.get("final", {})
    if name == "acc":
        return report._accuracy(record["config"], final)
    if name == "acc_before_bn":  # a PTQ run's `acc` is its model before rounding
        return None if record["config"].get("ptq") else final.get("acc")
    if name == "osc_share":
        return None if final.get("osc_share") is None else 100 * final["osc_share"]
    if name == "osc_share_depthwise":
        return _layer_share(record, DEPTHWISE)
    if name == "osc_share_pointwise":
        return _layer_share(record, POINTWISE)
    if re.fullmatch(r"acc@\d+bit", name):
        return final.get(name)
    if m := re.fullmatch(r"(osc_share|crossings)@epoch(\d+)", name):
        return _epoch_osc(record, int(m[2]), m[1])
    raise ConfigError(f"unknown metric {name!r}: one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Side:
    """One side of a claim: `method bits metric`, e.g. `lsq w3a3 acc`."""

    method: str
    bits: str
    metric: str

    @classmethod
    def parse(cls, text: str) -> Side:
        parts = text.split()
        if len(parts) != 3:
            raise ConfigError(f"a claim's side {text!r}: write `method bits metric` (lsq w3a3 acc)")
        if parts[2] not in METRICS and re.sub(r"\d+", "N", parts[2]) not in METRICS:
            raise ConfigError(f"a claim's side {text!r}: the metric is one of {', '.join(METRICS)}")
        return cls(*parts)


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    a: Side
    b: Side
    expect: str  # higher | not_lower
    margin: float  # the smallest difference that matters, in the metric's unit

    @property
    def setting(self) -> str:
        a, b = (f"{x.method} {x.bits.upper()}" for x in (self.a, self.b))
        if a == b:
            return f"{a}: {self.a.metric} - {self.b.metric}"
        if self.a.metric == self.b.metric:
            return f"{a} - {b}: {self.a.metric}"
        return f"{a} {self.a.metric} - {b} {self.b.metric}"


def parse_claims(entries: list[dict]) -> list[Claim]:
    """The study's claims; an entry with `over: [2, 3]` stands for one claim per value,
    `{b}` in its text replaced by it."""
    claims = []
    for entry in entries:
        for value in entry.get("over", [None]):

            def fill(text: str, value: object = value) -> str:
                return text if value is None else text.replace("{b}", str(value))

            if entry["expect"] not in ("higher", "not_lower"):
                raise ConfigError(f"claim {entry['claim']!r}: expect is higher or not_lower")
            claims.append(
                Claim(
                    paper=entry["paper"],
                    claim=fill(entry["claim"]),
                    a=Side.parse(fill(entry["a"])),
                    b=Side.parse(fill(entry["b"])),
                    expect=entry["expect"],
                    margin=float(entry["margin"]),
                )
            )
    return claims


def cells(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The completed runs by (method label, bits label). A cell whose runs differ in
    anything but the seed is refused: a claim never averages them."""
    df = report.runs_frame(records)
    out: dict[tuple[str, str], list[dict]] = {}
    for (method, bits), g in df[df["status"] == "completed"].groupby(["method", "bits_label"]):
        if g["group"].nunique() > 1:
            raise ConfigError(
                f"the runs of {method} {bits} differ in more than the seed "
                f"({', '.join(report.varying_settings(g))}): give a sweep directory of one study"
            )
        out[(method, bits)] = [records[i] for i in g.sort_values("seed")["record"]]
    return out


def _values(runs: list[dict], name: str) -> pd.Series:
    values = {r["config"]["seed"]: metric(r, name) for r in runs}
    return pd.Series({k: v for k, v in values.items() if v is not None}, dtype=float)


def _from_fp(runs: list[dict]) -> bool:
    return all(r["config"].get("init_from") == "fp" or report._method(r) == "fp" for r in runs)


def test_claim(claim: Claim, by_cell: dict) -> dict:
    """The claim's difference a - b: means, the 95 % interval, the one-sided p-value of the
    claimed direction, and which test gave them."""
    row = {
        "paper": claim.paper,
        "claim": claim.claim,
        "setting": claim.setting,
        "expect": claim.expect,
        "margin": claim.margin,
    }
    missing = [
        f"{s.method} {s.bits}" for s in (claim.a, claim.b) if (s.method, s.bits) not in by_cell
    ]
    if missing:
        return row | {"n": 0, "test": f"no runs of {', '.join(missing)}"}
    ra, rb = by_cell[(claim.a.method, claim.a.bits)], by_cell[(claim.b.method, claim.b.bits)]
    x, y = _values(ra, claim.a.metric), _values(rb, claim.b.metric)
    same_cell = ra is rb
    paired = same_cell or (sorted(x.index) == sorted(y.index) and _from_fp(ra) and _from_fp(rb))
    row |= {"a_mean": x.mean(), "a_std": x.std(), "b_mean": y.mean(), "b_std": y.std()}
    row |= {"n": len(x), "n_b": len(y), "diff": x.mean() - y.mean()}
    if min(len(x), len(y)) < 2:
        return row | {"test": "too few runs"}
    x, y = x.sort_index().to_numpy(), y.sort_index().to_numpy()
    ci = t_test(x, y, paired).confidence_interval(1 - ALPHA)
    shift = claim.margin if claim.expect == "not_lower" else 0.0
    p = t_test(x + shift, y, paired, alternative="greater").pvalue
    p_other = t_test(x, y, paired, alternative="less").pvalue
    return row | {
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "p": float(p),
        "p_opposite": float(p_other),
        "test": "paired t" if paired else "Welch t",
    }


def verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Holm's correction over the claims' one-sided p-values (and, separately, over the
    p-values of the opposite direction), then each claim's verdict (see the module's doc)."""
    table = table.copy()
    table["p_holm"] = np.nan
    table["verdict"] = np.where(table["n"] > 0, "inconclusive", NOT_RUN)
    table["why"] = ""
    tested = table["p"].notna() if "p" in table else pd.Series(False, index=table.index)
    if not tested.any():
        return table
    table.loc[tested, "p_holm"] = multipletests(table.loc[tested, "p"], ALPHA, "holm")[1]
    opposite = multipletests(table.loc[tested, "p_opposite"], ALPHA, "holm")[0]
    table.loc[tested, "opposite"] = opposite
    for i, r in table[tested].iterrows():
        bound = r["margin"] if r["expect"] == "higher" else -r["margin"]
        if r["p_holm"] < ALPHA:
            table.loc[i, "verdict"] = "reproduced"
        elif r["expect"] == "higher" and r["opposite"]:
            table.loc[i, "verdict"] = "not reproduced"
            table.loc[i, "why"] = "significant the other way"
        elif r["ci_high"] < bound:
            table.loc[i, "verdict"] = "not reproduced"
            table.loc[i, "why"] = (
                f"an effect of +{r['margin']:g} or more is ruled out"
                if r["expect"] == "higher"
                else f"loses more than {r['margin']:g}"
            )
        else:
            table.loc[i, "why"] = (
                f"not significant after Holm; the interval reaches {bound:+g}"
                if r["expect"] == "higher"
                else f"the interval reaches below {bound:+g}"
            )
    return table


def _num(v: float, digits: int = 2) -> str:
    return "-" if pd.isna(v) else f"{v:.{digits}f}"


def markdown(table: pd.DataFrame) -> str:
    out = [
        "| paper | claim | setting (a - b) | a | b | a - b [95 % CI] | margin | p (Holm) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
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
        out.append(
            f"| {r['paper']} | {r['claim']} | {r['setting']} | {' | '.join(cells_)} | {verdict} |"
        )
    return "\n".join(out) + "\n"


def benchmark_markdown(by_cell: dict) -> str:
    """The benchmark's targets: FP and LSQ test accuracy per bit-width over seeds, the loss
    against FP, and the time per run."""
    out = [
        "| run | seeds | test accuracy (%) | std | min - max | loss vs FP "
        "| time per run (s, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    fp = _values(by_cell.get(("fp", "fp32"), []), "acc")
    rows = [("fp", "fp32")] + sorted(k for k in by_cell if k[0] == "lsq")
    for key in rows:
        if key not in by_cell:
            continue
        runs = by_cell[key]
        acc = _values(runs, "acc")
        wall = np.median([r.get("wall_time_s", np.nan) for r in runs])
        loss = "-" if key[0] == "fp" or fp.empty else f"{fp.mean() - acc.mean():.2f}"
        out.append(
            f"| {key[0]} {key[1].upper()} | {len(acc)} | {acc.mean():.2f} | {acc.std():.2f} | "
            f"{acc.min():.2f} - {acc.max():.2f} | {loss} | {wall:.0f} |"
        )
    return "\n".join(out) + "\n"


def bn_figure(by_cell: dict, out: Path) -> Path:
    """Test accuracy before and after BN re-estimation, per QAT cell (mean ± std)."""
    keys = [k for k in sorted(by_cell, key=lambda k: (k[1], k[0])) if k[1] != "fp32"]
    keys = [k for k in keys if not _values(by_cell[k], "acc_before_bn").empty]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(keys)), 3.6), layout="constrained")
    xs = np.arange(len(keys))
    for shift, name, label in ((-0.2, "acc_before_bn", "before"), (0.2, "acc", "after")):
        vals = [_values(by_cell[k], name) for k in keys]
        ax.bar(
            xs + shift,
            [v.mean() for v in vals],
            0.4,
            yerr=[v.std() for v in vals],
            label=f"{label} BN re-estimation",
            capsize=2,
        )
    ax.set_xticks(xs, [f"{m}\n{b}" for m, b in keys], fontsize=7, rotation=90)
    low = min(_values(by_cell[k], "acc_before_bn").min() for k in keys) if keys else 0
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    return plots.save(fig, out / "bn_reestimation.png")


def write(study: dict, records: list[dict], out: Path) -> pd.DataFrame:
    """The verdict table (claims.md, claims.csv), the benchmark table and the BN figure in
    `out`, beside oscbench.report's tables and figures of the same runs."""
    out.mkdir(parents=True, exist_ok=True)
    by_cell = cells(records)
    table = verdicts(pd.DataFrame([test_claim(c, by_cell) for c in parse_claims(study["claims"])]))
    table.to_csv(out / "claims.csv", index=False)
    counts = table["verdict"].value_counts()
    text = [
        "# Claims: verdicts\n",
        "a - b: the difference of the means over seeds with its 95 % interval; p: one-sided, "
        "in the claimed direction, Holm-adjusted over the table. Reproduced: p < 0.05. "
        "Not reproduced: the interval lies below the margin (`+m`: an effect of m or more is "
        "ruled out; `≥ -m`: a loss beyond m) or the difference is significant the other way. "
        "Mean ± std over seeds.\n",
        ", ".join(f"{counts.get(v, 0)} {v}" for v in (*VERDICTS, NOT_RUN)) + ".\n",
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


def run_sweeps(study: dict, sweep_dir: Path, extra: list[str]) -> None:
    """Each sweep of the study, one after another, into `sweep_dir`; completed runs are
    skipped and interrupted ones resumed (trainer.resume=auto), so the same command again
    continues a killed study."""
    for sweep in study["sweeps"]:
        cmd = [sys.executable, "-m", "oscbench.run", "-m", *study["base"], *sweep]
        cmd += [f"hydra.sweep.dir={sweep_dir}", *extra]
        print("oscbench.claims: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"oscbench.claims: the sweep {' '.join(sweep)} failed")


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
    study = OmegaConf.to_container(OmegaConf.load(path))
    sweep_dir = Path(args.sweep_dir)
    if not args.table_only:
        run_sweeps(study, sweep_dir, args.overrides)
    if args.runs_only:
        return
    out = Path(args.out) if args.out else path.parent
    try:
        table = write(study, report.load_records(sweep_dir), out)
    except ConfigError as e:
        parser.exit(2, f"oscbench.claims: {e}\n")
    print((out / "claims.md").read_text())
    print(f"oscbench.claims: {len(table)} claims; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
