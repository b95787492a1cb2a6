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
from functools import cache
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from statsmodels.stats.multitest import multipletests

from oscbench import figures as plots
from oscbench import report
from oscbench.compose import compose
from oscbench.registry import ConfigError
from oscbench.runs import OPTIONAL
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
    "acc_exported": ("test accuracy of the exported integer model in onnxruntime", "%"),
    "osc_share": ("oscillating weights at the end of training", "% of weights"),
    "stuck_share": ("weights that never left their level in the last epoch", "% of weights"),
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
    if name == "acc_exported":
        return record.get("export", {}).get("acc")
    if name in ("osc_share", "stuck_share"):
        return None if final.get(name) is None else 100 * final[name]
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
    """One side of a claim: `method bits metric`, e.g. `lsq w3a3 acc`, and where the runs
    of that method and bit-width differ in more than the seed, the settings that pick one
    cell: `lsq_qema w2a2 acc [quantizer.decay=0.864]`, `lsq w3a3 acc [recipe=nagel2022]`
    (`recipe` is the recipe's name; without it, the common recipe's runs)."""

    method: str
    bits: str
    metric: str
    where: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Side:
        head, _, rest = text.partition("[")
        parts = head.split()
        where = [w.strip() for w in rest.removesuffix("]").split(",")] if rest else []
        form = "write `method bits metric [key=value, ...]` (lsq w3a3 acc)"
        if len(parts) != 3 or (rest and not rest.rstrip().endswith("]")):
            raise ConfigError(f"a claim's side {text!r}: {form}")
        if not all(len(w.split("=")) == 2 and all(w.split("=")) for w in where):
            raise ConfigError(f"a claim's side {text!r}: {form}")
        if parts[2] not in METRICS and re.sub(r"\d+", "N", parts[2]) not in METRICS:
            raise ConfigError(f"a claim's side {text!r}: the metric is one of {', '.join(METRICS)}")
        return cls(*parts, tuple(tuple(w.split("=")) for w in where))

    @property
    def cell(self) -> str:
        """The cell it reads, as the tables name it."""
        where = ", ".join(f"{k}={v}" for k, v in self.where)
        return f"{self.method} {self.bits.upper()}" + (f" [{where}]" if where else "")


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
        a, b = self.a.cell, self.b.cell
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


@dataclass(frozen=True)
class Cell:
    """Completed runs that differ in nothing but the seed (sorted by it), and what they share:
    their configuration less the seed (`oscbench.report`'s settings)."""

    settings: dict
    runs: list[dict]

    def matches(self, key: str, value: str) -> bool:
        if key == "recipe":
            return self.settings.get(report.RECIPE, "common") == value
        if key not in self.settings and key.split(".")[0] in OPTIONAL:  # off: left out
            return OmegaConf.select(_defaults(), key) == yaml.safe_load(value)
        return key in self.settings and self.settings[key] == yaml.safe_load(value)


@cache
def _defaults() -> DictConfig:
    return compose([])


def cells(records: list[dict], status: str = "completed") -> dict[tuple[str, str], list[Cell]]:
    """The runs of this `status` by (method label, bits label), in cells of one
    configuration."""
    df = report.runs_frame(records)
    out: dict[tuple[str, str], list[Cell]] = {}
    for (method, bits), g in df[df["status"] == status].groupby(["method", "bits_label"]):
        out[(method, bits)] = [
            Cell(h["settings"].iloc[0], [records[i] for i in h.sort_values("seed")["record"]])
            for _, h in g.groupby("group")
        ]
    return out


def _differing(group: list[Cell]) -> list[str]:
    """The settings in which the cells of a group differ."""
    keys = set().union(*(c.settings for c in group))
    return sorted(k for k in keys if len({str(c.settings.get(k)) for c in group}) > 1)


def pick(side: Side, by_cell: dict) -> list[dict] | None:
    """The runs of the cell a side reads (None: there are none). Where its settings leave
    several cells, it is refused: a claim never averages runs of different configurations."""
    where = dict(side.where)
    where.setdefault("recipe", "common")
    found = [
        c
        for c in by_cell.get((side.method, side.bits), [])
        if all(c.matches(k, v) for k, v in where.items())
    ]
    if len(found) > 1:
        differ = _differing(found)
        raise ConfigError(
            f"the runs of {side.method} {side.bits} differ in more than the seed "
            f"({', '.join(differ)}): name one cell in the claim's side, "
            f"`{side.method} {side.bits} {side.metric} [{differ[0]}=...]`"
        )
    return found[0].runs if found else None


def regime(runs: list[dict]) -> str:
    """What the runs of a cell trained: optimizer steps, the learning rate of the last step,
    and the recipe (from their records; the first run's, which its seeds share)."""
    last, config = runs[0]["history"][-1], runs[0]["config"]
    lr = last.get("lr_last")
    start = " from FP" if config.get("init_from") else ""
    rate = "" if lr is None else f", last lr {lr:.2g}"
    return f"{last['step']:,} steps{start}{rate}, {config['recipe']['name']}"


