"""Config schemas and `validate`, which checks a composed Hydra config before any work.

Hydra composes conf/ (the only place defaults live) and rejects unknown groups and
options; `validate` rejects unknown keys, wrong types and values out of range, with a
message that names the bad value and what is allowed, and returns typed objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from oscbench.data import DATASETS
from oscbench.models import MODELS
from oscbench.oscillation.policy import POLICIES
from oscbench.oscillation.tracker import TrackerConfig
from oscbench.quant import QUANTIZERS
from oscbench.registry import ConfigError, Registry, check, parse

BITS_RANGE = range(2, 9)


@dataclass
class TrainerConfig:
    epochs: int
    batch_size: int
    optimizer: str  # sgd | adamw
    lr: float
    momentum: float  # SGD momentum (AdamW: beta1)
    nesterov: bool
    weight_decay: float  # not applied to quantizer parameters
    warmup_fraction: float  # linear warm-up over this share of steps, then cosine to 0
    quant_lr: float  # learning rate of quantizer parameters (their own group)
    eval_batch_size: int
    bn_reestimate_batches: int  # Nagel et al.: re-estimate BN statistics before final eval; 0 = off
    checkpoint: bool  # save a checkpoint after every epoch (needed to resume)
    precision: str  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: str  # auto (on CUDA) | always | never
    compile: bool  # torch.compile the model's forward
    resume: str  # auto: continue from the run directory's checkpoint, if any; never: start over

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        check(self.optimizer in ("sgd", "adamw"), "trainer.optimizer", self.optimizer, "sgd, adamw")
        check(self.lr > 0, "trainer.lr", self.lr, "a number > 0")
        check(self.quant_lr >= 0, "trainer.quant_lr", self.quant_lr, "a number >= 0")
        check(0 <= self.momentum < 1, "trainer.momentum", self.momentum, "0 <= x < 1")
        check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "a number >= 0")
        check(
            0 <= self.warmup_fraction < 1,
            "trainer.warmup_fraction",
            self.warmup_fraction,
            "0 <= x < 1 (a share of all steps)",
        )
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, ">= 1")
        check(self.resume in ("auto", "never"), "trainer.resume", self.resume, "auto, never")
        check(
            self.precision in ("auto", "fp32", "bf16"),
            "trainer.precision",
            self.precision,
            "auto, fp32, bf16",
        )
        check(
            self.channels_last in ("auto", "always", "never"),
            "trainer.channels_last",
            self.channels_last,
            "auto, always, never",
        )
        check(
            self.bn_reestimate_batches >= 0,
            "trainer.bn_reestimate_batches",
            self.bn_reestimate_batches,
            "an integer >= 0 (0 = off)",
        )


@dataclass
class LoggerConfig:
    name: str  # wandb | none
    mode: str  # offline (no account needed) | online | disabled
    project: str
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.name in ("wandb", "none"), "logger", self.name, "wandb, none")
        check(
            self.mode in ("offline", "online", "disabled"),
            "logger.mode",
            self.mode,
            "offline, online, disabled",
        )


@dataclass
class Component:
    """A config-group choice: its registry name and its validated options."""

    name: str
    options: Any


@dataclass
class RunSpec:
    """Everything a run needs, typed and checked."""

    method: str
    bits: int
    act_bits: int
    first_last_bits: int
    seed: int
    device: str
    model: Component
    dataset: Component
    quantizer: Component
    act_quantizer: Component
    policies: list[Component]
    trainer: TrainerConfig
    oscillation: TrackerConfig
    logger: LoggerConfig
    cross_bits: list[int]
    data_dir: str
    init_from: str | None
    qkr: str  # never | auto (for attention models) | always (refused without attention)

    @property
    def quantized(self) -> bool:
        return self.quantizer.name != "none"


def _component(registry: Registry, node: Any, path: str) -> Component:
    if not isinstance(node, (dict, DictConfig)) or "name" not in node:
        raise ConfigError(f"{path}: expected a config with a 'name'; choose with {path}=NAME")
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
    top = {f.name for f in fields(RunSpec)} - {"policies"} | {"policy"}
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
    policy_node = cfg.policy or {}
    spec = RunSpec(
        method=str(cfg.method.name),
        bits=_bits(cfg, "bits"),
        act_bits=_bits(cfg, "act_bits"),
        first_last_bits=_bits(cfg, "first_last_bits"),
        seed=cfg.seed,
        device=device,
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
        cross_bits=list(cfg.cross_bits or []),
        data_dir=str(cfg.data_dir),
        init_from=None if cfg.init_from is None else str(cfg.init_from),
        qkr=str(cfg.qkr),
    )
    check(spec.qkr in ("never", "auto", "always"), "qkr", spec.qkr, "never, auto, always")
    for b in spec.cross_bits:
        check(
            isinstance(b, int) and b in BITS_RANGE, "cross_bits", b, "integers 2..8, e.g. [2,3,4,8]"
        )
    check_combination(spec)
    return spec


NEEDS_QUANTIZER = ("dampen", "freeze", "cga", "aoq_schedule")
FREEZABLE = ("lsq", "aoq")  # grids that do not move with the weights they quantize
AOQ_BITS = range(2, 5)


def check_combination(spec: RunSpec) -> None:
    """Reject quantizer/policy/bit combinations that cannot run, saying what would."""
    q, names = spec.quantizer.name, [p.name for p in spec.policies]
    if spec.act_quantizer.options is not None and spec.act_quantizer.options.per_channel:
        raise ConfigError("act_quantizer.per_channel=true is not supported: one step per tensor")
    for name in names:
        if name in NEEDS_QUANTIZER and q == "none":
            raise ConfigError(
                f"policy={name} acts on quantized weights, but quantizer=none trains in full "
                "precision; add a quantizer (quantizer=lsq) or use a preset such as "
                "method=lsq_dampen, method=lsq_freeze, method=ofq, method=aoq"
            )
    if "aoq_schedule" in names and q != "aoq":
        raise ConfigError(f"policy=aoq_schedule needs quantizer=aoq, not {q}; use method=aoq")
    if "freeze" in names and q not in FREEZABLE:
        raise ConfigError(
            f"policy=freeze pins weights to codes of a fixed grid, but quantizer={q} recomputes "
            f"its grid from the weights; use quantizer={' or quantizer='.join(FREEZABLE)}"
        )
    if "osc_reg" in names and q != "none":
        raise ConfigError(
            "policy=osc_reg trains in full precision and quantizes after training, but "
            f"quantizer={q}; use quantizer=none (method=osc_reg)"
        )
    if spec.qkr == "always" and q == "none":
        raise ConfigError(
            "qkr=always quantizes attention, but quantizer=none trains in full precision"
        )
    if q == "aoq" and spec.bits not in AOQ_BITS:
        raise ConfigError(
            f"quantizer=aoq with bits={spec.bits}: AOQ is defined here for 2..4-bit weights "
            "(its public code does 2); use bits=2, 3 or 4"
        )


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data, interpolations resolved (for records and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True)
