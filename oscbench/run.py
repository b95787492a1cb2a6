"""`python -m oscbench.run [overrides]`: compose -> validate -> build -> execute."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn

from oscbench import interrupt
from oscbench.accel import compile_refused, deterministic_cpu
from oscbench.batchnorm import global_batch_norm
from oscbench.checkpoint import CHECKPOINT, FINAL_MODEL, load_for_resume, save_atomic
from oscbench.compose import (
    CONF_DIR,
    compose,
    method_free,
    presets,
    resolve_recipe,
    without_recipe,
)
from oscbench.config import RunSpec, resolved, validate
from oscbench.console import ClosedSafe, epoch_line, say, warn
from oscbench.data.base import Data, build_data
from oscbench.distill import Objective, build_teacher, kl_to_teacher
from oscbench.distributed import World, broadcast, from_env, start
from oscbench.evaluation import (
    evaluate,
    final_metrics,
    final_splits,
    gap_recovered,
    ptq_accuracy,
    reestimate_bn,
    split_record,
)
from oscbench.gpus import job_device
from oscbench.hessian import layer_traces
from oscbench.models.base import build_model
from oscbench.models.pretrained import load_weights
from oscbench.naming import result_key, run_dir_name
from oscbench.oscillation.policy import Policy, Probe, RunContext, build_policies
from oscbench.oscillation.tracker import OscillationTracker
from oscbench.preflight import reject, remove_if_unused
from oscbench.quant.fold import QConvBn2d, conv_bn_pairs, fold_batchnorm
from oscbench.quant.modules import calibrate, quantize_model, quantizer_factory
from oscbench.quant.qkr import apply_qkr, has_attention, has_window_attention
from oscbench.record import Recorder, load_results, machine, print_summary
from oscbench.registry import ConfigError
from oscbench.runs import RESULTS, find_completed, fingerprint, run_key, run_lock
from oscbench.train import schedule, train

if TYPE_CHECKING:
    from oscbench.ema import ModelEma


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


def run_name(spec: RunSpec) -> str:
    """The run's name in W&B."""
    return f"{spec.method}-{spec.bits_label}-{spec.model.name}-{spec.dataset.name}-s{spec.seed}"


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
        from oscbench.ema import build_ema  # timm: imported only where it is used

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


