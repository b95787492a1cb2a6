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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from oscbench.compose import presets  # noqa: E402
from oscbench.console import warn  # noqa: E402
from oscbench.latex import latex_table  # noqa: E402
from oscbench.naming import result_key  # noqa: E402
from oscbench.registry import ConfigError  # noqa: E402
from oscbench.runs import bits_free, fingerprint, run_key, scan_records  # noqa: E402
from oscbench.stats import compare, versus  # noqa: E402

RECIPE = "recipe.name"  # the setting that names a run's training recipe (conf/recipe/)
METRICS = {  # column in the runs frame -> (title, scale, decimals)
    "acc": ("Test accuracy (%) after BN re-estimation; ptq: rounded to the column's bits", 1.0, 2),
    "osc_share": ("Oscillating weights (%), last epoch", 100.0, 3),
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
                "val_acc": _accuracy(c, f, "val_"),
                "osc_share": f.get("osc_share"),
                "crossings_total": f.get("crossings_total"),
                "dq_dw": f.get("dq_dw"),
                "frozen_share": frozen,
                "wall_time_s": f.get("wall_time_s", r.get("wall_time_s")),
                **{k: v for k, v in f.items() if k.startswith("acc@")},
                "error": ((r.get("error") or "").strip().splitlines() or [""])[-1],
                "run_dir": r.get("run_dir"),
                "run_key": r.get("key") or run_key(c),
                "group": run_key({"settings": settings}),
                "settings": settings,
                "record": i,
            }
        )
    return _dedupe(pd.DataFrame(rows))


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
    df = df.copy()
    for k in varying:
        df[k] = [s.get(k, "-") for s in df["settings"]]
    return df


def _label(row: pd.Series, varying: list[str]) -> str:
    shown = [f"{k}={row[k]}" for k in varying if row[k] != "-"]
    return row["method"] + (f" [{', '.join(shown)}]" if shown else "")


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
        return idx.map(str)

    return stats.sort_index(key=key)


