"""The report's figures (PNG): accuracy against bits, oscillation over training and per
layer, per-weight oscillation counts and distances to the thresholds, cross-bit accuracy.

One colour per method, the same in every figure of a report; a method's runs that differ in
a setting other than the bit-widths (which the axes or panels show) are its variants, drawn
in that colour with a line style and marker of their own and labelled by that setting alone
(`lsq (act_quantizer.name=none)`). Legends sit below the axes, in as many columns as their
width allows, so that none is wider than the axes it explains.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import colorcet
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
HATCHES = (None, "//", "..", "xx")  # bars' pattern for a variant
NOT_SHOWN = ("bits", "fp_run.key")  # in the axes or panels; a hash (fp_run.recipe says it)
UNSET = (None, "-", "None")  # a setting a run lacks, or leaves null (as value or as text)


def colours(n: int) -> list[str]:
    """n colours as far apart as colorcet's Glasbey palette puts them (256), of some chroma
    and at most 70 lightness, so that none is grey or faint on white; tab10 and tab20 had
    ten hues for twenty methods, a light and a dark of each."""
    palette = colorcet.palette["glasbey_bw_minc_20_maxl_70"]  # hex strings
    return [palette[i % len(palette)] for i in range(n)]


def _shown(settings: dict, bits: int) -> dict:
    """A run's settings as its label shows them: activation bits only where they are not
    the weight bits."""
    out = {k: v for k, v in settings.items() if k not in NOT_SHOWN}
    if out.get("act_bits") == bits:
        del out["act_bits"]
    return out


def _text(value: object) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _mode(values: list[str]) -> str | None:
    """The single most common value, or None where two are as common."""
    top = Counter(values).most_common(2)
    return top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None


def series(runs: pd.DataFrame) -> list[str]:
    """Each run's series label: its method, and the settings in which it differs from the
    method's most common values among those that vary between the method's runs (a
    component whose name differs shows that name alone, not its options). A setting with no
    single most common value (5 runs at 80 epochs, 5 at 160) is shown on every run."""
    labels = [""] * len(runs)
    shown = [_shown(s, b) for s, b in zip(runs["settings"], runs["bits"], strict=True)]
    for method, rows in runs.reset_index(drop=True).groupby("method").groups.items():
        keys = sorted(set().union(*(shown[i] for i in rows)))
        values = {k: [_text(shown[i].get(k, "-")) for i in rows] for k in keys}
        varying = [k for k in keys if len(set(values[k])) > 1]
        renamed = {k.rsplit(".", 1)[0] for k in varying if k.endswith(".name")}
        varying = [k for k in varying if k.endswith(".name") or k.rsplit(".", 1)[0] not in renamed]
        usual = {k: _mode(values[k]) for k in varying}
        differs = [
            [(k, values[k][n]) for k in varying if values[k][n] != usual[k]]
            for n in range(len(rows))
        ]
        for i, pairs in zip(rows, without_unset(differs), strict=True):
            labels[i] = method + (f" ({', '.join(f'{k}={v}' for k, v in pairs)})" if pairs else "")
    return labels


def without_unset(variants: list[list[tuple[str, object]]]) -> list[list[tuple[str, object]]]:
    """Variants' (setting, value) pairs without the settings a variant lacks or leaves null
    (`UNSET`), where the variants stay told apart; else as they are."""
    short = [[(k, v) for k, v in pairs if v not in UNSET] for pairs in variants]
    distinct = len({str(p) for p in variants})
    return short if len({str(s) for s in short}) == distinct else variants


def looks(runs: pd.DataFrame, order: list[str]) -> dict[str, dict]:
    """Each series' colour (its method's: `order` lists the methods), line style, marker
    and hatch (its variant's, the method's most common one plain)."""
    palette = dict(zip(order, colours(len(order)), strict=True))
    out = {}
    for method in order:
        labels = runs.loc[runs["method"] == method, "label"]
        ranked = [label for label, _ in Counter(labels).most_common()]
        for k, label in enumerate(sorted(ranked, key=lambda x: (x != method, ranked.index(x)))):
            out[label] = {
                "color": palette[method],
                "linestyle": DASHES[k % 4],
                "marker": MARKERS[k % 4],
                "hatch": HATCHES[k % 4],
            }
    return out


def _each(runs: pd.DataFrame, style: dict):  # noqa: ANN202
    """(label, its runs) for every series among `runs`, in the legend's order."""
    for label in style:
        g = runs[runs["label"] == label]
        if len(g):
            yield label, g