def _values(runs: list[dict], name: str) -> pd.Series:
    values = {r["config"]["seed"]: metric(r, name) for r in runs}
    return pd.Series({k: v for k, v in values.items() if v is not None}, dtype=float)


def _from_fp(runs: list[dict]) -> bool:
    return all(r["config"].get("init_from") == "fp" or report._method(r) == "fp" for r in runs)


def _lacking(side: Side, failed: dict) -> str:
    """Why a side has no completed runs: none ran, or every one failed (and how)."""
    runs = pick(side, failed)
    if not runs:
        return f"no runs of {side.cell}"
    return f"every run of {side.cell} failed ({len(runs)}; {report.error_line(runs[0]) or '?'})"


def test_claim(claim: Claim, by_cell: dict, failed: dict | None = None) -> dict:
    """The claim's difference a - b: means, the 95 % interval, the one-sided p-value of the
    claimed direction, and which test gave them; where a side has no completed run, why
    (`failed`: the failed runs' cells)."""
    row = {
        "paper": claim.paper,
        "claim": claim.claim,
        "setting": claim.setting,
        "expect": claim.expect,
        "margin": claim.margin,
    }
    ra, rb = pick(claim.a, by_cell), pick(claim.b, by_cell)
    missing = [s for s, r in ((claim.a, ra), (claim.b, rb)) if r is None]
    if missing:
        return row | {"n": 0, "test": "; ".join(_lacking(s, failed or {}) for s in missing)}
    ga, gb = regime(ra), regime(rb)
    row["regime"] = ga if ga == gb else f"a: {ga}; b: {gb}"
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
        elif r["expect"] == "higher":
            table.loc[i, "why"] = f"not significant after Holm; the interval reaches {bound:+g}"
        elif r["ci_low"] < bound:
            table.loc[i, "why"] = f"the interval reaches below {bound:+g}"
        else:
            table.loc[i, "why"] = f"the interval lies above {bound:+g}, not significant after Holm"
    return table


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
    fp = _values(fp_cells[0].runs, "acc") if len(fp_cells) == 1 else pd.Series(dtype=float)
    subset = {k: v for k, v in by_cell.items() if k[0] in ("fp", "lsq")}
    for name, runs in sorted(labelled(subset), key=lambda nr: not nr[0].startswith("fp")):
        acc = _values(runs, "acc")
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
        differ = _differing(group)
        if report.RECIPE in differ:
            differ = [report.RECIPE]
        full = [[(k.rsplit(".", 1)[-1], c.settings.get(k)) for k in differ] for c in group]
        for c, variant in zip(group, plots.without_unset(full), strict=True):
            text = ", ".join(f"{k}={v}" for k, v in variant)
            out.append((f"{method}\n{bits}" + (f"\n{text}" if text else ""), c.runs))
    return out


def bn_figure(by_cell: dict, out: Path) -> Path:
    """Test accuracy before and after BN re-estimation, per QAT cell (mean ± std)."""
    named = [(n, r) for n, r in labelled(by_cell) if "\nfp32" not in n]
    named = [(n, r) for n, r in named if not _values(r, "acc_before_bn").empty]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(named)), 3.6), layout="constrained")
    xs = np.arange(len(named))
    for shift, name, label in ((-0.2, "acc_before_bn", "before"), (0.2, "acc", "after")):
        vals = [_values(runs, name) for _, runs in named]
        ax.bar(
            xs + shift,
            [v.mean() for v in vals],
            0.4,
            yerr=[v.std() for v in vals],
            label=f"{label} BN re-estimation",
            capsize=2,
        )
    ax.set_xticks(xs, [n for n, _ in named], fontsize=7, rotation=90)
    low = min(_values(r, "acc_before_bn").min() for _, r in named) if named else 0
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    return plots.save(fig, out / "bn_reestimation.png")


def write(study: dict, records: list[dict], out: Path) -> pd.DataFrame:
    """The verdict table (claims.md, claims.csv), the benchmark table and the BN figure in
    `out`, beside oscbench.report's tables and figures of the same runs."""
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
    study = OmegaConf.to_container(OmegaConf.load(path))
    sweep_dir = Path(args.sweep_dir)
    failed = [] if args.table_only else run_sweeps(study, sweep_dir, args.overrides)
    why = f"{len(failed)} sweep(s) had failed runs (their records in {sweep_dir} say why): "
    if failed and args.runs_only:
        parser.exit(1, f"oscbench.claims: {why}{'; '.join(failed)}\n")
    if args.runs_only:
        return
    out = Path(args.out) if args.out else path.parent
    try:
        table = write(study, report.load_records(sweep_dir), out)
    except ConfigError as e:
        parser.exit(2, f"oscbench.claims: {e}\n")
    print((out / "claims.md").read_text())
    print(f"oscbench.claims: {len(table)} claims; wrote {out}", file=sys.stderr)
    if failed:
        parser.exit(1, f"oscbench.claims: {why}{'; '.join(failed)}\n")


if __name__ == "__main__":
    main()
