"""Confidence-guided annealing, CGA (Liu, Liu, Cheng, ICML 2023, "Oscillation-free
Quantization for Low-bit Vision Transformers" (OFQ), arXiv:2302.02210, Sec. 4.3; code:
nbasyl/OFQ, `cga.py`: `freeze_outside_boundary_weight_idx` and `train_one_epoch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext
from oscbench.quant.base import QUANTIZED
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


@dataclass
class CGAConfig:
    start: float  # without extra epochs (trainer.extra_epochs=0): the phase's share of training
    br: float  # |w - nearest threshold| <= br * step is "not confident" (OFQ: 0.005)
    scope: str  # blocks: every quantized layer but the 8-bit first and last (OFQ); all

    def __post_init__(self) -> None:
        check(self.scope in ("blocks", "all"), "scope", self.scope, "blocks, all")
        check(0 <= self.start < 1, "start", self.start, "0 <= x < 1")
        check(self.br > 0, "br", self.br, "> 0")


@POLICIES.register("cga", CGAConfig)
class CGA(Policy):
    """During the phase, every step, after backward: a weight within br * step of its
    nearest threshold is "not confident" and keeps training; every other weight (clipped
    ones too) is frozen: its gradient is zeroed and its value restored after the optimizer
    step (before the trackers read it), so momentum and weight decay cannot move it. The
    mask is recomputed every step from the current weights. The phase is the run's extra
    epochs (`trainer.extra_epochs`; OFQ's `cga.py`: 30 cooldown epochs at the cosine
    schedule's `min_lr`, 1e-5, 1.83 % of its peak 5.47e-4: `trainer.extra_lr_scale`, which
    the `ofq` preset sets), or without them the last (1 - `start`) of training.

    OFQ anneals only the transformer blocks' layers (fc1, fc2, qkv or v, proj), never the
    8-bit patch embedding and head; `scope: blocks` (the default) transfers this to any
    model as every quantized layer but the first and last, `scope: all` anneals those too.
    OFQ's CGA variant of the W_qk quantizer (`StatsQuantizer_specific_4_qkreparam_cga`)
    only detaches a term whose gradient the straight-through estimator discards, so W_qk
    is left alone here."""

    requires = frozenset({QUANTIZED})
    not_on_folded = (
        "it holds latent weights far from a threshold still, but a folded weight also moves "
        "with the BatchNorm's scale and statistics it is multiplied by"
    )

    def __init__(self, cfg: CGAConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [
            m
            for _, m in quantized_layers(run.model)
            if cfg.scope == "all" or not m.is_first_or_last
        ]
        steps = run.schedule
        self.begin = steps.main if steps.total > steps.main else round(cfg.start * steps.total)
        self.active = False
        self.frozen: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []
        self.frozen_share = EpochMean()

    def on_step_start(self, step: int, total: int) -> None:
        self.active = step >= self.begin

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if not self.active:
            return
        self.frozen, self.saved = [], []
        frozen_count = 0
        for layer in self.layers:
            w, q = layer.weight, layer.weight_quantizer
            frozen = q.threshold_distance(w) > self.cfg.br * q.step(w)
            if w.grad is not None:
                w.grad.masked_fill_(frozen, 0.0)
            self.frozen.append(frozen)
            self.saved.append(w.detach().clone())
            frozen_count = frozen_count + frozen.sum()
        self.frozen_share.add(frozen_count / sum(layer.weight.numel() for layer in self.layers))

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        if not self.active:
            return
        for layer, frozen, saved in zip(self.layers, self.frozen, self.saved, strict=True):
            layer.weight.copy_(torch.where(frozen, saved, layer.weight))

    def metrics(self) -> dict[str, float]:
        return {"cga/active": float(self.active), "cga/frozen_share": self.frozen_share.pop()}
