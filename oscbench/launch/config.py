"""Config schemas and `validate`, which checks a composed Hydra config before any work.

Hydra composes conf/ (the only place defaults live) and rejects unknown groups and
options; `validate` rejects unknown keys, wrong types and values out of range, with a
message that names the bad value and what is allowed, and returns typed objects. Which
quantizer, policies and bit-widths can run together is read from what each plugin
declares (`Quantizer.capabilities`, `bit_range`; `Policy.requires`): one check for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import oscbench.data
import oscbench.models
import oscbench.oscillation
import oscbench.quant  # noqa: F401  (the four packages import, and so register, their plugins)
from oscbench.data.base import DATASETS
from oscbench.launch.compose import presets
from oscbench.launch.naming import bits_label, method_label
from oscbench.models.base import MODELS
from oscbench.oscillation.policy import POLICIES
from oscbench.oscillation.tracker import TrackerConfig
from oscbench.quant.base import ACTIVATIONS, CAPABILITIES, QUANTIZERS, capabilities
from oscbench.quant.modules import QuantPlan
from oscbench.records.wandb import LoggerConfig
from oscbench.registry import ConfigError, Registry, check, parse
from oscbench.training.config import TrainerConfig
from oscbench.training.distill import DistillConfig
from oscbench.training.hessian import ProbeConfig

BITS_RANGE = range(2, 9)


@dataclass
class Component:
    """A config-group choice: its registry name and its validated options."""

    name: str
    options: Any


@dataclass
class BNFoldConfig:
    """`bn_fold`: each BatchNorm folded into the quantized conv before it (quant/fold.py)."""

    enabled: bool
    freeze_epoch: int | None  # from this epoch (0-based) on, running statistics; null: never

    def __post_init__(self) -> None:
        f = self.freeze_epoch
        check(f is None or f >= 0, "freeze_epoch", f, "an epoch >= 0, or null (never)")


@dataclass
class RunSpec:
    """Everything a run needs, typed and checked."""

    method: str  # what ran: the preset's name, or its components when they differ from it
    preset: str  # the `method=` preset the configuration started from
    bits: int
    act_bits: int
    first_last: str  # bits (at first_last_bits) | fp (full precision) | same (like the rest)
    first_last_bits: int
    seed: int
    device: str
    jobs_per_gpu: int  # a sweep's jobs that share one GPU (device=auto, several GPUs)
    model: Component
    dataset: Component
    quantizer: Component
    act_quantizer: Component
    policies: list[Component]
    trainer: TrainerConfig
    oscillation: TrackerConfig
    logger: LoggerConfig
    cross_bits: list[int]
    ptq: bool  # full-precision training, then weights rounded to nearest at `bits`: the result
    init_from: str | None
    init_strict: bool  # init_from must fill every tensor but a classifier of another shape
    qkr: str  # never | auto (for attention models) | always (refused without attention)
    recipe: str  # the training recipe that ran: common or a paper's (conf/recipe/)
    teacher: str | None  # distil from: fp (the sweep's fp run), a run dir, checkpoint, weights
    distill: DistillConfig
    export: bool  # after training: the integer model to ONNX and its parity (oscbench.export)
    bn_fold: BNFoldConfig
    probe: ProbeConfig  # measurements that leave training as it is (the Hessian traces)

    @property
    def plan(self) -> QuantPlan:
        """The bit-widths of the quantized model, its first and last layer's included."""
        same = self.first_last == "same"
        fp = self.first_last == "fp"
        return QuantPlan(self.bits, self.act_bits, None if same else self.first_last_bits, fp)

    @property
    def quantized(self) -> bool:
        return self.quantizer.name != "none"

    @property
    def bits_label(self) -> str:
        q, aq = self.quantizer.name, self.act_quantizer.name
        return bits_label(self.bits, self.act_bits, q, aq, self.ptq)

    def as_trained(self) -> RunSpec:
        """The spec with the schedule it trains: a run that starts from another's weights
        (`init_from`) trains `trainer.finetune_epochs` at `trainer.finetune_lr`, where set."""
        t = self.trainer
        if self.init_from is None:
            return self
        lr, epochs = t.finetune_lr or t.lr, t.finetune_epochs or t.epochs
        return dataclasses.replace(self, trainer=dataclasses.replace(t, lr=lr, epochs=epochs))


# top-level keys of the composed config that the spec does not hold: where datasets live
# (their configs interpolate it) and the tuning experiments' settings (tune.trials, tune.dir)
CONFIG_ONLY = ("data_dir", "tune")


