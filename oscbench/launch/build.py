"""A run's parts from its spec: data, model (quantized, calibrated, BN folded), tracker,
policies, objective and EMA copy, everything before the first optimizer step; and what the
run measures besides training (`extra_metrics`, `measurements`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from oscbench.data.base import Data, build_data
from oscbench.distributed import World, from_env
from oscbench.launch.config import RunSpec
from oscbench.models.base import build_model
from oscbench.models.pretrained import load_weights
from oscbench.oscillation.policy import Policy, RunContext, build_policies
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.quant.fold import conv_bn_pairs, fold_batchnorm
from oscbench.quant.modules import calibrate, quantize_model, quantizer_factory
from oscbench.quant.qkr import apply_qkr, has_attention, has_window_attention
from oscbench.records.console import warn
from oscbench.registry import ConfigError
from oscbench.training.accel import compile_refused, deterministic_cpu
from oscbench.training.batchnorm import FreezeBNStats, global_batch_norm
from oscbench.training.distill import Objective, build_teacher, kl_to_teacher
from oscbench.training.evaluation import (
    evaluate,
    final_splits,
    ptq_accuracy,
    reestimate_bn,
)
from oscbench.training.hessian import layer_traces
from oscbench.training.loop import schedule

if TYPE_CHECKING:
    from oscbench.training.ema import ModelEma


def pick_device(name: str) -> torch.device:
    """The device `name` asks for; on several processes, CUDA means the rank's local GPU."""
    world = from_env()
    if name in ("auto", "cuda") and torch.cuda.is_available() and world.active:
        return torch.device("cuda", world.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} but CUDA is not available here; use device=cpu or device=auto"
        )
    return torch.device(name)


@dataclass
class Built:
    """A run's parts, ready to train."""

    data: Data
    model: nn.Module
    tracker: OscillationTracker | None
    policies: list[Policy]
    init: dict | None  # what init_from loaded, and the accuracy before quantization
    objective: Objective  # cross-entropy (label smoothing), and distillation from a teacher
    ema: ModelEma | None  # the EMA copy of the model (trainer.ema_decay)


def build(spec: RunSpec) -> Built:
    """Seed, load data, build the model, quantize and calibrate it, build the tracker and
    the policies: everything before the first optimizer step."""
    device = pick_device(spec.device)
    refused = compile_refused(device) if spec.trainer.compile else None
    if refused:
        raise ConfigError(refused)
    torch.manual_seed(spec.seed)
    if device.type == "cpu":
        deterministic_cpu(compiled=spec.trainer.compile)
    world = from_env()
    data = dataclasses.replace(build_data(spec.dataset, seed=spec.seed, device=device), world=world)

    def architecture() -> nn.Module:
        return build_model(spec.model, data.num_classes, data.in_channels, data.image_size)

    model = architecture().to(device)
    if spec.trainer.sync_bn and world.active:
        model = global_batch_norm(model, device)
    teacher = None
    if spec.teacher is not None:
        teacher = build_teacher(
            spec.distill,
            Path(spec.teacher),
            architecture,
            data.num_classes,
            data.in_channels,
            device,
        )
        if spec.distill.loss == "soft+hard" and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # DeiT's distillation head learns from the teacher
    init = None
    if spec.init_from:
        init = load_weights(model, Path(spec.init_from), strict=spec.init_strict)
        for split, prefix in final_splits(data, spec.trainer).items():
            init[f"{prefix}acc"] = evaluate(model, data, split, spec.trainer.eval_batch_size)["acc"]
    steps = schedule(data, spec.trainer)
    tracker = None
    if spec.quantized:
        quantize(spec, model, data)
        tracker = OscillationTracker(model, spec.oscillation, steps.main)
        if init is not None:
            init |= ptq_accuracy(model, data, spec.trainer)
    run = RunContext(
        model, tracker, spec.bits, steps, spec.trainer.optimizer, spec.trainer.batch_size
    )
    policies = build_policies(spec.policies, run)
    if spec.bn_fold.enabled and spec.bn_fold.freeze_epoch is not None:
        policies.append(FreezeBNStats(model, spec.bn_fold.freeze_epoch))
    objective = Objective(spec.distill, spec.trainer.label_smoothing, teacher)
    ema = None
    if spec.trainer.ema_decay is not None:
        from oscbench.training.ema import build_ema  # timm: imported only where it is used

        ema = build_ema(model, spec.trainer)
    return Built(data, model, tracker, policies, init, objective, ema)


