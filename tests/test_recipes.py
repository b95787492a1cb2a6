"""Recipes (conf/recipe/): each paper's, `paper` resolved to the method's own, every key a
recipe sets a key that exists, and every (method, recipe) pair it applies to trains."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from oscbench.launch.compose import CONF_DIR, compose, presets
from oscbench.launch.config import validate
from oscbench.records.record import load_results
from tests.conftest import run_config

RECIPES = sorted(p.stem for p in Path(CONF_DIR, "recipe").glob("*.yaml"))
PAPERS = [r for r in RECIPES if r not in ("common", "paper")]
QUICK = ["logger=none", "device=cpu", "trainer.epochs=2", "bits=2"]


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_a_recipe_sets_exists_without_it(recipe):
    """Compose the defaults with only the recipe's own group choices: every key the recipe
    sets must already be there, or for a quantizer be an option of one of the group's
    plugins (parq2025's LSBQ `levels`; a misspelt key would otherwise be added silently)."""
    node = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR, "recipe", f"{recipe}.yaml")))
    groups = [
        f"{k.split('/')[-1]}={v}" for entry in node.pop("defaults", []) for k, v in entry.items()
    ]
    base = compose(groups)
    for key in _leaves(node):
        group, _, option = key.partition(".")
        if group in ("quantizer", "act_quantizer"):  # an option of some plugin of the group
            plugins = Path(CONF_DIR, group).glob("*.yaml")
            assert any(option in OmegaConf.load(p) for p in plugins), (recipe, key)
        else:
            assert OmegaConf.select(base, key, default="<missing>") != "<missing>", (recipe, key)


def test_paper_is_each_methods_own_recipe_and_the_record_says_which_ran(tmp_path):
    owners = {p.name: compose([f"method={p.name}"]).method.get("paper") for p in presets()}
    owned = ("lsq_dampen", "lsq_freeze", "ofq", "aoq", "osc_reg", "parq")
    assert {owners[m] for m in owned} == set(PAPERS)
    for method, paper in owners.items():
        assert validate(compose([f"method={method}", "recipe=paper"])).recipe == (paper or "common")
    aoq = validate(compose(["method=aoq", "recipe=paper"]))
    assert aoq.act_quantizer.name == "ltq" and not aoq.act_quantizer.options.learn_start
    assert aoq.trainer.optimizer == "adam" and aoq.trainer.schedule == "linear"
    assert aoq.teacher == "fp" and aoq.distill.loss == "soft" and aoq.first_last == "fp"
    nagel = validate(compose(["method=lsq_freeze", "recipe=paper"]))
    assert nagel.trainer.quant_optimizer == "adam" and nagel.trainer.quant_lr == 1e-5
    assert nagel.quantizer.options.init == "mse" and not nagel.quantizer.options.grad_scale
    # a command-line override wins over the recipe
    assert validate(compose(["method=aoq", "recipe=paper", "trainer.lr=0.02"])).trainer.lr == 0.02


def _pairs():
    for p in presets():  # a preset without a paper runs the common recipe: tests/test_methods.py
        if compose([f"method={p.name}"]).method.get("paper"):
            yield p.name, "paper"
    for recipe in PAPERS:  # each paper's recipe with a method of another paper, where it fits
        yield "lsq", recipe


@pytest.mark.parametrize(("method", "recipe"), list(_pairs()))
def test_every_method_trains_two_epochs_under_its_recipe(method, recipe, tmp_path):
    run_dir = tmp_path / "method" / "run"  # teacher=fp, init_from=fp: the fp run below tmp_path
    final = run_config([f"method={method}", f"recipe={recipe}", *QUICK], run_dir)
    record = load_results(run_dir)
    ran = record["config"]["recipe"]["name"]
    assert ran != "paper" and (recipe == "paper" or ran == recipe)
    assert final["acc_bn"] > 0 and record["status"] == "completed"
    if record["config"]["teacher"] == "fp" and record["config"]["quantizer"]["name"] != "none":
        assert final["teacher"].startswith(str(tmp_path / "fp")) and final["kl_to_teacher"] >= 0
    if method == "osc_reg" and recipe == "paper":  # Wenshoj et al. fine-tune an FP model
        assert record["config"]["init_from"] == "fp"
        assert final["init"]["from"].startswith(str(tmp_path / "fp"))


