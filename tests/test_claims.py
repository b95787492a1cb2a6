"""The claims study: every claim is about runs its sweeps make, the verdicts follow their
rules, and a tiny study runs end to end (`python -m oscbench.claims`, what `make claims` runs)
with numbers that match the records."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from scipy import stats

from oscbench.analysis import claims, frame, report, study
from oscbench.launch.compose import compose
from oscbench.launch.config import resolved, validate
from oscbench.records.runs import fingerprint

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "claims" / "study.yaml"


def _configurations(overrides: list[str]) -> list[list[str]]:
    """The configurations one multirun command line trains: the product of its swept values,
    less its seeds (a seed makes no cell of its own: each configuration is composed once)."""
    axes = []
    unseeded = [o for o in overrides if not o.startswith("seed=")]
    for o in OverridesParser.create().parse_overrides(unseeded):
        key = o.get_key_element()
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        axes.append([f"{key}={v}" for v in values])
    return [list(p) for p in itertools.product(*axes)]


def _made(study: dict) -> dict[tuple[str, str], list[claims.Cell]]:
    """The cells the study's sweeps make: (method, bits) -> one `Cell` (with no runs) per
    configuration, and the common recipe's FP run, which every quantized run starts from."""
    base = [o for o in study["base"] if "launcher" not in o]

    def settings(cfg) -> dict:  # less the seed, which a study's sweep may name
        return {k: v for k, v in fingerprint(resolved(cfg)).items() if k != "seed"}

    made = {("fp", "fp32"): [claims.Cell(settings(compose([*base, "method=fp"])), [])]}
    for sweep in study["sweeps"]:
        for run in _configurations(sweep):
            cfg = compose([*base, *run])
            spec = validate(cfg)
            assert spec.model.name == "mobilenetv2_small"
            assert spec.init_from == "fp" or spec.method == "fp"
            cell = claims.Cell(settings(cfg), [])
            found = made.setdefault((spec.method, spec.bits_label), [])
            found += [cell] if cell not in found else []
    return made


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "experiments").glob("*/*.yaml")),  # every study file
    ids=lambda p: p.parent.name + "/" + p.name,
)
def test_every_claim_is_about_cells_that_the_studys_sweeps_make(path):
    study = OmegaConf.to_container(OmegaConf.load(path))
    made = _made(study)
    parsed = claims.parse_claims(study["claims"])
    assert len(parsed) >= len(study["claims"])  # `over` expanded
    for c in parsed:
        for side in (c.a, c.b):
            where = dict(side.where) | {"recipe": dict(side.where).get("recipe", "common")}
            found = [
                cell
                for cell in made.get((side.method, side.bits), [])
                if all(cell.matches(k, v) for k, v in where.items())
            ]
            assert len(found) == 1, (c.claim, side)  # exactly one cell, named by its settings
    papers = {c.paper.split(" (")[0].split(" 20")[0] for c in parsed}
    if path == STUDY:
        for who in ("Nagel et al.", "OFQ", "AOQ", "Wenshoj et al."):
            assert who in papers


def _row(diff_low, diff_high, p, expect="higher", margin=0.5, opposite=1.0):
    return {
        "n": 5,
        "expect": expect,
        "margin": margin,
        "ci_low": diff_low,
        "ci_high": diff_high,
        "p": p,
        "p_opposite": opposite,
    }


