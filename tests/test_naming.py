"""Run directory names: what identifies a run, short, and true to what ran."""

from oscbench.launch.compose import compose
from oscbench.launch.execute import fp_counterpart
from oscbench.launch.naming import run_dir_name


def _name(overrides: list[str]) -> str:
    return run_dir_name(compose(overrides, hydra_node=True))


def test_a_path_given_to_teacher_or_init_from_is_shortened_to_its_last_part():
    deep = "/scratch/some/long/shared/project/path/multirun/claims/fp/fp32-cnn_small-digits-s0"
    name = _name(["method=lsq", f"teacher={deep}", "distill.loss=soft", f"init_from={deep}/"])
    assert name.startswith("lsq/w4a4-cnn_small-digits-s0-distill.loss:soft+init_from:fp32-")
    assert "/" not in name.split("/", 1)[1]  # one directory below the method's
    assert name.endswith("+teacher:fp32-cnn_small-digits-s0~" + name.rsplit("~", 1)[1])
    other = _name(["method=lsq", f"teacher={deep}x", "distill.loss=soft", f"init_from={deep}/"])
    assert other != name  # another path, another name (a hash of the whole path)


def test_settings_that_cannot_change_results_do_not_name_a_run():
    plain = _name(["method=lsq"])
    assert _name(["method=lsq", "trainer.dist_timeout_s=30", "trainer.check_sync=true"]) == plain


def test_the_fp_run_a_run_depends_on_is_named_by_what_it_is():
    """No distillation or fine-tuning settings (an FP run ignores them), and the recipe it
    ran, not `paper`."""
    _, config, name = fp_counterpart(
        [
            "method=aoq",
            "bits=2",
            "recipe=paper",
            "teacher=fp",
            "distill.loss=soft",
            "trainer.finetune_lr=0.01",
            "trainer.finetune_epochs=7",
            "trainer.lr=0.1",
        ]
    )
    assert config["recipe"]["name"] == "common" and config["teacher"] is None
    assert name == "fp/fp32-cnn_small-digits-s0-recipe:common+trainer.lr:0.1"
    _, config, name = fp_counterpart(["method=osc_reg", "bits=3", "recipe=wenshoj2025"])
    assert name == "fp/fp32-cnn_small-digits-s0-recipe:wenshoj2025"
    _, config, name = fp_counterpart(["method=lsq", "bits=3", "recipe=nagel2022"])
    assert name == "fp/fp32-cnn_small-digits-s0"  # a pretrained model: the common recipe's
    folded = ["method=lsq", "bits=2", "bn_fold.enabled=true", "bn_fold.freeze_epoch=3"]
    spec, config, name = fp_counterpart(folded)  # FP refuses folding: the plain fp run
    assert not spec.bn_fold.enabled and name == "fp/fp32-cnn_small-digits-s0"