def _component(registry: Registry, node: Any, path: str) -> Component:
    if not isinstance(node, (dict, DictConfig)) or "name" not in node:
        raise ConfigError(f"{path}: expected a config with a 'name'; choose with {path}=NAME")
    if node["name"] == "none" and path in ("quantizer", "act_quantizer"):
        return Component("none", None)  # a recipe's quantizer settings: not for FP layers
    return Component(node["name"], registry.parse(node, path))


def _bits(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    check(
        isinstance(value, int) and value in BITS_RANGE,
        key,
        value,
        f"an integer {BITS_RANGE.start}..{BITS_RANGE.stop - 1}",
    )
    return value


def validate(cfg: DictConfig) -> RunSpec:
    """Check a composed config; raise ConfigError naming the bad value and the fix."""
    top = {f.name for f in fields(RunSpec)} - {"policies", "preset"} | {"policy", *CONFIG_ONLY}
    unknown = sorted(set(cfg.keys()) - top)
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(top))}"
        )
    check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    device = str(cfg.device)
    check(
        device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
        "device",
        device,
        "auto, cpu, cuda, cuda:N",
    )
    policy_node = cfg.get("policy") or {}  # policy=[] leaves no node at all
    for key in ("ptq", "init_strict", "export"):
        check(isinstance(cfg[key], bool), key, cfg[key], "true, false")
    method = cfg.method
    for key in ("name", "quantizer", "policies", "ptq"):
        if key not in method:
            raise ConfigError(
                f"method.{key} is missing: a preset in conf/method/ declares its name, "
                "quantizer, policies, ptq and order (see conf/method/lsq.yaml)"
            )
    spec = RunSpec(
        method=method_label(method, cfg.quantizer.name, list(policy_node), cfg.ptq),
        preset=str(method.name),
        bits=_bits(cfg, "bits"),
        act_bits=_bits(cfg, "act_bits"),
        first_last=str(cfg.first_last),
        first_last_bits=_bits(cfg, "first_last_bits"),
        seed=cfg.seed,
        device=device,
        jobs_per_gpu=cfg.jobs_per_gpu,
        model=_component(MODELS, cfg.model, "model"),
        dataset=_component(DATASETS, cfg.dataset, "dataset"),
        quantizer=_component(QUANTIZERS, cfg.quantizer, "quantizer"),
        act_quantizer=_component(QUANTIZERS, cfg.act_quantizer, "act_quantizer"),
        policies=[
            _component(POLICIES, {"name": name, **dict(opts or {})}, f"policy.{name}")
            for name, opts in policy_node.items()
        ],
        trainer=parse(TrainerConfig, cfg.trainer, "trainer"),
        oscillation=parse(TrackerConfig, cfg.oscillation, "oscillation"),
        logger=parse(LoggerConfig, cfg.logger, "logger"),
        cross_bits=_cross_bits(cfg.cross_bits),
        ptq=cfg.ptq,
        init_from=None if cfg.init_from is None else str(cfg.init_from),
        init_strict=cfg.init_strict,
        qkr=str(cfg.qkr),
        recipe=str(cfg.recipe.name),
        teacher=None if cfg.teacher is None else str(cfg.teacher),
        distill=parse(DistillConfig, cfg.distill, "distill"),
        export=cfg.export,
        bn_fold=parse(BNFoldConfig, cfg.bn_fold, "bn_fold"),
        probe=parse(ProbeConfig, cfg.probe, "probe"),
    )
    check(spec.qkr in ("never", "auto", "always"), "qkr", spec.qkr, "never, auto, always")
    jobs = spec.jobs_per_gpu
    check(isinstance(jobs, int) and jobs >= 1, "jobs_per_gpu", jobs, "an integer >= 1")
    ends = ("bits", "fp", "same")
    check(spec.first_last in ends, "first_last", spec.first_last, ", ".join(ends))
    if (spec.teacher is None) != (spec.distill.loss == "none"):
        raise ConfigError(
            f"teacher={spec.teacher} with distill.loss={spec.distill.loss}: distillation needs "
            "both; set teacher=fp (or a run directory, checkpoint or weights file) and "
            "distill.loss=soft or soft+hard, or teacher=null and distill.loss=none"
        )
    if spec.trainer.test == "never" and spec.dataset.options.val_fraction == 0:
        raise ConfigError(
            "trainer.test=never with dataset.val_fraction=0 leaves no split to evaluate; "
            "hold out a validation split (dataset.val_fraction=0.1) or use trainer.test=end"
        )
    check_combination(spec)
    return spec