def test_compare_methods_with_a_recipe_axis_reports_both_and_the_difference(tmp_path):
    from oscbench.analysis import frame, report
    from tests.test_sweeps import records, sweep

    args = ["experiment=compare_methods", "method=fp,aoq", "bits=2", "seed=0", "logger=none"]
    out = sweep(tmp_path, *args, "trainer.epochs=1", "recipe=common,paper").stdout
    ran = sorted(
        (r["config"]["method"]["name"], r["config"]["recipe"]["name"])
        for r in records(tmp_path).values()
    )
    assert ran == [("aoq", "aoq2025"), ("aoq", "common"), ("fp", "common")]
    assert out.count("already holds this completed run") == 1  # fp under paper: fp's common
    report.write_report(frame.load_records(tmp_path), tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| method | recipe.name | 2-bit |" in table
    assert "| aoq | aoq2025 |" in table and "| aoq | common |" in table
    assert "### Each paper's recipe against the common one" in table
    differences = table.split("### Each paper's recipe against the common one")[1]
    line = next(x for x in differences.splitlines() if x.startswith("| aoq | aoq2025 | "))
    cells = line.strip("|").split("|")[2:]
    assert len(cells) == 2 and all(c.strip()[0] in "+-" for c in cells)


def _identity(overrides: list[str]) -> tuple[str, str]:
    """A run's key and the recipe of the fp run it starts from."""
    from oscbench.launch.config import resolved
    from oscbench.launch.execute import identified
    from oscbench.records.runs import run_key

    config = identified(resolved(compose(overrides)), overrides)
    return run_key(config), config["fp_run"]["recipe"]


def test_runs_that_start_from_different_fp_runs_are_different_runs():
    """`method=osc_reg recipe=paper` composes to Wenshoj et al.'s recipe, as
    `recipe=wenshoj2025` does, but its fp run trains under fp's paper recipe (common), not
    theirs: the runs differ in what they start from, so in their identity (and a sweep over
    both trains both). A recipe whose paper fine-tunes a standard pretrained model
    (`recipe.fp: common`: AOQ's, Nagel et al.'s, OFQ's) starts from the common fp run either
    way: `recipe=paper` and the recipe's own name are one run."""
    paper = _identity(["method=osc_reg", "bits=3", "recipe=paper"])
    own = _identity(["method=osc_reg", "bits=3", "recipe=wenshoj2025"])
    assert paper[1] == "common" and own[1] == "wenshoj2025" and paper[0] != own[0]
    for method, recipe in (("aoq", "aoq2025"), ("lsq_dampen", "nagel2022"), ("ofq", "ofq2023")):
        paper = _identity([f"method={method}", "bits=2", "recipe=paper"])
        assert paper == _identity([f"method={method}", "bits=2", f"recipe={recipe}"])
        assert paper[1] == "common"
    seeds = [  # the fp run's identity, less its seed: seeds of one cell still share it
        _identity([*o, f"seed={s}"])[1:]
        for o in [["method=osc_reg", "bits=3", "recipe=wenshoj2025"]]
        for s in (0, 1)
    ]
    assert seeds[0] == seeds[1]


@pytest.mark.parametrize(
    ("method", "not_applied"),
    [("ofq", ["quantizer.init", "quantizer.grad_scale"]), ("aoq", ["quantizer.init"])],
)
def test_a_recipe_applies_what_fits_the_method_and_names_what_does_not(method, not_applied):
    """nagel2022 sets LSQ's init and gradient scale: StatsQ has neither, AOQ no init."""
    cfg = compose([f"method={method}", "recipe=nagel2022"])
    spec = validate(cfg)
    assert spec.recipe == "nagel2022" and list(cfg.recipe.not_applied) == not_applied
    assert spec.trainer.quant_optimizer == "adam" and spec.trainer.lr == 0.01  # the rest applies
    for key in not_applied:
        assert key.split(".")[1] not in cfg.quantizer


def test_a_recipe_run_says_what_it_did_not_apply(tmp_path, capsys):
    run_config(
        ["method=aoq", "recipe=nagel2022", *QUICK[:2], "trainer.epochs=1"], tmp_path / "m" / "r"
    )
    out = capsys.readouterr().out
    assert (
        "under recipe=nagel2022, quantizer=aoq and act_quantizer=lsq have no quantizer.init" in out
    )
    assert load_results(tmp_path / "m" / "r")["config"]["recipe"]["not_applied"] == [
        "quantizer.init"
    ]


def test_a_full_precision_run_records_no_fp_run_to_start_from_or_distil():
    """A recipe asks quantized runs to start from and distil the fp run; the fp run itself
    does neither, and its record says so."""
    from oscbench.launch.config import resolved

    config = resolved(compose(["method=fp", "recipe=aoq2025"]))
    assert config["init_from"] is None and config["teacher"] is None
    assert config["distill"]["loss"] == "none"
    osc_reg = resolved(compose(["method=osc_reg", "recipe=wenshoj2025"]))
    assert osc_reg["init_from"] == "fp"  # an FP run with a policy fine-tunes the fp run


def test_wenshoj_et_al_fine_tune_with_adam_at_their_notebooks_constant_rate():
    spec = validate(compose(["method=osc_reg", "recipe=wenshoj2025"]))
    t = spec.trainer
    assert (t.optimizer, t.lr, t.schedule, t.weight_decay) == ("adam", 2.5e-4, "constant", 0.0)


def test_ofq_decays_only_weights_and_embeddings_as_timms_create_optimizer():
    spec = validate(compose(["method=ofq", "recipe=paper"]))
    t = spec.trainer
    assert (t.optimizer, t.weight_decay, t.no_weight_decay) == ("adamw", 0.05, "1d")


def test_parq_trains_from_scratch_with_sgd_multistep_and_lsbq_levels_as_its_resnet20_script():
    spec = validate(compose(["method=parq", "recipe=paper"]))
    t = spec.trainer
    assert spec.recipe == "parq2025" and spec.init_from is None and spec.teacher is None
    assert (t.optimizer, t.lr, t.momentum, t.nesterov) == ("sgd", 0.1, 0.9, False)
    assert (t.weight_decay, t.no_weight_decay, t.warmup_fraction) == (2e-4, "biases", 0.0)
    assert (t.schedule, list(t.milestones), t.gamma) == ("multistep", [0.4, 0.6, 0.75], 0.1)
    assert spec.quantizer.options.levels == "lsbq" and spec.act_quantizer.name == "none"
    assert spec.first_last == "same"
    # LSQ under PARQ's recipe: all but LSBQ's levels, which LSQ has not
    lsq = compose(["method=lsq", "recipe=parq2025"])
    assert list(lsq.recipe.not_applied) == ["quantizer.levels"]
    assert validate(lsq).trainer.no_weight_decay == "biases"