def test_verdicts_follow_the_rules_with_holm_over_the_table():
    table = pd.DataFrame(
        [
            _row(0.2, 1.5, 0.001),  # significant even after Holm (x5): reproduced
            _row(-0.3, 0.4, 0.3),  # rules out +0.5: not reproduced
            _row(-0.3, 1.2, 0.2),  # could be either: inconclusive
            _row(0.1, 0.9, 0.02),  # significant alone, not after Holm over 5: inconclusive
            _row(-0.4, 0.3, 0.04, "not_lower", 0.5),  # third smallest p: 0.04 x 3 after Holm
        ]
    )
    out = claims.verdicts(table)
    assert np.isclose(out.loc[0, "p_holm"], 0.005)  # the smallest p times 5
    assert list(out["verdict"][:4]) == [
        "reproduced",
        "not reproduced",
        "inconclusive",
        "inconclusive",
    ]
    # 0.12 after Holm, and its interval is not below -0.5: the reason says which
    assert out.loc[4, "verdict"] == "inconclusive"
    assert out.loc[4, "why"] == "the interval lies above -0.5, not significant after Holm"
    wide = claims.verdicts(pd.DataFrame([_row(-0.7, 0.3, 0.2, "not_lower", 0.5)]))
    assert wide.loc[0, "why"] == "the interval reaches below -0.5"
    worse = claims.verdicts(pd.DataFrame([_row(-1.4, -0.7, 0.99, "not_lower", 0.5)]))
    assert worse.loc[0, "verdict"] == "not reproduced"
    opposite = claims.verdicts(pd.DataFrame([_row(-2.0, 0.6, 0.99, opposite=0.001)]))
    assert opposite.loc[0, "verdict"] == "not reproduced"  # significant the other way


def test_a_claim_is_tested_with_scipys_t_tests_on_the_records(tmp_path):
    def record(method, bits, seed, acc, before, init="fp"):
        config = {"seed": seed, "init_from": init, "ptq": False, "bits": 2}
        return {
            "method": method,
            "bits": bits,
            "config": config | {"recipe": {"name": "common"}},
            "history": [{"step": 1410, "lr_last": 2e-6}],
            "final": {"acc_bn": acc, "acc": before},
        }

    a = [
        record("x", "w2a2", s, v, v - d)
        for s, v, d in [(0, 80.0, 1.0), (1, 82.0, 0.5), (2, 81.0, 2.0)]
    ]
    b = [record("lsq", "w2a2", s, v, v) for s, v in [(0, 79.0), (1, 80.5), (2, 80.0)]]
    by_cell = {("x", "w2a2"): [claims.Cell({}, a)], ("lsq", "w2a2"): [claims.Cell({}, b)]}
    versus, bn = claims.parse_claims(
        [
            {
                "paper": "P",
                "claim": "x wins",
                "a": "x w2a2 acc",
                "b": "lsq w2a2 acc",
                "expect": "higher",
                "margin": 0.5,
            },
            {
                "paper": "P",
                "claim": "BN",
                "a": "x w2a2 acc",
                "b": "x w2a2 acc_before_bn",
                "expect": "not_lower",
                "margin": 0.5,
            },
        ]
    )
    row = claims.test_claim(versus, by_cell)
    res = stats.ttest_rel([80.0, 82.0, 81.0], [79.0, 80.5, 80.0], alternative="greater")
    assert row["test"] == "paired t" and np.isclose(row["p"], res.pvalue)
    assert np.isclose(row["diff"], 81.0 - 79.8333333333333, rtol=0, atol=1e-12)
    assert row["regime"] == "1,410 steps from FP, last lr 2e-06, common"
    row = claims.test_claim(bn, by_cell)  # two metrics of one cell pair by seed
    res = stats.ttest_rel(np.array([1.0, 0.5, 2.0]) + 0.5, np.zeros(3), alternative="greater")
    assert row["test"] == "paired t" and np.isclose(row["p"], res.pvalue)
    for r in b:
        r["config"]["init_from"] = None  # no shared start: Welch
    row = claims.test_claim(versus, by_cell)
    res = stats.ttest_ind(
        [80.0, 82.0, 81.0], [79.0, 80.5, 80.0], equal_var=False, alternative="greater"
    )
    assert row["test"] == "Welch t" and np.isclose(row["p"], res.pvalue)
    missing = claims.parse_claims(
        [
            {
                "paper": "P",
                "claim": "c",
                "a": "y w2a2 acc",
                "b": "lsq w2a2 acc",
                "expect": "higher",
                "margin": 1,
            }
        ]
    )[0]
    assert claims.test_claim(missing, by_cell)["test"] == "no runs of y W2A2"
    # runs that exist but all failed are named as such, with how the first one failed
    crashed = [record("y", "w2a2", s, 0.0, 0.0) | {"status": "failed"} for s in (0, 1)]
    crashed[0]["error"] = "Traceback ...\nFloatingPointError: training diverged"
    failed = {("y", "w2a2"): [claims.Cell({}, crashed)]}
    row = claims.test_claim(missing, by_cell, failed)
    assert row["test"] == "every run of y W2A2 failed (2; FloatingPointError: training diverged)"
    # ... and their verdict says so: runs that failed are not runs that never ran
    table = claims.verdicts(pd.DataFrame([row, claims.test_claim(missing, by_cell)]))
    assert list(table["verdict"]) == [claims.FAILED, claims.NOT_RUN]


