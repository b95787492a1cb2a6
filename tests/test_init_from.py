"""QAT starts from a full-precision run's weights: same accuracy before quantization, and
quantizer scales set from the loaded weights."""

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from oscbench.launch.compose import compose
from oscbench.launch.config import resolved, validate
from oscbench.launch.summary import print_summary
from oscbench.records.checkpoint import FINAL_MODEL
from oscbench.records.record import load_results
from oscbench.records.runs import RESULTS, fingerprint
from oscbench.registry import ConfigError
from tests.conftest import build_config, run_config

QUICK = ["logger=none", "device=cpu"]


def test_qat_from_an_fp_run_starts_at_its_accuracy_with_scales_from_its_weights(tmp_path):
    fp = run_config(["method=fp", "trainer.epochs=3", *QUICK], tmp_path / "fp")
    fp_state = torch.load(tmp_path / "fp" / FINAL_MODEL)

    spec, built = build_config(["method=lsq", "bits=3", f"init_from={tmp_path / 'fp'}"])
    assert built.init["acc"] == fp["acc_bn"]  # the FP run's final model, before quantization
    assert built.init["missing"] == [] and built.init["skipped"] == []
    layer = built.model[3]  # second conv: 3-bit LSQ, per tensor
    w = fp_state["3.weight"]
    assert torch.equal(layer.weight.detach(), w)
    torch.testing.assert_close(layer.weight_quantizer.s.detach(), 2 * w.abs().mean() / math.sqrt(3))

    final = run_config(
        ["method=lsq", "bits=3", "trainer.epochs=2", f"init_from={tmp_path / 'fp'}", *QUICK],
        tmp_path / "qat",
    )
    assert final["init"]["acc"] == fp["acc_bn"]
    assert load_results(tmp_path / "qat")["final"]["init"]["from"] == str(tmp_path / "fp")


def test_ptq_accuracy_is_the_quantized_start_and_qat_reports_the_gap_it_recovered(tmp_path):
    """PTQ: the FP weights on the quantizers' initial grids, BN re-estimated, evaluated on
    a copy without touching the model or the random state; the record's share of the PTQ
    gap recovered is (QAT - PTQ) / (FP - PTQ)."""
    import copy

    from oscbench.training.evaluation import evaluate, gap_recovered, ptq_accuracy, reestimate_bn

    run_config(["method=fp", "trainer.epochs=3", *QUICK], tmp_path / "fp")
    qat = ["method=lsq", "bits=2", f"init_from={tmp_path / 'fp'}"]
    spec, built = build_config(qat)
    tensors = {k: v.clone() for k, v in built.model.state_dict().items() if torch.is_tensor(v)}
    rng = torch.get_rng_state()
    assert ptq_accuracy(built.model, built.data, spec.trainer) == {
        k: built.init[k] for k in ("val_ptq_acc", "ptq_acc")
    }
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in tensors.items())
    twin = copy.deepcopy(built.model)
    cfg = spec.trainer
    reestimate_bn(twin, built.data, cfg.bn_reestimate_batches, cfg.batch_size)
    assert evaluate(twin, built.data, "test", cfg.eval_batch_size)["acc"] == built.init["ptq_acc"]

    final = run_config([*qat, "trainer.epochs=2", *QUICK], tmp_path / "qat")
    fp, ptq = final["init"]["acc"], final["init"]["ptq_acc"]
    if ptq < fp:  # on digits 1-5 of 360 images, by the CPU path: no learned bound here
        assert final["ptq_gap_recovered"] == (final["acc_bn"] - ptq) / (fp - ptq)
    else:
        assert "ptq_gap_recovered" not in final
    assert gap_recovered({"acc_bn": 90.0, "init": {"acc": 95.0, "ptq_acc": 80.0}}) == {
        "ptq_gap_recovered": 10 / 15
    }
    assert gap_recovered({"acc_bn": 90.0, "init": {"acc": 95.0, "ptq_acc": 95.0}}) == {}