def quantize(spec: RunSpec, model: nn.Module, data: Data) -> None:
    """Quantize `model` as `spec` asks: OFQ's QKR where asked, the quantized layers (with
    `bn_fold`, each BatchNorm after a quantized conv folded into it), and the input
    quantizers calibrated on the global first training batch (the same on every rank)."""
    plan = spec.plan
    weight_q, act_q = quantizer_factory(spec.quantizer), quantizer_factory(spec.act_quantizer)
    if spec.qkr != "never" and has_window_attention(model):
        note = (
            f"qkr={spec.qkr}: model={spec.model.name} has Swin's window attention, which "
            "oscbench's QKR (OFQ's, for global attention as in DeiT) does not reparameterise"
        )
        if spec.qkr == "always":
            raise ConfigError(f"{note}; use qkr=never (or qkr=auto, which leaves it as is)")
        warn(f"{note}: its attention stays as it is")
    if spec.qkr != "never":
        if has_attention(model):
            apply_qkr(model, spec.bits, spec.act_bits, act_q)
        elif spec.qkr == "always":
            raise ConfigError(
                f"qkr=always reparameterises attention, but model={spec.model.name} has none; "
                "use an attention model (model=deit_tiny, model=deit_small) or qkr=never"
            )
    whole = dataclasses.replace(data, world=World())  # every rank: the global first batch
    batch = next(whole.train_batches(epoch=0, batch_size=spec.trainer.batch_size))[0]
    pairs = conv_bn_pairs(model, batch[:2]) if spec.bn_fold.enabled else []
    quantize_model(model, weight_q, act_q, plan)
    fold_batchnorm(model, pairs)
    calibrate(model, batch)


def extra_metrics(spec: RunSpec, built: Built) -> dict:
    """The EMA copy's accuracy after BN re-estimation (`ema_acc_bn` on test, `ema_val_acc_bn`
    on validation), and the student's mean KL divergence from the teacher
    (`kl_to_teacher`, `val_kl_to_teacher`), on each of the run's final splits."""
    out = {}
    cfg, data = spec.trainer, built.data
    splits = final_splits(data, cfg)
    if built.ema is not None:
        reestimate_bn(built.ema.module, data, cfg.bn_reestimate_batches, cfg.batch_size)
        for split, prefix in splits.items():
            out[f"ema_{prefix}acc_bn"] = evaluate(
                built.ema.module, data, split, cfg.eval_batch_size
            )["acc"]
    if built.objective.distills:
        out["teacher"] = spec.teacher
        for split, prefix in splits.items():
            batches = data.eval_batches(split, cfg.eval_batch_size)
            out[f"{prefix}kl_to_teacher"] = kl_to_teacher(built.model, built.objective, batches)
    return out


def measurements(spec: RunSpec, built: Built) -> Callable[[int], dict] | None:
    """The epoch measurements `probe:` asks for: each quantized layer's Hessian trace after
    the epochs `probe.hessian_epochs` names (`hessian_trace`, and its seconds)."""
    cfg = spec.probe
    if not cfg.hessian_epochs or not spec.quantized:
        return None

    def measure(epoch: int) -> dict:
        if epoch not in cfg.hessian_epochs:
            return {}
        start = time.time()
        traces = layer_traces(built.model, built.data, cfg, spec.trainer.batch_size)
        return {"hessian_trace": traces, "hessian_s": time.time() - start}

    return measure