def test_a_ptq_run_has_no_accuracy_before_bn_reestimation():
    """A PTQ run's `acc` is its full-precision model before rounding, not its rounded model
    before BN re-estimation: the BN claim and figure must not read it as one."""
    final = {"acc": 90.0, "acc_bn": 90.1, "acc@3bit": 80.0}
    qat = {"config": {"seed": 0, "ptq": False, "bits": 3}, "final": final}
    ptq = {"config": {"seed": 0, "ptq": True, "bits": 3}, "final": final}
    assert claims.metric(qat, "acc_before_bn") == 90.0 and claims.metric(qat, "acc") == 90.1
    assert claims.metric(ptq, "acc_before_bn") is None and claims.metric(ptq, "acc") == 80.0


TINY = [
    "dataset.image_size=8",
    "dataset.train_size=300",
    "dataset.test_size=200",
    "trainer.epochs=1",
    "trainer.finetune_epochs=1",
    "trainer.batch_size=32",
    "seed=0,1",
]


@pytest.mark.slow  # make test under 15 minutes (issue 28): a longer end-to-end run
def test_a_tiny_claims_study_runs_end_to_end_and_its_numbers_match_the_records(tmp_path):
    study = OmegaConf.to_container(OmegaConf.load(STUDY))
    study["base"] = [o for o in study["base"] if "launcher" not in o]  # in this process
    bad = ["method=lsq", "bits=2", "quantizer.init=bogus"]  # fails; the next sweep still runs
    study["sweeps"] = [bad, ["method=lsq", "bits=2"]]
    study["claims"] = [
        {
            "paper": "Nagel et al. 2022",
            "claim": "BN re-estimation",
            "a": "lsq w2a2 acc",
            "b": "lsq w2a2 acc_before_bn",
            "expect": "higher",
            "margin": 0.5,
        },
        {
            "paper": "Wenshoj et al. 2025",
            "claim": "QAT beats rounding FP",
            "a": "lsq w2a2 acc",
            "b": "fp fp32 acc@2bit",
            "expect": "higher",
            "margin": 0.5,
        },
        {
            "paper": "AOQ",
            "claim": "not run",
            "a": "aoq w2a2 acc",
            "b": "lsq w2a2 acc",
            "expect": "higher",
            "margin": 0.5,
        },
    ]
    path = tmp_path / "study.yaml"
    path.write_text(OmegaConf.to_yaml(study))
    sweep_dir, out = tmp_path / "runs", tmp_path / "out"
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "-m",
        "oscbench.claims",
        str(path),
        "--sweep-dir",
        str(sweep_dir),
        "--out",
        str(out),
        *TINY,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the tables written, the failure named
    assert f"the sweep {' '.join(bad)} failed; going on" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        f"1 sweep(s) had failed runs (their records in {sweep_dir} say why): {' '.join(bad)}"
    )
    recs = [json.loads(p.read_text()) for p in sweep_dir.rglob("results.json")]
    assert sorted((r["method"], r["config"]["seed"]) for r in recs) == sorted(
        (m, s) for m in ("fp", "lsq") for s in (0, 1)
    )
    table = pd.read_csv(out / "claims.csv")
    bn = table[table["claim"] == "BN re-estimation"].iloc[0]
    lsq = sorted((r for r in recs if r["method"] == "lsq"), key=lambda r: r["config"]["seed"])
    gain = [r["final"]["acc_bn"] - r["final"]["acc"] for r in lsq]
    assert np.isclose(bn["diff"], np.mean(gain), rtol=0, atol=1e-9)
    assert np.isclose(
        bn["p"],
        stats.ttest_rel(
            [r["final"]["acc_bn"] for r in lsq],
            [r["final"]["acc"] for r in lsq],
            alternative="greater",
        ).pvalue,
        equal_nan=True,
    )
    fp = sorted((r for r in recs if r["method"] == "fp"), key=lambda r: r["config"]["seed"])
    versus = table[table["claim"] == "QAT beats rounding FP"].iloc[0]
    assert versus["test"] == "paired t"  # each lsq run starts from its seed's fp run
    expected = np.mean([r["final"]["acc_bn"] for r in lsq]) - np.mean(
        [r["final"]["acc@2bit"] for r in fp]
    )
    assert np.isclose(versus["diff"], expected, rtol=0, atol=1e-9)
    assert set(table["verdict"]) <= {*claims.VERDICTS, claims.FAILED, claims.NOT_RUN}
    assert table.loc[table["claim"] == "not run", "verdict"].item() == claims.NOT_RUN
    text = (out / "claims.md").read_text()
    assert (
        "no runs of aoq W2A2" in text and "| lsq W2A2 | 2 |" in text and "| fp FP32 | 2 |" in text
    )
    for figure in (
        "bn_reestimation.png",
        "oscillation_by_layer.png",
        "oscillation_over_training.png",
    ):
        assert (out / figure).stat().st_size > 0
    loaded = frame.load_records(sweep_dir)
    assert set(claims.cells(loaded)) == {("fp", "fp32"), ("lsq", "w2a2")}
    other = next(r for r in loaded if r["method"] == "lsq" and r["config"]["seed"] == 1)
    lr = other["config"]["trainer"]["lr"]
    other["config"]["trainer"]["lr"] = 2 * lr  # one seed's run differs in more than the seed
    by_cell = claims.cells(loaded)
    side = claims.Side.parse("lsq w2a2 acc")
    with pytest.raises(
        claims.ConfigError, match=r"lsq w2a2 differ in more than the seed \(trainer.lr\)"
    ):
        claims.pick(side, by_cell)
    named = claims.Side.parse(f"lsq w2a2 acc [trainer.lr={2 * lr}]")  # a cell of its own
    assert claims.pick(named, by_cell) == [other]
    assert claims.pick(claims.Side.parse("lsq w2a2 acc [recipe=nagel2022]"), by_cell) is None
    # `make report` on the same runs
    report.main([str(sweep_dir), "--out", str(tmp_path / "report")])
    assert "| lsq |" in (tmp_path / "report" / "table.md").read_text()


