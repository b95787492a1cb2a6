"""The run's optimizers and learning-rate schedules.

Parameters fall in named groups (policies address them by name): "other" (every parameter
that is neither a quantized layer's weight nor a quantizer's), "latent" (the quantized
layers' weights), both at `trainer.lr` with weight decay, "no_decay" (those of "other" that
`trainer.no_weight_decay` spares: PARQ's biases, timm's 1-D parameters) at `trainer.lr`
without, and "quantizer" at
`trainer.quant_lr` without (with `trainer.act_quant_lr` set, the input quantizers'
parameters are a group "act_quantizer" at that rate: AOQ trains LTQ at the main rate and
its weight steps at 1/200 of it). The quantizer group is a group of the main optimizer
(`quant_optimizer: shared`), or has an optimizer of its own (`adam`, `sgd`): Nagel et al.'s
`--sep-quant-optimizer` (Qualcomm-AI-research/oscillations-qat, `main.py`,
`bash/train_*.sh`: Adam at 1e-5, weight decay 0, no schedule = `quant_schedule: constant`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from oscbench.quant.modules import quantized_layers, quantizer_parameters
from oscbench.training.config import TrainerConfig


def _optimizer(kind: str, groups: list[dict], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """`sgd` (momentum, Nesterov), `adam` (weight decay added to the gradient, as
    torch.optim.Adam) or `adamw` (decoupled weight decay); Adam's beta1 is `momentum`."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(
    kind: str, total: int, warmup: int, milestones: Sequence[float] = (), gamma: float = 0.1
) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warm-up over `warmup` steps, then
    `cosine` or `linear` decay to 0 at `total`, or `multistep`: `gamma` to the number of
    `milestones` (shares of `total`, from the first step) reached, as torch's MultiStepLR
    counts epochs (the ResNet recipe of He et al. 2016: 0.1 at half and three quarters);
    or `constant`."""
    steps = [round(m * total) for m in milestones]

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        if kind == "multistep":
            return gamma ** bisect.bisect_right(steps, step)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1.0 - t

    return factor


class Optimizers:
    """One or two optimizers, each with its schedule, seen as one by the loop and the
    policies: `param_groups` (all groups, named), `step`, `zero_grad`, `schedule_step`,
    `state_dict` and `load_state_dict` (optimizers and schedules together)."""

    def __init__(self, pairs: list[tuple[torch.optim.Optimizer, Callable[[int], float]]]) -> None:
        self.optimizers = [o for o, _ in pairs]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, f) for o, f in pairs]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def schedule_step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"{len(state['optimizers'])} optimizers saved, this run has "
                f"{len(self.optimizers)} (trainer.quant_optimizer differs)"
            )
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for o, s in zip(self.schedulers, state["schedulers"], strict=True):
            o.load_state_dict(s)


def _group(name: str, params: list, lr: float, weight_decay: float = 0.0) -> dict:
    return {"name": name, "params": params, "lr": lr, "weight_decay": weight_decay}


def spared(model: nn.Module, rule: str) -> set[int]:
    """The ids of the parameters that `trainer.no_weight_decay` keeps out of weight decay:
    `biases`, every parameter named bias (facebookresearch/parq `utils/train.py`:
    `split_param_groups`, whose norm weights do decay); `1d`, those timm's
    `param_groups_weight_decay` spares (biases, every parameter of one dimension or fewer,
    and the names in the model's `no_weight_decay()`), as timm's `create_optimizer_v2` does
    for OFQ (nbasyl/OFQ `train.py`)."""
    if rule == "none":
        return set()
    if rule == "biases":
        return {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    from timm.optim import param_groups_weight_decay  # seconds to import: only where used

    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=names)
    return {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}


def build_optimizers(model: nn.Module, cfg: TrainerConfig, total: int) -> Optimizers:
    """The run's optimizers over `total` main steps (empty groups are left out)."""
    qparams = quantizer_parameters(model)
    latent = [layer.weight for _, layer in quantized_layers(model)]
    taken = {id(p) for p in qparams} | {id(p) for p in latent}
    other = [p for p in model.parameters() if id(p) not in taken]
    exempt = spared(model, cfg.no_weight_decay)
    main = [
        _group("other", [p for p in other if id(p) not in exempt], cfg.lr, cfg.weight_decay),
        _group("no_decay", [p for p in other if id(p) in exempt], cfg.lr),
        _group("latent", latent, cfg.lr, cfg.weight_decay),
    ]
    if cfg.act_quant_lr is None:
        quant = [_group("quantizer", qparams, cfg.quant_lr)]
    else:  # the input quantizers' parameters at a rate of their own
        steps = {id(p) for _, m in quantized_layers(model) for p in m.weight_quantizer.parameters()}
        quant = [
            _group("quantizer", [p for p in qparams if id(p) in steps], cfg.quant_lr),
            _group("act_quantizer", [p for p in qparams if id(p) not in steps], cfg.act_quant_lr),
        ]
    warmup = round(cfg.warmup_fraction * total)
    main_factor = lr_factor(cfg.schedule, total, warmup, cfg.milestones, cfg.gamma)
    if cfg.quant_optimizer == "shared":
        groups = [g for g in main + quant if g["params"]]
        return Optimizers([(_optimizer(cfg.optimizer, groups, cfg), main_factor)])
    pairs = [(_optimizer(cfg.optimizer, [g for g in main if g["params"]], cfg), main_factor)]
    if qparams:
        quant_factor = main_factor if cfg.quant_schedule == "main" else lr_factor("constant", 0, 0)
        quant = [g for g in quant if g["params"]]
        pairs.append((_optimizer(cfg.quant_optimizer, quant, cfg), quant_factor))
    return Optimizers(pairs)
