"""A paper's claim, tested on runs: its two sides, the runs of each, and its verdict.

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
cell; otherwise Welch's test. A claim with a side of no completed run has no verdict of
these: **runs failed** where that side's runs ran and every one failed (how the first
failed beside it), **not run** where it has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from statsmodels.stats.multitest import multipletests

from oscbench.analysis import frame
from oscbench.analysis.stats import t_test
from oscbench.launch.compose import compose
from oscbench.records.runs import OPTIONAL
from oscbench.registry import ConfigError

ALPHA = 0.05
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
NOT_RUN = "not run"  # a claim whose cells the runs lack
FAILED = "runs failed"  # a claim with a cell whose every run failed
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
        return frame.accuracy(record["config"], final)
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


FIELDS = ("paper", "claim", "a", "b", "expect", "margin")  # what a claim of a study file names


def parse_claims(entries: list[dict]) -> list[Claim]:
    """The study's claims; an entry with `over: [2, 3]` stands for one claim per value,
    `{b}` in its text replaced by it."""
    claims = []
    for entry in entries:
        missing = [k for k in FIELDS if not isinstance(entry, dict) or k not in entry]
        if missing:
            names = ", ".join(FIELDS)
            raise ConfigError(f"a claim without {', '.join(missing)}: each names {names}")
        if isinstance(entry["margin"], bool) or not isinstance(entry["margin"], int | float):
            raise ConfigError(f"claim {entry['claim']!r}: margin is a number, in the metric's unit")
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
    their configuration less the seed (`oscbench.analysis.report`'s settings)."""

    settings: dict
    runs: list[dict]

    def matches(self, key: str, value: str) -> bool:
        if key == "recipe":
            return self.settings.get(frame.RECIPE, "common") == value
        if key not in self.settings and key.split(".")[0] in OPTIONAL:  # off: left out
            return OmegaConf.select(_defaults(), key) == yaml.safe_load(value)
        return key in self.settings and self.settings[key] == yaml.safe_load(value)


@cache
def _defaults() -> DictConfig:
    return compose([])


def cells(records: list[dict], status: str = "completed") -> dict[tuple[str, str], list[Cell]]:
    """The runs of this `status` by (method label, bits label), in cells of one
    configuration."""
    df = frame.runs_frame(records)
    out: dict[tuple[str, str], list[Cell]] = {}
    for (method, bits), g in df[df["status"] == status].groupby(["method", "bits_label"]):
        out[(method, bits)] = [
            Cell(h["settings"].iloc[0], [records[i] for i in h.sort_values("seed")["record"]])
            for _, h in g.groupby("group")
        ]
    return out


def differing(group: list[Cell]) -> list[str]:
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
        differ = differing(found)
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


def metric_values(runs: list[dict], name: str) -> pd.Series:
    values = {r["config"]["seed"]: metric(r, name) for r in runs}
    return pd.Series({k: v for k, v in values.items() if v is not None}, dtype=float)


def _from_fp(runs: list[dict]) -> bool:
    return all(r["config"].get("init_from") == "fp" or frame.method_of(r) == "fp" for r in runs)


def _lacking(side: Side, runs: list[dict] | None) -> str:
    """Why a side has no completed runs: none ran, or every one (`runs`) failed, and how."""
    if not runs:
        return f"no runs of {side.cell}"
    return f"every run of {side.cell} failed ({len(runs)}; {frame.error_line(runs[0]) or '?'})"


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
        crashed = [pick(s, failed or {}) for s in missing]
        why = "; ".join(_lacking(s, r) for s, r in zip(missing, crashed, strict=True))
        return row | {"n": 0, "failed": any(crashed), "test": why}
    ga, gb = regime(ra), regime(rb)
    row["regime"] = ga if ga == gb else f"a: {ga}; b: {gb}"
    x, y = metric_values(ra, claim.a.metric), metric_values(rb, claim.b.metric)
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
    nowhere = pd.Series(False, index=table.index)
    failed = table["failed"].eq(True) if "failed" in table else nowhere
    table["verdict"] = np.select([table["n"] > 0, failed], ["inconclusive", FAILED], NOT_RUN)
    table["why"] = ""
    tested = table["p"].notna() if "p" in table else nowhere
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