class FreezeBNStats(Policy):
    """`bn_fold.freeze_epoch`: from that epoch on (also when a run resumes past it), every
    folded BatchNorm uses its running statistics (`QConvBn2d.freeze_bn_stats`). Built by the
    run, not a `policy:` of the config."""

    def __init__(self, model: nn.Module, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self.layers = [m for m in model.modules() if isinstance(m, QConvBn2d)]

    def on_epoch_start(self, epoch: int, probe: Probe) -> None:
        if epoch >= self.epoch:
            for layer in self.layers:
                layer.freeze_bn_stats()


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


def fp_counterpart(overrides: list[str]) -> tuple[RunSpec, dict, str]:
    """The full-precision run a quantized run starts from with `init_from=fp`: Hydra
    composes the run's overrides that do not concern the method with `method=fp`, and the
    fp preset's own group choices (which an experiment's defaults may have overridden).
    Returns its spec, its resolved config and its run directory's name: that of a plain
    `method=fp` run with the overrides that make its identity (`recipe=paper` as the recipe
    it resolved to; no `teacher`, `distill`, `finetune_lr` or `finetune_epochs`, which an FP
    run ignores, nor `bn_fold`, which it refuses). A recipe whose paper fine-tunes a standard
    pretrained model (`recipe.fp: common`) starts from the fp run of the common recipe."""
    # nothing to fold in full precision: a folded run (bn_fold) starts from the plain fp run
    kept = [*method_free(overrides, also=("bn_fold",)), "method=fp"]
    (fp,) = [p for p in presets() if p.name == "fp"]
    cfg = compose([*kept, *fp.choices])
    if cfg.recipe.get("fp") == "common":  # a paper that fine-tunes a standard pretrained model
        kept = without_recipe(kept)
        cfg = compose([*kept, *fp.choices])
    config = resolved(cfg)
    own = fingerprint(config)
    named = []
    for o in OverridesParser.create().parse_overrides(kept):
        key = o.key_or_group
        if key == "recipe":
            named.append(f"recipe={config['recipe']['name']}")
        elif any(k == key or k.startswith(key + ".") for k in own):
            named.append(o.input_line)
    name = run_dir_name(compose(kept, hydra_node=True), named)
    return validate(cfg), config, name


def identified(config: dict, overrides: list[str]) -> dict:
    """The run's resolved config, and for a run that starts from or distils the fp run
    (`init_from=fp`, `teacher=fp`) that run's identity (`fp_run`: its recipe, and the key of
    its configuration less the seed, which is the run's own): runs whose own configs are
    alike but whose fp runs differ (`recipe=paper` against `recipe=wenshoj2025` for osc_reg:
    its fp run trains under the common recipe in the first, under Wenshoj et al.'s in the
    second) are different runs, and the seeds of one cell still differ in nothing but the
    seed."""
    if "fp" not in (config.get("init_from"), config.get("teacher")):
        return config
    _, fp_config, _ = fp_counterpart(overrides)
    key = run_key({k: v for k, v in fp_config.items() if k != "seed"})
    return config | {"fp_run": {"recipe": fp_config["recipe"]["name"], "key": key}}


def ensure_fp(overrides: list[str], root: Path, asked: str) -> Path:
    """The directory of the completed fp run below `root` that a run with these overrides
    starts from or distils (`asked`: which setting asked for it); trained first (once,
    whichever job gets there first) if there is none. On several processes rank 0 looks
    and every rank follows its answer, training the fp run together."""
    fp_spec, fp_config, name = fp_counterpart(overrides)
    key = run_key(fp_config)
    world = from_env()
    found = broadcast(find_completed(root, key) if world.main else None, world)
    if found is None:
        fp_dir = root / name
        say(f"oscbench: {asked}: no completed fp run yet; training one in {fp_dir}")
        execute(fp_spec, fp_config, fp_dir, overrides, search_root=root, fp_root=root)
        # here, or where a parallel job finished it first
        found = broadcast(find_completed(root, key) if world.main else None, world)
    return found


def execute(
    spec: RunSpec,
    config: dict,
    run_dir: Path,
    overrides: list[str],
    search_root: Path | None = None,
    fp_root: Path | None = None,
) -> dict:
    """Run one configuration end to end; returns the final metrics (also in results.json).

    With `trainer.resume=auto` a completed run of the same configuration anywhere below
    `search_root` (default: the run directory) is not trained again, and a checkpoint in the
    run directory is resumed. A lock per configuration keeps parallel jobs from training the
    same run twice. `init_from=fp` and `teacher=fp` take the fp run below `fp_root`
    (composed from `overrides`, the run's command-line overrides), trained first if needed."""
    search_root = search_root or run_dir
    config = identified(config, overrides)
    key = run_key(config)
    world = from_env()  # several processes: rank 0 locks and decides, the others follow
    with run_lock(search_root, key) if world.main else contextlib.nullcontext():
        resume = None
        if spec.trainer.resume == "auto":
            done = broadcast(find_completed(search_root, key) if world.main else None, world)
            if done is not None:
                say(
                    f"oscbench: {done} already holds this completed run "
                    "(trainer.resume=never trains it again)"
                )
                record = load_results(done)
                print_summary(spec, record, done / RESULTS)
                if "export" not in record and world.main:
                    export_if_asked(spec, done)
                return record["final"]
            resume = (
                load_for_resume(run_dir, config)
                if broadcast(world.main and (run_dir / CHECKPOINT).exists(), world)
                else None
            )
        asked = [f"{k}=fp" for k in ("init_from", "teacher") if getattr(spec, k) == "fp"]
        if asked:
            fp = str(ensure_fp(overrides, fp_root or run_dir.parent.parent, " and ".join(asked)))
            spec = dataclasses.replace(
                spec,
                init_from=fp if spec.init_from == "fp" else spec.init_from,
                teacher=fp if spec.teacher == "fp" else spec.teacher,
            )
        spec = spec.as_trained()
        not_applied = config["recipe"].get("not_applied")
        if not_applied:
            say(
                f"oscbench: under recipe={spec.recipe}, quantizer={spec.quantizer.name} and "
                f"act_quantizer={spec.act_quantizer.name} have no {', '.join(not_applied)}: "
                "not applied (the record lists them under recipe.not_applied)"
            )
        return _train_and_record(spec, config, run_dir, resume)


def _train_and_record(spec: RunSpec, config: dict, run_dir: Path, resume: dict | None) -> dict:
    built = build(spec)
    epochs = spec.trainer.epochs + spec.trainer.extra_epochs
    labels = {"method": spec.method, "bits": spec.bits_label}
    world = built.data.world
    where = machine(str(built.data.device), world.size)
    rec = Recorder(
        run_dir, config, spec.logger, labels, run_name(spec), where, resume, writes=world.main
    )
    rec.data["splits"] = split_record(built.data, spec.trainer)
    if resume is not None:
        say(f"oscbench: resuming {run_dir} after epoch {resume['epoch']} of {epochs}")
    save = None
    if spec.trainer.checkpoint and world.main:
        stamp = fingerprint(config)

        def save(state: dict) -> None:
            state |= {"fingerprint": stamp, "elapsed_s": rec.elapsed}
            save_atomic(state, run_dir / CHECKPOINT)

    last = [0.0]

    def on_epoch(record: dict) -> None:
        rec.log_epoch(record)
        now = time.time()
        say(epoch_line(record, epochs, now - last[0]))
        last[0] = now

    with rec:
        last[0] = time.time()
        history = train(
            built.model,
            built.data,
            spec.trainer,
            built.policies,
            built.tracker,
            spec.oscillation.threshold,
            on_epoch,
            resume=resume,
            save=save,
            objective=built.objective,
            ema=built.ema,
            measure=measurements(spec, built),
        )
        final = final_metrics(spec, built.model, built.data, built.tracker, history)
        final |= extra_metrics(spec, built)
        if built.init is not None:
            final["init"] = built.init
            final |= gap_recovered(final)
        if world.main:
            save_atomic(built.model.state_dict(), run_dir / FINAL_MODEL)
        final["wall_time_s"] = rec.elapsed
        rec.finish(final)
    if world.main:  # the record is complete: printing cannot change it
        print_summary(spec, rec.data, rec.path)
        export_if_asked(spec, run_dir)
    return final


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


def export_if_asked(spec: RunSpec, run_dir: Path) -> None:
    """`export=true`: the completed run to ONNX with its parity (`oscbench.export`). The
    record is complete already: an export that fails says why and leaves it as it is."""
    if not spec.export:
        return
    from oscbench.export import export_run, summary  # onnx: imported only where it is used

    try:
        say(summary(export_run(run_dir)))
    except Exception as e:  # noqa: BLE001  (the run's record must outlive any export failure)
        warn(
            f"export of {run_dir} failed ({type(e).__name__}: {e}); the record is unchanged. "
            f"python -m oscbench.export {run_dir} shows the whole error"
        )


def objective(spec: RunSpec, final: dict) -> float:
    """What a run returns to a sweeper (Optuna's): its validation accuracy after BN
    re-estimation (a PTQ method's: with the weights rounded to `bits`), never a test
    number; NaN (Optuna: a failed trial) without a validation split."""
    return float(final.get(result_key(spec.ptq, spec.bits, "val_"), float("nan")))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        cfg = resolve_recipe(cfg, overrides)
        spec = validate(cfg)
        world = from_env()
        if spec.trainer.batch_size % world.size:
            raise ConfigError(
                f"trainer.batch_size={spec.trainer.batch_size} is the global batch and must "
                f"divide among the {world.size} processes; pick a multiple of {world.size}"
            )
        start(world, pick_device(spec.device), spec.trainer.dist_timeout_s)
        config = resolved(cfg)
        own_dir = run_dir
        run_dir, sweep_dir = map(Path, broadcast((str(run_dir), str(hc.sweep.dir)), world))
        if own_dir != run_dir:  # Hydra's timestamp turned a second later here: rank 0's wins
            remove_if_unused(own_dir)
        if hc.mode == RunMode.MULTIRUN:  # one sweep: runs are shared across its jobs
            spec.logger.group = spec.logger.group or sweep_dir.name
            with job_device(spec, sweep_dir, world) as pinned:  # parallel jobs: GPU slots
                final = execute(pinned, config, run_dir, overrides, sweep_dir, sweep_dir)
                return objective(spec, final)
        return objective(spec, execute(spec, config, run_dir, overrides))
    except ConfigError as e:  # data not on disk, a damaged file: found before any training
        if hc.mode == RunMode.RUN:
            remove_if_unused(run_dir)
            reject(str(e))
        raise


def cli() -> int:
    """`python -m oscbench.run`: `main`, with SIGTERM raised as SIGINT is (an interrupted
    run's record says so), a closed stdout tolerated, and an interruption ended with one
    line and the shell's exit code for the signal."""
    interrupt.install()
    sys.stdout = ClosedSafe(sys.stdout)
    try:
        main()
    except interrupt.INTERRUPTS as e:
        sig = interrupt.signal_of(e)
        where = getattr(e, "record", None)
        said = f"; {where} says so after epoch {e.epoch}" if where else ""
        warn(f"interrupted by {sig.name}{said}; the same command resumes from the last checkpoint")
        return 128 + sig.value
    return 0


if __name__ == "__main__":
    sys.exit(cli())