def test_a_missing_study_file_is_named_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oscbench.claims", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        proc.returncode == 2 and "no study file" in proc.stderr and "Traceback" not in proc.stderr
    )


CLAIM = "{paper: p, claim: c, a: lsq w2a2 acc, b: lsq w2a2 acc, expect: higher, margin: 0.5}"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("claims: [", "is damaged (not YAML"),
        ("- 1", "holds a list, not a study"),
        ("sweeps: [method=lsq]\nclaims: []", "sweeps is a list of lists of overrides"),
        ("sweeps: [[method=lsq]]", "claims is a list of claims"),
        (
            f"sweeps: [[method=lsq]]\nclaims: [{CLAIM.replace(', margin: 0.5', '')}]",
            "without margin",
        ),
        (f"sweeps: [[method=lsq]]\nclaims: [{CLAIM.replace('0.5', 'half')}]", "margin is a number"),
        (
            f"sweeps: [[method=lsq]]\nclaims: [{CLAIM.replace('w2a2 acc,', 'w2a2,', 1)}]",
            "bits metric",
        ),
    ],
)
def test_a_bad_study_file_is_named_with_the_fix_before_any_run(tmp_path, capsys, text, says):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as end:
        study.main([str(path), "--sweep-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert end.value.code == 2 and says in err and str(path) in err, err
    assert not (tmp_path / "runs").exists()  # no sweep ran


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("lsq w2a2", "method bits metric"),
        ("lsq w2a2 acc x", "method bits metric"),
        ("lsq w2a2 acc [recipe]", "method bits metric"),
        ("lsq w2a2 acc [recipe=x", "method bits metric"),
        ("lsq w2a2 accuracy", "the metric is one of acc, "),
    ],
)
def test_a_malformed_side_names_the_form(bad, says):
    with pytest.raises(claims.ConfigError, match=says):
        claims.Side.parse(bad)
    claims.Side.parse("lsq w2a2 crossings@epoch3")  # a metric of the forms with N
    side = claims.Side.parse("lsq_qema w2a2 acc [quantizer.decay=0.864, recipe=common]")
    assert side.where == (("quantizer.decay", "0.864"), ("recipe", "common"))
    assert side.cell == "lsq_qema W2A2 [quantizer.decay=0.864, recipe=common]"