def recipe_differences(stats: pd.DataFrame) -> str:
    """Each method under its paper's recipe against the common one: the difference of the
    means per bit-width, for accuracy and the oscillating share (empty without recipes)."""
    if RECIPE not in stats.index.names:
        return ""
    bits = sorted(stats.index.get_level_values("bits").unique())
    metrics = ("acc", "osc_share")
    head = [f"Δ{m} {b}-bit" for m in ("acc", "osc") for b in bits]
    out = [
        "\n### Each paper's recipe against the common one\n",
        "Difference of the means (the paper's recipe minus common) for the methods run under "
        "both; the tables above give each with its spread over seeds.\n",
        "| method | recipe | " + " | ".join(head) + " |",
        "|---" * (2 + len(head)) + "|",
    ]
    flat = stats.reset_index()
    for method, g in flat.groupby("method", sort=False):
        common = g[g[RECIPE] == "common"].set_index("bits")
        for recipe, h in g[g[RECIPE] != "common"].groupby(RECIPE):
            h = h.set_index("bits")
            cells = []
            for metric in metrics:
                _, scale, decimals = METRICS[metric]
                for b in bits:
                    col = f"{metric}_mean"
                    d = h[col].get(b, math.nan) - common[col].get(b, math.nan)
                    cells.append("-" if math.isnan(d) else f"{d * scale:+,.{decimals}f}")
            out.append(f"| {method} | {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _cell(mean: float, std: float, n: int, scale: float, decimals: int) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean * scale:,.{decimals}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std * scale:,.{decimals}f}"
    return text


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
        out.append(f"### {title}\n")
        out.append(
            "| " + " | ".join(row_keys) + " | " + " | ".join(f"{b}-bit" for b in bits) + " |"
        )
        out.append("|---" * (len(row_keys) + len(bits)) + "|")
        for row in rows:
            cells = []
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
            out.append("| " + " | ".join(map(str, row)) + " | " + " | ".join(cells) + " |")
        out.append("")
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


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit outside the axes
    plt.close(fig)
    return path


def _styles(labels: list[str]) -> dict[str, dict]:
    """One look per curve label: ten colours, then the same colours dashed, dotted, ..."""
    colours = plt.get_cmap("tab10").colors
    dashes = ["-", "--", ":", "-."]
    return {
        label: {"color": colours[i % 10], "linestyle": dashes[i // 10 % 4]}
        for i, label in enumerate(labels)
    }


HATCHES = {"-": None, "--": "//", ":": "..", "-.": "xx"}  # bars' pattern for a line style


def _legend(ax: plt.Axes, fontsize: int = 8) -> None:
    """The legend to the right of the axes, where it hides no curve."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _runs(tracked: pd.DataFrame, label: str, bits: int) -> pd.Series:
    return tracked[(tracked["label"] == label) & (tracked["bits"] == bits)]["record"]


def oscillation_figures(
    records: list[dict],
    tracked: pd.DataFrame,
    labels: list[str],
    bits: list[int],
    style: dict,
    out: Path,
) -> list[Path]:
    """Oscillation over training: the oscillating share and the threshold crossings of
    every epoch, one column per bit-width, the mean over seeds and a band of one standard
    deviation. Oscillation by depth: the last epoch's oscillating share of each tracked
    layer, input to output, the methods side by side as grouped bars (mean over seeds), one
    panel per bit-width (as Nagel et al. plot it per layer)."""
    rows = (("osc_share", 100.0, "oscillating weights (%)"), ("crossings", 1.0, "crossings"))
    fig, axes = plt.subplots(2, len(bits), figsize=(4.5 * len(bits), 6.4), squeeze=False)
    for col, b in enumerate(bits):
        for label in labels:
            for row, (key, scale, name) in enumerate(rows):
                curves = pd.DataFrame(
                    [
                        [h["osc"][key] * scale for h in records[i]["history"] if "osc" in h]
                        for i in _runs(tracked, label, b)
                    ]
                )
                if curves.empty:
                    continue
                ax, epochs = axes[row][col], curves.columns + 1
                mean, std = curves.mean(), curves.std().fillna(0)  # one seed: no band
                ax.plot(epochs, mean, label=label, **style[label])
                band = (mean - std, mean + std)
                ax.fill_between(epochs, *band, color=style[label]["color"], alpha=0.15)
                ax.set(xlabel="epoch", ylabel=name, title=f"{b}-bit")
    _legend(axes[0][-1])
    fig.suptitle("Oscillation over training (mean over seeds, band: ± one std)")
    paths = [_save(fig, out / "oscillation_over_training.png")]

    fig, axes = plt.subplots(len(bits), 1, figsize=(9, 3.2 * len(bits)), squeeze=False)
    for ax, b in zip(axes[:, 0], bits, strict=True):
        shares = {}
        for label in labels:
            last = [records[i]["history"][-1]["osc"] for i in _runs(tracked, label, b)]
            layers = [o["layers"] for o in last if o.get("layers")]
            if layers:
                frame = pd.DataFrame(
                    [{k: v["osc_share"] * 100 for k, v in ls.items()} for ls in layers]
                )
                shares[label] = frame.mean()
        width = 0.8 / max(len(shares), 1)
        for k, (label, share) in enumerate(shares.items()):
            xs = [x + (k - (len(shares) - 1) / 2) * width for x in range(len(share))]
            hatch = HATCHES[style[label]["linestyle"]]  # past ten labels colours repeat
            ax.bar(xs, share.values, width, label=label, color=style[label]["color"], hatch=hatch)
        names = next(iter(shares.values())).index if shares else []
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(xlabel="layer (input to output)", ylabel="oscillating (%)", title=f"{b}-bit")
    _legend(axes[0][0])
    fig.suptitle("Oscillating weights per layer, last epoch (mean over seeds)")
    return [*paths, _save(fig, out / "oscillation_by_layer.png")]


def figures(records: list[dict], df: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy vs bits, oscillating share over training, per-weight oscillation counts,
    distance to the nearest threshold, and cross-bit accuracy of PTQ / osc_reg. Curves
    are labelled by method and varying settings, like the table's rows."""
    varying = varying_settings(df)
    ok = _with_setting_columns(df[df["status"] == "completed"], varying)
    if ok.empty:
        return []
    ok["label"] = [_label(r, varying) for _, r in ok.iterrows()]
    order = {m: i for i, m in enumerate(_method_order(ok["method"]))}
    labels = sorted(ok["label"].unique(), key=lambda s: (order[s.split(" [")[0]], s))
    style = _styles(labels)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    exp = _expand_bits_free(ok)
    for label in labels:
        g = exp[exp["label"] == label].groupby("bits")["acc"]
        ax.errorbar(
            g.mean().index,
            g.mean().values,
            yerr=g.std().fillna(0).values,
            marker="o",
            capsize=3,
            label=label,
            **style[label],
        )
    ax.set(xlabel="weight bits", ylabel="test accuracy (%)", title="Accuracy vs bit-width")
    _legend(ax)
    paths.append(_save(fig, out / "accuracy_vs_bits.png"))

    has_osc = [
        bool(records[i]["history"]) and "osc" in records[i]["history"][-1] for i in ok["record"]
    ]
    tracked = ok[has_osc]
    if len(tracked):
        bits = sorted(tracked["bits"].unique())
        paths += oscillation_figures(records, tracked, labels, bits, style, out)

        low = min(bits)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for label in labels:
            finals = [
                records[i]["final"]
                for i in tracked[(tracked["label"] == label) & (tracked["bits"] == low)]["record"]
            ]
            finals = [f for f in finals if "osc_count_hist" in f and "threshold_distance" in f]
            if not finals:
                continue
            hists = [f["osc_count_hist"] for f in finals]
            width = max(map(len, hists))
            counts = pd.DataFrame([h + [0] * (width - len(h)) for h in hists]).sum()
            share = counts / counts.sum()
            axes[0].plot(share.index, share.values, marker=".", label=label, **style[label])
            dist = pd.DataFrame([f["threshold_distance"]["counts"][:-1] for f in finals]).sum()
            edges = finals[0]["threshold_distance"]["edges"]
            axes[1].plot(
                [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)],
                (dist / dist.sum()).values,
                label=label,
                **style[label],
            )
        axes[0].set(
            yscale="log",
            xlabel="oscillations of a weight over training",
            ylabel="share of weights",
            title=f"Oscillations per weight, {low}-bit",
        )
        axes[1].set(
            xlabel="distance to nearest threshold (steps)",
            ylabel="share of weights",
            title=f"Latent weights vs thresholds, {low}-bit, end",
        )
        _legend(axes[1])
        paths.append(_save(fig, out / "oscillation_histograms.png"))

    cross = (
        ok[ok.filter(like="acc@").notna().any(axis=1)] if ok.filter(like="acc@").size else ok[:0]
    )
    if len(cross):
        fig, ax = plt.subplots(figsize=(6, 4))
        cols = sorted(cross.filter(like="acc@").columns, key=lambda c: int(c[4:-3]))
        xs = [int(c[4:-3]) for c in cols]
        for (label, b, free), g in cross.groupby(["label", "bits", "bits_free"]):
            trained = "in full precision" if free else f"for {b}-bit"  # fp ignores `bits`
            ax.plot(xs, g[cols].mean().values, marker="o", label=f"{label} (trained {trained})")
        ax.set(
            xlabel="bits of rounded weights",
            ylabel="test accuracy (%)",
            title="Cross-bit accuracy (round to nearest)",
            xticks=xs,
        )
        ax.legend(fontsize=7, loc="lower right")  # accuracy rises with the bits: empty there
        paths.append(_save(fig, out / "cross_bit_accuracy.png"))
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
    print((out / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