def test_a_run_from_weights_trains_at_finetune_lr_and_epochs_and_an_fp_run_ignores_them(
    tmp_path, capsys
):
    """`trainer.finetune_lr` and `trainer.finetune_epochs` replace `trainer.lr` and
    `trainer.epochs` in a run that starts from weights: the same run as one at that lr and
    length, step for step, and its summary says so, also when the run is found completed;
    a run from scratch is not changed by them."""
    run_config(["method=fp", "trainer.epochs=1", *QUICK], tmp_path / "fp")
    start = ["method=lsq", "bits=3", f"init_from={tmp_path / 'fp'}", *QUICK]
    run_config([*start, "trainer.epochs=2", "trainer.lr=0.02"], tmp_path / "at_lr")
    finetune = ["trainer.epochs=5", "trainer.finetune_epochs=2", "trainer.finetune_lr=0.02"]
    run_config([*start, *finetune], tmp_path / "finetune")
    a, b = (load_results(tmp_path / d) for d in ("at_lr", "finetune"))
    assert [e["lr"] for e in b["history"]] == [e["lr"] for e in a["history"]]
    assert [e["lr"] for e in b["history"]] != [0.0] * 2
    assert b["final"]["acc_bn"] == a["final"]["acc_bn"]
    assert b["config"]["trainer"]["finetune_lr"] == 0.02  # the record says which ran
    assert b["config"]["trainer"]["finetune_epochs"] == 2
    capsys.readouterr()
    print_summary(validate(compose([*start, *finetune])), b, tmp_path / "finetune" / RESULTS)
    assert ", 2 epochs in " in capsys.readouterr().out.splitlines()[0]  # not 5 + 3 extra
    plain = fingerprint(resolved(compose(["method=fp"])))
    overrides = ["method=fp", "trainer.finetune_lr=0.02", "trainer.finetune_epochs=3"]
    assert fingerprint(resolved(compose(overrides))) == plain


def test_a_timm_weights_file_loads_and_skips_a_different_classifier(tmp_path):
    src = timm.create_model("resnet18", num_classes=1000)
    save_file(src.state_dict(), str(tmp_path / "resnet18.safetensors"))
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    for name in ("resnet18.safetensors", "resnet18.pth"):
        _, built = build_config(
            [
                "model=resnet18",
                "dataset=synthetic",
                "dataset.image_size=32",
                "dataset.train_size=4",
                "dataset.test_size=4",
                "act_quantizer=none",
                f"init_from={tmp_path / name}",
            ]
        )
        assert built.init["skipped"] == ["fc.bias", "fc.weight"]  # 1000 classes vs 10
        assert torch.equal(built.model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="fills only 0 of the model's 20 tensors"):
        build_config([f"init_from={tmp_path / 'r18.pth'}"])
    with pytest.raises(ConfigError, match="no such file"):
        build_config([f"init_from={tmp_path / 'nothing'}"])


@pytest.mark.parametrize("key", ["init_from", "teacher"])
def test_a_quantized_run_or_a_record_given_as_weights_is_named_for_what_it_is(key, tmp_path):
    """A QAT run's directory is refused as a quantized model (not as 'an OrderedDict'), and
    its results.json as a record with the directory to give instead (not with PyTorch's
    advice on unpickling)."""
    run_config(["method=lsq", "bits=2", "trainer.epochs=1", *QUICK], tmp_path / "qat")
    extra = ["distill.loss=soft"] if key == "teacher" else []
    with pytest.raises(ConfigError) as err:
        build_config([f"{key}={tmp_path / 'qat'}", *extra])
    assert f"{key}={tmp_path / 'qat' / FINAL_MODEL} holds a quantized model" in str(err.value)
    assert f"give an fp run (method=fp) or {key}=fp" in str(err.value)
    record = tmp_path / "qat" / "results.json"
    with pytest.raises(ConfigError) as err:
        build_config([f"{key}={record}", *extra])
    assert str(err.value) == (
        f"{key}={record} is a JSON file (a run's record), not weights; give "
        f"{tmp_path / 'qat'}, its run directory"
    )
