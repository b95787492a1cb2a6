"""A completed run's integer model (`export=true`, `python -m oscbench.export RUN_DIR`):
rebuilt from its record, written as `model.onnx` next to it, its parity measured in
onnxruntime on the run's test split and written into the record's `export` block
(`oscbench.deploy`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from oscbench.data.base import Data, build_data
from oscbench.deploy.onnx import ONNX_FILE, OPSET, Deployed, deployed, logits_only, to_onnx
from oscbench.deploy.parity import accuracy, parity, weight_codes_equal
from oscbench.launch.build import quantize
from oscbench.launch.compose import CONF_DIR, compose
from oscbench.launch.config import RunSpec, resolved, validate
from oscbench.launch.naming import result_key
from oscbench.models.base import build_model
from oscbench.quant.base import NotDeployable
from oscbench.records.checkpoint import FINAL_MODEL
from oscbench.records.files import DamagedFile, write_atomic, write_json_atomic
from oscbench.records.record import load_results
from oscbench.records.runs import RESULTS
from oscbench.registry import ConfigError
from oscbench.training.evaluation import reestimate_bn, with_weight_bits


def choices(config: dict) -> list[str]:
    """The overrides that choose a record's components where conf/ has them (its model,
    data, recipe, quantizers and policies)."""
    out = []
    for group in ("model", "dataset", "recipe", "quantizer", "act_quantizer"):
        name = (config.get(group) or {}).get("name")
        if name and (Path(CONF_DIR) / group / f"{name}.yaml").exists():
            out.append(f"{group}={name}")
    policies = [
        n for n in config.get("policy") or {} if (Path(CONF_DIR) / "policy" / f"{n}.yaml").exists()
    ]
    return [*out, f"policy=[{','.join(policies)}]"]


def rebuild(run_dir: Path) -> tuple[RunSpec, Data, nn.Module, dict]:
    """A completed run's spec, data (on the CPU) and final model, and its record."""
    record = load_results(run_dir)
    if record.get("status") != "completed":
        raise ConfigError(
            f"{run_dir / RESULTS} is a run that has not completed (status "
            f"{record.get('status')}); run the same command again to finish it, then export"
        )
    final_model = run_dir / FINAL_MODEL
    if not final_model.exists():
        raise ConfigError(f"{final_model} is missing: the run's final weights are not there")
    config = {k: v for k, v in record["config"].items() if k != "fp_run"}
    # keys newer than the record (export, bn_fold, a quantizer's new option) at their
    # defaults for the components it chose, which leave a run as it was before they existed
    # (its key is unchanged: oscbench.records.runs.fingerprint)
    config = OmegaConf.merge(resolved(compose(choices(config))), config)
    spec = validate(OmegaConf.merge(config, {"device": "cpu"}))
    device = torch.device("cpu")
    data = build_data(spec.dataset, seed=spec.seed, device=device)
    model = build_model(spec.model, data.num_classes, data.in_channels, data.image_size)
    if spec.quantized:
        quantize(spec, model, data)
    try:
        state = torch.load(final_model, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch raises several kinds for a damaged file)
        raise DamagedFile(f"{final_model} is damaged ({e}); train the run again") from None
    model.load_state_dict(state)
    return spec, data, model.eval(), record


def rounded(spec: RunSpec, data: Data, model: nn.Module) -> nn.Module:
    """A PTQ run's model as its result (`acc@{bits}bit`) evaluates it: the weights rounded
    to nearest at `bits` (first and last layer as the run's plan sets them), the inputs in
    full precision, BN statistics re-estimated on the same training batches."""
    q = with_weight_bits(model, spec.bits, spec.plan)
    reestimate_bn(q, data, spec.trainer.bn_reestimate_batches, spec.trainer.batch_size)
    return q.eval()


def off_level(twin: nn.Module) -> dict:
    """The weights whose level in the integer model is not the simulated weight exactly
    (uneven levels only: PARQ's LSBQ greedy sums, an ulp or so off their level)."""
    layers = [m for m in twin.modules() if isinstance(m, Deployed)]
    return {
        "off_level": sum(m.off_level for m in layers),
        "max_off_level": max((m.max_off_level for m in layers), default=0.0),
    }


