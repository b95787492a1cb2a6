"""Records -> the runs frame (a row per run) -> the summary (a row per cell: mean, spread
and count over the seeds).

A cell averages runs that differ only in their seed: runs are grouped by their whole
results-relevant configuration (the fingerprint that identifies a run, less the seed).
Where runs of one method and bit-width differ in anything else (epochs, activation bits, a
policy's option...), those settings become columns beside the method, one row per value.
Accuracy is after BN re-estimation. Runs trained in full precision without policies (`fp`)
do not depend on the bit-width and fill every bit column; runs with `ptq=true` (`ptq`,
`osc_reg`) report the accuracy of their weights rounded to that bit-width.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from oscbench.launch.compose import presets
from oscbench.launch.naming import result_key
from oscbench.quant.base import deployability
from oscbench.records.console import warn
from oscbench.records.runs import bits_free, fingerprint, run_key, scan_records

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


def method_of(record: dict) -> str:
    """The label of what ran (records before labels existed: the preset's name)."""
    return record.get("method") or record["config"]["method"]["name"]


def accuracy(config: dict, final: dict, split: str = "") -> float | None:
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
                "method": method_of(r),
                "bits": c["bits"],
                "bits_label": r.get("bits", f"w{c['bits']}a{c['act_bits']}"),
                "seed": c["seed"],
                "bits_free": bits_free(c),
                "status": r.get("status"),
                "acc": accuracy(c, f),
                "acc_before_bn": f.get("acc"),
                "acc_exported": r.get("export", {}).get("acc"),
                "deployable": deployability(c),
                "val_acc": accuracy(c, f, "val_"),
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


def expand_bits_free(df: pd.DataFrame) -> pd.DataFrame:
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
    exp = expand_bits_free(df)
    exp = exp.assign(recipe=[s.get(RECIPE, "common") for s in exp["settings"]])
    by_recipe = any(g["recipe"].nunique() > 1 for _, g in exp.groupby(["method", "bits"]))
    varying: set[str] = set()
    for _, g in exp.groupby(["method", "recipe", "bits"] if by_recipe else ["method", "bits"]):
        keys = set().union(*g["settings"])
        for k in keys:
            if len({json.dumps(s.get(k, "-"), default=str) for s in g["settings"]}) > 1:
                varying.add(k)
    return [RECIPE] * by_recipe + sorted(varying - {"bits", RECIPE})


def with_setting_columns(df: pd.DataFrame, varying: list[str]) -> pd.DataFrame:
    """A column per varying setting: "-" where a run lacks it, "null" where it is None (as
    YAML writes it: pandas would drop a None key from every grouping, and the row with it)."""
    df = df.copy()
    for k in varying:
        df[k] = ["null" if s.get(k, "-") is None else s.get(k, "-") for s in df["settings"]]
    return df


def method_order(methods) -> list[str]:  # noqa: ANN001
    """The presets in their declared `order` (conf/method/), then any other label."""
    methods, order = set(methods), [p.name for p in presets()]
    return [m for m in order if m in methods] + sorted(methods - set(order))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of each metric (completed runs), per method, varying
    setting and bit-width, with the number of runs that did not complete. Each cell holds
    runs of one configuration (asserted), differing only in the seed."""
    varying = varying_settings(df)
    keys = ["method", *varying, "bits"]
    exp = with_setting_columns(expand_bits_free(df), varying)
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
    order = {m: i for i, m in enumerate(method_order(exp["method"]))}

    def key(idx: pd.Index) -> pd.Index:
        if idx.name == "method":
            return idx.map(order.get)
        if idx.name == RECIPE:  # the common recipe first, then the papers'
            return idx.map(lambda r: (r != "common", str(r)))
        return idx.map(numbers_first)

    return stats.sort_index(key=key)


def numbers_first(value: object) -> tuple[bool, float, str]:
    """A setting's value as rows are sorted: numbers by size (10, 20, 80, 160), then text."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    return (True, 0.0, str(value)) if math.isnan(number) else (False, number, "")


def cell_text(mean: float, std: float, n: int, scale: float, decimals: int) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean * scale:,.{decimals}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:,.{decimals}f}"
    return text
