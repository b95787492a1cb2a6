"""Config schemas and `validate`, which checks a composed Hydra config before any work.

Hydra composes conf/ (the only place defaults live) and rejects unknown groups and
options; `validate` rejects unknown keys, wrong types and values out of range, with a
message that names the bad value and what is allowed, and returns typed objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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


# logger.mode, and W&B's older names for two of them (WANDB_MODE=dryrun, run)
WANDB_MODES = {
    "offline": "offline",
    "online": "online",
    "disabled": "disabled",
    "dryrun": "offline",
    "run": "online",
}


@dataclass
class LoggerConfig:
    name: str  # wandb | none
    mode: str  # offline (no account needed) | online | disabled; default: $WANDB_MODE, else offline
    project: str
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    connect_timeout: float = 5.0  # online: seconds to reach the server before logging offline
    init_timeout: float = 30.0  # seconds W&B's client may take to start a run

    def __post_init__(self) -> None:
        check(self.name in ("wandb", "none"), "logger", self.name, "wandb, none")
        check(
            self.mode in WANDB_MODES,
            "logger.mode",
            self.mode,
            "offline, online, disabled (or W&B's dryrun, run; also read from $WANDB_MODE)",
        )
        self.mode = WANDB_MODES[self.mode]
        check(self.connect_timeout > 0, "logger.connect_timeout", self.connect_timeout, "> 0")
        check(self.init_timeout > 0, "logger.init_timeout", self.init_timeout, "> 0")


@dataclass
class Component:
    """A config-group choice: its registry name and its validated options."""

    name: str
    options: Any


@dataclass
class RunSpec:
    """Everything a run needs, typed and checked."""

    method: str  # what ran: the preset's name, or its components when they differ from it
    preset: str  # the `method=` preset the configuration started from
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
    ptq: bool  # full-precision training, then weights rounded to nearest at `bits`: the result
    data_dir: str
    init_from: str | None
    init_strict: bool  # init_from must fill every tensor but a classifier of another shape
    qkr: str  # never | auto (for attention models) | always (refused without attention)

    @property
    def quantized(self) -> bool:
        return self.quantizer.name != "none"

    @property
    def bits_label(self) -> str:
        """w<bits>a<act_bits>; a32 for full-precision activations; fp32 for a run whose
        weights stay in full precision throughout."""
        q, aq = self.quantizer.name, self.act_quantizer.name
        return bits_label(self.bits, self.act_bits, q, aq, self.ptq)


def bits_label(bits: int, act_bits: int, quantizer: str, act_quantizer: str, ptq: bool) -> str:
    """The bit-widths a run actually used (also the run directory's name; see conf/)."""
    if quantizer == "none":
        return f"w{bits}a32" if ptq else "fp32"
    return f"w{bits}a{act_bits if act_quantizer != 'none' else 32}"


def method_label(method: DictConfig, quantizer: str, policies: list[str], ptq: bool) -> str:
    """The preset's name when the run has the components the preset declares (its
    quantizer, policies and ptq), else the components themselves: `lsq+dampen+freeze`,
    `fp+osc_reg`, `ptq` (so `method=lsq policy=[dampen]` is never filed as plain lsq)."""
    declared = (method.quantizer, sorted(method.policies), method.ptq)
    if (quantizer, sorted(policies), ptq) == declared:
        return str(method.name)
    base = quantizer if quantizer != "none" else ("ptq" if ptq else "fp")
    return "+".join([base, *policies])


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
    policy_node = cfg.get("policy") or {}  # policy=[] leaves no node at all
    for key in ("ptq", "init_strict"):
        check(isinstance(cfg[key], bool), key, cfg[key], "true, false")
    method = cfg.method
    for key in ("name", "quantizer", "policies", "ptq"):
        if key not in method:
            raise ConfigError(
                f"method.{key} is missing: a preset in conf/method/ declares its name, "
                "quantizer, policies and ptq (see conf/method/lsq.yaml)"
            )
    spec = RunSpec(
        method=method_label(method, cfg.quantizer.name, list(policy_node), cfg.ptq),
        preset=str(method.name),
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
        cross_bits=_cross_bits(cfg.cross_bits),
        ptq=cfg.ptq,
        data_dir=str(cfg.data_dir),
        init_from=None if cfg.init_from is None else str(cfg.init_from),
        init_strict=cfg.init_strict,
        qkr=str(cfg.qkr),
    )
    check(spec.qkr in ("never", "auto", "always"), "qkr", spec.qkr, "never, auto, always")
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


NEEDS_QUANTIZER = ("dampen", "freeze", "cga", "aoq_schedule")
FREEZABLE = ("lsq", "aoq")  # grids that do not move with the weights they quantize
AOQ_BITS = range(2, 5)


def check_combination(spec: RunSpec) -> None:
    """Reject quantizer/policy/bit combinations that cannot run, saying what would."""
    q, names = spec.quantizer.name, [p.name for p in spec.policies]
    if spec.act_quantizer.options is not None and spec.act_quantizer.options.per_channel:
        raise ConfigError("act_quantizer.per_channel=true is not supported: one step per tensor")
    if spec.ptq and q != "none":
        raise ConfigError(
            f"ptq=true rounds a full-precision model after training, but quantizer={q} trains "
            "a quantized one; use ptq=false (cross_bits=[...] also evaluates it at other widths)"
        )
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
    if q == "none" and spec.act_quantizer.name != "none":
        raise ConfigError(
            f"act_quantizer={spec.act_quantizer.name} quantizes the inputs of quantized layers, "
            "but quantizer=none quantizes no layer, so the run would silently stay in full "
            "precision; use act_quantizer=none (as method=fp does), or a weight quantizer "
            "(quantizer=lsq)"
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