def export_run(run_dir: Path, batch_size: int | None = None) -> dict:
    """Export the run in `run_dir` to `model.onnx`, measure its parity and write the
    record's `export` block (also when the export is refused: its reason); returns it."""
    import onnxruntime

    spec, data, model, record = rebuild(Path(run_dir))
    batch_size = batch_size or spec.trainer.eval_batch_size
    block: dict = {"opset": OPSET, "onnxruntime": onnxruntime.__version__}
    try:
        if spec.ptq:
            model = rounded(spec, data, model)
        elif not spec.quantized:
            raise NotDeployable(
                "a full-precision run has no integer model; export a quantized run, or a "
                "PTQ one (ptq=true: its weights rounded to `bits` after training)"
            )
        start = time.perf_counter()
        twin = deployed(model)
        example = next(data.eval_batches("test", min(batch_size, 2)))[0]
        probe = to_onnx(twin, example)
        onnx_model = logits_only(probe)
        write_atomic(run_dir / ONNX_FILE, lambda f: f.write(onnx_model))
        block["file"] = ONNX_FILE
        block["seconds_export"] = time.perf_counter() - start
        layers, equal = weight_codes_equal(model, onnx_model)
        if not equal:
            raise RuntimeError(f"{run_dir / ONNX_FILE}: weight codes differ from the quantizers'")
        block["weights"] = {"quantized_layers": layers, "codes_equal": equal} | off_level(twin)
        start = time.perf_counter()
        block |= parity(model, probe, data.eval_batches("test", batch_size))
        block["optimized"] = {"acc": accuracy(onnx_model, data.eval_batches("test", batch_size))}
        block["seconds_parity"] = time.perf_counter() - start
        key = result_key(spec.ptq, spec.bits)
        key = key if key in record["final"] else "acc"  # no BN re-estimation
        recorded = round(record["final"][key] * block["test_images"] / 100)
        block["images_vs_record"] = {"record": key, "difference": block["correct"] - recorded}
    except NotDeployable as e:
        block["refused"] = str(e)
    record["export"] = block
    write_json_atomic(run_dir / RESULTS, record)
    return block


def summary(block: dict) -> str:
    if "refused" in block:
        return f"export refused: {block['refused']}"
    codes, logits = block["input_codes"], block["logits"]
    lines = [
        f"exported   {block['file']} ({block['seconds_export']:.1f} s; onnxruntime "
        f"{block['onnxruntime']}, opset {block['opset']})",
        f"weights    {block['weights']['quantized_layers']} quantized layers, integer codes "
        + ("equal to oscbench's" if block["weights"]["codes_equal"] else "DIFFER")
        + _off_level(block["weights"]),
        f"accuracy   {block['acc']:.2f} % on {block['test_images']:,} test images "
        f"({block['images_vs_record']['difference']:+d} images against the record's "
        f"{block['images_vs_record']['record']}); onnxruntime optimized: "
        f"{block['optimized']['acc']:.2f} %",
        f"codes      {codes['differ']:,} of {codes['compared']:,} quantized inputs differ "
        f"(by at most {codes['max_difference']}; {codes['images_with_a_difference']:,} images)"
        if codes["compared"]
        else "codes      inputs in full precision (the weights only are integers)",
        f"logits     max |difference| {logits['max_abs_difference']:.3g}"
        + (
            f", {logits['images_over_bound']} images over the bound "
            f"(at most {logits['max_share_of_bound']:.2g} of it)"
            if logits["bound"]
            else ""
        ),
    ]
    return "\n".join(lines)


def _off_level(weights: dict) -> str:
    n = weights.get("off_level", 0)  # records exported before tables of levels have none
    if not n:
        return ""
    return (
        f"; {n:,} simulated weights lie off their level by at most "
        f"{weights['max_off_level']:.2g} (the integer model has the level)"
    )