def line(look: dict) -> dict:
    """A series' look as plot() takes it."""
    return {k: look[k] for k in ("color", "linestyle", "marker")}


def legend(fig: plt.Figure, axes: list[plt.Axes], handles: list, labels: list[str]) -> None:
    """One legend for the figure, below its axes, in as many columns as fit the width of
    the axes; the figure grows by the legend's height, so the axes keep theirs, and, where
    even one column is wider than the axes, by the difference in width."""
    if not handles:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = _span([ax.get_window_extent(renderer) for ax in axes]).width
    for ncol in range(min(len(labels), 6), 0, -1):
        lg = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8)
        box = lg.get_window_extent(renderer)
        if ncol == 1 or box.width <= width:
            fig.set_figheight(fig.get_figheight() + box.height / fig.dpi)
            if box.width > width:
                fig.set_figwidth(fig.get_figwidth() + (box.width - width) / fig.dpi + 0.1)
            return
        lg.remove()


def _span(boxes: list) -> matplotlib.transforms.Bbox:
    return matplotlib.transforms.Bbox.union(boxes)


def handles_of(axes: list[plt.Axes], style: dict) -> tuple[list, list[str]]:
    """Every labelled artist of the axes, each label once, in the order of the series in
    `style` (methods in their order, a method's variants after it)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    rank = {label: i for i, label in enumerate(style)}
    labels = sorted(seen, key=lambda x: rank.get(x.split(", trained")[0], len(rank)))
    return [seen[x] for x in labels], labels


def save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_bits(runs: pd.DataFrame, style: dict, out: Path) -> Path:
    """Test accuracy against weight bits, a line per series joining its bit-widths (mean
    over seeds, bars: one std), ticks at the bit-widths that ran; a run trained in full
    precision (fp) is a level line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.4), layout="constrained")
    for label, g in _each(runs, style):
        acc = g.groupby("bits")["acc"]
        mean, std = acc.mean(), acc.std().fillna(0)
        ax.errorbar(
            mean.index, mean.values, yerr=std.values, capsize=3, label=label, **line(style[label])
        )
    ax.set_xticks(sorted(runs["bits"].unique()))  # the bit-widths that ran, no others
    ax.set(xlabel="weight bits", ylabel="test accuracy (%)", title="Accuracy vs bit-width")
    legend(fig, [ax], *handles_of([ax], style))
    return save(fig, out / "accuracy_vs_bits.png")


def over_training(records: list[dict], runs: pd.DataFrame, style: dict, out: Path) -> Path:
    """The oscillating share and the threshold crossings of every epoch, a column per
    bit-width: the mean over seeds and a band of one standard deviation."""
    bits = sorted(runs["bits"].unique())
    rows = (("osc_share", 100.0, "oscillating weights (%)"), ("crossings", 1.0, "crossings"))
    fig, axes = plt.subplots(
        2,
        len(bits),
        figsize=(max(3.6 * len(bits) + 1, 6.4), 6.2),  # the title's width for one bit-width
        squeeze=False,
        layout="constrained",
    )
    for col, b in enumerate(bits):
        for label, g in _each(runs[runs["bits"] == b], style):
            for row, (key, scale, name) in enumerate(rows):
                curves = pd.DataFrame(
                    [
                        [h["osc"][key] * scale for h in records[i]["history"] if "osc" in h]
                        for i in g["record"]
                    ]
                )
                ax, epochs = axes[row][col], curves.columns + 1
                mean, std = curves.mean(), curves.std().fillna(0)  # one seed: no band
                ax.plot(epochs, mean, label=label, **line(style[label]))
                ax.fill_between(
                    epochs, mean - std, mean + std, color=style[label]["color"], alpha=0.15
                )
                ax.set(xlabel="epoch", ylabel=name, title=f"{b}-bit")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    flat = list(axes.flat)
    legend(fig, flat, *handles_of(flat, style))
    fig.suptitle("Oscillation over training (mean over seeds, band: ± one std)")
    return save(fig, out / "oscillation_over_training.png")


