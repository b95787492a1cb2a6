"""The report on awkward sets of runs: figures a reader can read (legends within the axes'
width, one colour per method, no text over other text), recipes compared row by row, a
`--versus` directory that shares nothing, and an output directory that cannot be written."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgba_array
from matplotlib.transforms import Bbox

from oscbench.analysis import figures, frame, report
from tests.conftest import run_config, unprivileged

QUICK = ["logger=none", "device=cpu"]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, dict]:
    """One QAT record and one FP record (rounded to 2, 3, 4, 8 bits) from real runs."""
    root = tmp_path_factory.mktemp("real")
    run_config(["method=fp", "trainer.epochs=1", *QUICK], root / "fp")
    run_config(["method=lsq", "bits=2", "trainer.epochs=3", *QUICK], root / "lsq")
    return {name: frame.load_records(root / name)[0] for name in ("fp", "lsq")}


def _crowd(real: dict[str, dict]) -> list[dict]:
    """Many methods at three bit-widths and two seeds, some in two variants (activations
    in full precision, another lr), with long names: what made the claims study's figures
    unreadable."""
    out = []
    methods = [f"method_with_a_long_name_{i}" for i in range(12)]
    for i, method in enumerate(methods):
        for bits in (2, 3, 4):
            for seed in (0, 1):
                for variant in ("plain", "a32", "lr") if i < 3 else ("plain",):
                    r = copy.deepcopy(real["lsq"])
                    c = r["config"]
                    c["method"]["name"], c["bits"], c["seed"], c["act_bits"] = (
                        method,
                        bits,
                        seed,
                        bits,
                    )
                    if variant == "a32":
                        c["act_quantizer"] = {"name": "none"}
                        c["cross_bits"] = [2, 3, 4, 8]
                        r["final"] |= {f"acc@{b}bit": 50.0 + b for b in (2, 3, 4, 8)}
                    if variant == "lr":
                        c["trainer"]["lr"] = 0.1
                    r["method"], r["key"] = method, f"{method}-{bits}-{seed}-{variant}"
                    r["final"]["acc_bn"] = 80 + bits + i / 10 + seed / 100
                    out.append(r)
    return [*out, copy.deepcopy(real["fp"])]


def _inspect(fig: plt.Figure) -> dict:
    """What a reader sees: every legend's width against the axes' span, texts that
    overlap, and each method's colours."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    span = Bbox.union([ax.get_window_extent(r) for ax in axes])
    legends = [*fig.legends, *(ax.get_legend() for ax in axes if ax.get_legend())]
    texts = []
    for ax in axes:
        for n, axis in enumerate((ax.xaxis, ax.yaxis)):
            low, high = sorted(axis.get_view_interval())
            ticks = [  # the drawn ones: within the axis' view
                t
                for t in axis.get_ticklabels()
                if t.get_visible() and t.get_text() and low <= t.get_position()[n] <= high
            ]
            texts += [(t, t.get_rotation() == 0) for t in ticks]
        texts += [(t, True) for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    overlaps = []
    for i, (a, flat_a) in enumerate(texts):
        for b, flat_b in texts[i + 1 :]:
            if flat_a and flat_b and a.get_window_extent(r).overlaps(b.get_window_extent(r)):
                overlaps.append((a.get_text(), b.get_text()))
    colours: dict[str, set] = {}
    for lg in legends:
        for handle, text in zip(lg.legend_handles, lg.get_texts(), strict=True):
            get = handle.get_color if hasattr(handle, "get_color") else handle.get_facecolor
            method = text.get_text().split(" (")[0].split(",")[0]
            colours.setdefault(method, set()).add(to_hex(to_rgba_array(get())[0]))
    return {
        "legend_widths": [lg.get_window_extent(r).width for lg in legends],
        "span": span.width,
        "inside": all(fig.bbox.contains(*lg.get_window_extent(r).p0) for lg in legends),
        "overlaps": overlaps,
        "colours": colours,
    }


def test_the_figures_have_legends_within_the_axes_width_and_one_colour_per_method(
    real, tmp_path, monkeypatch
):
    seen = {}
    save = figures.save

    def inspected(fig, path):
        seen[Path(path).name] = _inspect(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "save", inspected)
    paths = report.write_report(_crowd(real), tmp_path)
    assert {
        "accuracy_vs_bits.png",
        "oscillation_over_training.png",
        "oscillation_by_layer.png",
        "oscillation_histograms.png",
        "cross_bit_accuracy.png",
    } <= set(seen) and set(seen) <= set(paths)
    colour_of: dict[str, set] = {}
    for name, look in seen.items():
        assert look["legend_widths"], name
        assert max(look["legend_widths"]) <= look["span"] + 1, name
        assert look["inside"] and not look["overlaps"], (name, look["overlaps"])
        for method, found in look["colours"].items():
            colour_of.setdefault(method, set()).update(found)
    assert all(len(c) == 1 for c in colour_of.values()), colour_of  # the same in every figure
    assert len({next(iter(c)) for c in colour_of.values()}) == len(colour_of)  # and its own


def test_a_series_is_labelled_by_what_differs_within_its_method(real):
    df = frame.runs_frame(_crowd(real))
    labels = set(figures.series(df[df["status"] == "completed"]))
    assert "method_with_a_long_name_0" in labels  # the usual variant: the method alone
    assert "method_with_a_long_name_0 (trainer.lr=0.1)" in labels
    assert any(x.startswith("method_with_a_long_name_0 (act_quantizer.name=none") for x in labels)
    assert not any("grad_scale" in x or "act_bits" in x for x in labels)
    assert "method_with_a_long_name_5" in labels and "fp" in labels


def test_a_setting_without_one_usual_value_is_named_on_every_series():
    settings = [{"trainer.epochs": e} for e in (80, 80, 160, 160)] + [{"trainer.epochs": 10}]
    df = pd.DataFrame({"method": ["lsq"] * 5, "bits": [2] * 5, "settings": settings})
    assert figures.series(df) == [
        *["lsq (trainer.epochs=80)"] * 2,
        *["lsq (trainer.epochs=160)"] * 2,
        "lsq (trainer.epochs=10)",
    ]
    # one usual value (160, twice): its runs are the method alone
    assert figures.series(df.iloc[1:]) == [
        "lsq (trainer.epochs=80)",
        "lsq",
        "lsq",
        "lsq (trainer.epochs=10)",
    ]


def test_rows_order_a_settings_numbers_by_size_and_text_after_them():
    values = [160, "-", 20, 80.0, "sgd", 10, float("nan")]
    ordered = sorted(values, key=frame.numbers_first)
    assert ordered[:4] == [10, 20, 80.0, 160]  # as text: 10, 160, 20, 80
    assert [str(v) for v in ordered[4:]] == ["-", "nan", "sgd"]


def test_recipes_are_compared_between_rows_alike_in_every_other_setting(tmp_path):
    """Common-recipe runs of a method that differ in another setting (epochs) beside a
    paper-recipe run: the paper's row is compared with the common row of its epochs."""
    for recipe, epochs in (("common", 1), ("common", 2), ("aoq2025", 1)):
        run_config(
            ["method=fp", f"recipe={recipe}", f"trainer.epochs={epochs}", *QUICK],
            tmp_path / "runs" / f"{recipe}-{epochs}",
        )
    records = frame.load_records(tmp_path / "runs")
    report.write_report(records, tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    section = table.split("### Each paper's recipe against the common one")[1]
    (row,) = [x for x in section.splitlines() if x.startswith("| fp | aoq2025 |")]
    acc = {(r["config"]["recipe"]["name"], r["config"]["trainer"]["epochs"]): r for r in records}
    diff = acc[("aoq2025", 1)]["final"]["acc_bn"] - acc[("common", 1)]["final"]["acc_bn"]
    assert row.split("|")[3].strip() == "1" and f"{diff:+,.2f}" in row


def test_versus_runs_that_share_no_method_says_so(real, tmp_path):
    records = [copy.deepcopy(real["lsq"])]
    other = tmp_path / "other"
    run_config(["method=fp", "trainer.epochs=1", *QUICK], other / "fp")
    paths = report.write_report(records, tmp_path / "report", versus_dir=other)
    table = paths["table.md"].read_text()
    assert "### Against other" in table and "nothing to compare" in table


def test_a_report_that_cannot_be_written_names_the_directory_and_the_fix(real, tmp_path):
    runs = tmp_path / "runs"
    run_config(["method=fp", "trainer.epochs=1", *QUICK], runs / "fp")
    runs.chmod(0o555)
    try:
        cmd = unprivileged([sys.executable, "-m", "oscbench.report", str(runs)])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    finally:
        runs.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot write the report to {runs / 'report'}" in proc.stderr
    assert "--out DIR" in proc.stderr


def test_a_setting_that_is_null_keeps_its_row(real):
    """Folded runs carry bn_fold.freeze_epoch=None: their row is in every table (pandas
    drops a None key from a grouping, and the deploy study's tables lost every folded row)."""
    plain, folded = copy.deepcopy(real["lsq"]), copy.deepcopy(real["lsq"])
    folded["config"]["bn_fold"] = {"enabled": True, "freeze_epoch": None}
    folded["key"], folded["final"]["acc_bn"] = "folded", 12.5
    df = frame.runs_frame([plain, folded])
    text = report.markdown(frame.summary(df), df)
    (row,) = [line for line in text.splitlines() if line.startswith("| lsq | True | null |")][:1]
    assert "12.50" in row
    assert any(line.startswith("| lsq | - | - |") for line in text.splitlines())


def test_a_label_leaves_out_settings_a_run_lacks_or_leaves_null(real):
    """One unfolded and one folded run of a method (no usual value: both named): the folded
    run's label names bn_fold.enabled=True, neither names freeze_epoch's null or an absent
    setting's '-', since the labels still tell the two apart."""
    plain, folded = copy.deepcopy(real["lsq"]), copy.deepcopy(real["lsq"])
    folded["config"]["bn_fold"] = {"enabled": True, "freeze_epoch": None}
    folded["key"] = "folded"
    labels = figures.series(frame.runs_frame([plain, folded]))
    assert sorted(labels) == ["lsq", "lsq (bn_fold.enabled=True)"]


def test_a_metric_that_no_run_has_gets_no_table(real):
    """Runs that were not exported: no table of exported accuracy full of '-'; once one
    run is, the table is there, with a cell for that run only."""
    df = frame.runs_frame([real["lsq"], real["fp"]])
    text = report.markdown(frame.summary(df), df)
    assert "### Test accuracy (%) after BN re-estimation" in text
    assert "exported integer model" not in text and "Frozen weights" not in text
    exported = copy.deepcopy(real["lsq"])
    exported["export"] = {"acc": 42.0, "test_images": 360, "correct": 151}
    df = frame.runs_frame([exported, real["fp"]])
    table = report.markdown(frame.summary(df), df).split("exported integer model")[1]
    assert "| lsq | yes | 42.00 |" in table.split("###")[0]  # one run: no spread