def test_constants_counted_in_steps_are_scaled_to_the_run_by_one_rule():
    """The study's `scaled` section: T is a fine-tuning run's steps, and each scaled sweep
    sets c_ref x T / T_ref (an EMA's time constant likewise), as the README states."""
    from tests.conftest import build_config

    study = OmegaConf.to_container(OmegaConf.load(STUDY))
    scaled = study["scaled"]
    spec, built = build_config(["experiment=claims", "method=lsq", "bits=2", "init_from=null"])
    t = spec.trainer
    assert scaled["steps"] == built.data.steps_per_epoch(t.batch_size) * t.finetune_epochs
    expected = {}
    for key, c in scaled["constants"].items():
        share = scaled["steps"] / c["reference_steps"]
        if c.get("ema"):
            expected[key] = 1 - 1 / (share / (1 - c["reference"]))
        else:
            expected[key] = max(round(c["reference"] * share), 2 if "period" in key else 0)
    seen = set()
    for sweep in study["sweeps"]:
        for o in sweep:
            key, _, value = o.partition("=")
            if key in expected:
                assert abs(float(value) - expected[key]) <= 5e-5, (key, value, expected[key])
                seen.add(key)
    assert seen == set(expected)  # every scaled constant is swept


def test_each_recipe_sweep_fine_tunes_at_its_recipes_rate():
    """experiment=claims sets the common recipe's rates, which would override a recipe's:
    the study's recipe sweeps put their recipe's own back, and everything else the recipe
    sets applies as it is."""
    study = OmegaConf.to_container(OmegaConf.load(STUDY))
    base = [o for o in study["base"] if "launcher" not in o]
    recipes = 0
    for sweep in study["sweeps"]:
        for run in _configurations(sweep):
            spec = validate(compose([*base, *run]))
            if spec.recipe == "common":
                assert (spec.trainer.lr, spec.trainer.finetune_lr) == (0.2, 0.05)
                continue
            recipes += 1
            own = OmegaConf.load(ROOT / "conf" / "recipe" / f"{spec.recipe}.yaml")["trainer"]
            assert spec.trainer.finetune_lr == own["lr"], run
            for key, value in own.items():
                if key not in ("lr", "finetune_lr"):
                    assert getattr(spec.trainer, key) == value, (run, key)
    assert recipes == 5


def test_the_bn_figures_cells_are_named_without_settings_a_cell_leaves_null():
    """An unfolded cell (bn_fold absent: None) beside a folded one: the first is named by
    method and bits alone, the second by what it sets."""
    plain = claims.Cell({}, [{}])
    folded = claims.Cell({"bn_fold.enabled": True, "bn_fold.freeze_epoch": None}, [{}])
    names = [name for name, _ in study.labelled({("lsq", "w4a4"): [plain, folded]})]
    assert names == ["lsq\nw4a4", "lsq\nw4a4\nenabled=True"]