def by_layer(records: list[dict], runs: pd.DataFrame, style: dict, out: Path) -> Path:
    """The last epoch's oscillating share of each tracked layer, input to output, the
    series side by side as grouped bars (mean over seeds), a panel per bit-width, the
    layers named under the last one (as Nagel et al. plot it per layer)."""
    bits = sorted(runs["bits"].unique())
    fig, axes = plt.subplots(
        len(bits),
        1,
        figsize=(10, 2.4 * len(bits) + 2.2),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    names: list[str] = []
    for ax, b in zip(axes[:, 0], bits, strict=True):
        shares = {}
        for label, g in _each(runs[runs["bits"] == b], style):
            layers = [records[i]["history"][-1]["osc"].get("layers") for i in g["record"]]
            layers = [ls for ls in layers if ls]
            if layers:
                frame = pd.DataFrame(
                    [{k: v["osc_share"] * 100 for k, v in ls.items()} for ls in layers]
                )
                shares[label] = frame.mean()
        width = 0.8 / max(len(shares), 1)
        for k, (label, share) in enumerate(shares.items()):
            xs = [x + (k - (len(shares) - 1) / 2) * width for x in range(len(share))]
            look = style[label]
            ax.bar(xs, share.values, width, label=label, color=look["color"], hatch=look["hatch"])
            names = names or list(share.index)
        ax.set(ylabel="oscillating (%)", title=f"{b}-bit")
    bottom = axes[-1][0]
    bottom.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    bottom.set_xlabel("layer (input to output)")
    flat = list(axes[:, 0])
    legend(fig, flat, *handles_of(flat, style))
    fig.suptitle("Oscillating weights per layer, last epoch (mean over seeds)")
    return save(fig, out / "oscillation_by_layer.png")


def histograms(records: list[dict], runs: pd.DataFrame, style: dict, out: Path) -> Path | None:
    """At the lowest bit-width: the share of weights by how often each oscillated over
    training, and the latent weights' distance to the nearest threshold at the end."""
    low = min(runs["bits"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for label, g in _each(runs[runs["bits"] == low], style):
        finals = [records[i]["final"] for i in g["record"]]
        finals = [f for f in finals if "osc_count_hist" in f and "threshold_distance" in f]
        if not finals:
            continue
        hists = [f["osc_count_hist"] for f in finals]
        width = max(map(len, hists))
        counts = pd.DataFrame([h + [0] * (width - len(h)) for h in hists]).sum()
        share = counts / counts.sum()
        look = {**line(style[label]), "marker": "."}
        axes[0].plot(share.index, share.values, label=label, **look)
        dist = pd.DataFrame([f["threshold_distance"]["counts"][:-1] for f in finals]).sum()
        edges = finals[0]["threshold_distance"]["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
        axes[1].plot(centres, (dist / dist.sum()).values, label=label, **line(style[label]))
    if not axes[0].lines:
        plt.close(fig)
        return None
    axes[0].set(
        yscale="log",
        xlabel="oscillations of a weight over training",
        ylabel="share of weights",
        title=f"Oscillations per weight, {low}-bit",
    )
    axes[1].set(
        xlabel="distance to the nearest threshold (steps)",
        ylabel="share of weights",
        title=f"Latent weights against thresholds, {low}-bit, end",
    )
    legend(fig, list(axes), *handles_of(list(axes), style))
    return save(fig, out / "oscillation_histograms.png")


def cross_bits(runs: pd.DataFrame, style: dict, out: Path) -> Path:
    """Test accuracy with the weights rounded to nearest at each bit-width (`acc@Nbit`),
    per series and the bit-width it trained for (mean over seeds)."""
    cols = sorted(runs.filter(like="acc@").columns, key=lambda c: int(c[4:-3]))
    xs = [int(c[4:-3]) for c in cols]
    fig, ax = plt.subplots(figsize=(6.5, 4.4), layout="constrained")
    for label, runs_of in _each(runs, style):
        for k, ((b, free), g) in enumerate(runs_of.groupby(["bits", "bits_free"])):
            trained = "trained in full precision" if free else f"trained for {b}-bit"
            look = line(style[label]) | {"marker": MARKERS[k % 4]}  # one per trained width
            ax.plot(xs, g[cols].mean().values, label=f"{label}, {trained}", **look)
    ax.set(
        xlabel="bits of rounded weights",
        ylabel="test accuracy (%)",
        title="Cross-bit accuracy (round to nearest)",
        xticks=xs,
    )
    legend(fig, [ax], *handles_of([ax], style))
    return save(fig, out / "cross_bit_accuracy.png")