def _cross_bits(value: Any) -> list[int]:
    """A list of bit-widths; a single one (`cross_bits=3`) is taken as [3]."""
    values = [value] if isinstance(value, int) else value
    check(
        value is None or isinstance(values, (list, ListConfig)),
        "cross_bits",
        value,
        "a list of integers 2..8, e.g. cross_bits=[2,3,4,8]",
    )
    for b in values or []:
        check(
            isinstance(b, int) and b in BITS_RANGE, "cross_bits", b, "integers 2..8, e.g. [2,3,4,8]"
        )
    return list(values or [])


def _options(key: str, names: list[str]) -> str:
    return " or ".join(f"{key}={n}" for n in names)


def check_combination(spec: RunSpec) -> None:
    """Reject quantizer/policy/bit combinations that cannot run, saying what was asked, why
    it cannot run and what would, from the plugins' declarations."""
    q = spec.quantizer.name
    caps = capabilities(q)
    for policy in spec.policies:
        required = POLICIES.get(policy.name).declares("requires", frozenset())
        missing = [c for c in CAPABILITIES if c in required - caps]  # the most basic first
        if missing:
            need, lack = CAPABILITIES[missing[0]]
            fits = [n for n in QUANTIZERS.names() if set(missing) <= capabilities(n)]
            with_it = [p.name for p in presets() if policy.name in p.policies]
            fix = _options("quantizer", fits)
            if with_it:
                fix += f", or a preset such as {_options('method', with_it)}"
            raise ConfigError(f"policy={policy.name} {need}, but quantizer={q} {lack}; use {fix}")
    driver = QUANTIZERS.get(q).declares("driven_by", None)
    if driver and driver not in [p.name for p in spec.policies]:
        with_it = [p.name for p in presets() if driver in p.policies]
        raise ConfigError(
            f"quantizer={q} leaves the weights where policy={driver} puts them (its forward "
            f"does not round them), so without that policy the run would train in full "
            f"precision; add policy={driver} or use {_options('method', with_it)}"
        )
    if spec.ptq and q != "none":
        raise ConfigError(
            f"ptq=true rounds a full-precision model after training, but quantizer={q} trains "
            "a quantized one; use ptq=false (cross_bits=[...] also evaluates it at other widths)"
        )
    act = spec.act_quantizer.name
    if q == "none" and act != "none":
        raise ConfigError(
            f"act_quantizer={act} quantizes the inputs of quantized layers, but quantizer=none "
            "quantizes no layer, so the run would silently stay in full precision; use "
            "act_quantizer=none (as method=fp does), or a weight quantizer (quantizer=lsq)"
        )
    if act != "none" and ACTIVATIONS not in capabilities(act):
        fits = [n for n in QUANTIZERS.names() if ACTIVATIONS in capabilities(n)]
        raise ConfigError(
            f"act_quantizer={act} quantizes weights only; use {_options('act_quantizer', fits)}"
        )
    if spec.bn_fold.enabled:
        _check_folding(spec)
    if spec.qkr == "always" and q == "none":
        raise ConfigError(
            "qkr=always quantizes attention, but quantizer=none trains in full precision"
        )
    entry = QUANTIZERS.get(q)
    bit_range = entry.declares("bit_range", BITS_RANGE)
    if spec.quantized and spec.bits not in bit_range:
        span = f"{bit_range.start}..{bit_range.stop - 1}"
        note = entry.declares("bit_note", "") or f"it is defined for {span} bits"
        allowed = ", ".join(map(str, bit_range))
        raise ConfigError(f"quantizer={q} with bits={spec.bits}: {note}; use bits={allowed}")


def _check_folding(spec: RunSpec) -> None:
    """bn_fold folds BatchNorm into quantized convs: refused in full precision, with the
    global batch norm of several CPU processes, and with a policy that cannot act on folded
    weights (`Policy.not_on_folded` says why)."""
    if not spec.quantized:
        raise ConfigError(
            "bn_fold.enabled=true folds BatchNorm into quantized convolutions, but "
            "quantizer=none quantizes none; use a weight quantizer or bn_fold.enabled=false"
        )
    if spec.trainer.sync_bn:
        raise ConfigError(
            "bn_fold.enabled=true with trainer.sync_bn=true: a folded BatchNorm keeps its "
            "own statistics; use trainer.sync_bn=false"
        )
    for policy in spec.policies:
        why = POLICIES.get(policy.name).declares("not_on_folded", None)
        if why:
            raise ConfigError(
                f"policy={policy.name} with bn_fold.enabled=true: {why}; use bn_fold.enabled="
                "false, or a policy that acts on folded weights (dampen, binreg, ramping, trs)"
            )


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data, interpolations resolved (for records and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True)
