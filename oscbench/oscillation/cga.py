"""Confidence-guided annealing, CGA (Liu, Liu, Cheng, ICML 2023, "Oscillation-free
Quantization for Low-bit Vision Transformers" (OFQ), arXiv:2302.02210, Sec. 4.3; code:
nbasyl/OFQ, `cga.py`: `freeze_outside_boundary_weight_idx` and `train_one_epoch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


@dataclass
class CGAConfig:
    extra_epochs: int  # OFQ: 30 epochs after the main run; 0 = the phase is the end of the run
    start: float  # with extra_epochs = 0: the phase starts at this share of training
    lr: float | None  # OFQ: constant 1e-5 during extra epochs; null = keep the schedule's lr
    br: float  # |w - nearest threshold| <= br * step is "not confident" (OFQ: 0.005)
    scope: str  # blocks: every quantized layer but the 8-bit first and last (OFQ); all

    def __post_init__(self) -> None:
        check(self.scope in ("blocks", "all"), "policy.cga.scope", self.scope, "blocks, all")
        check(self.extra_epochs >= 0, "policy.cga.extra_epochs", self.extra_epochs, ">= 0")
        check(0 <= self.start < 1, "policy.cga.start", self.start, "0 <= x < 1")
        check(self.lr is None or self.lr > 0, "policy.cga.lr", self.lr, "null or > 0")
        check(self.br > 0, "policy.cga.br", self.br, "> 0")


class CGA(Policy):
    """During the phase, every step, after backward: a weight within br * step of its
    nearest threshold is "not confident" and keeps training; every other weight (clipped
    ones too) is frozen: its gradient is zeroed and its value restored after the optimizer
    step (before the trackers read it), so momentum and weight decay cannot move it. The
    mask is recomputed every step from the current weights.

    OFQ anneals only the transformer blocks' layers (fc1, fc2, qkv or v, proj), never the
    8-bit patch embedding and head; `scope: blocks` (the default) transfers this to any
    model as every quantized layer but the first and last, `scope: all` anneals those too.
    OFQ's CGA variant of the W_qk quantizer (`StatsQuantizer_specific_4_qkreparam_cga`)
    only detaches a term whose gradient the straight-through estimator discards, so W_qk
    is left alone here."""

    def __init__(self, cfg: CGAConfig, model: nn.Module) -> None:
        self.cfg = cfg
        self.extra_epochs = cfg.extra_epochs
        self.phase_lr = cfg.lr if cfg.extra_epochs else None
        self.layers = [
            m for _, m in quantized_layers(model) if cfg.scope == "all" or not m.is_first_or_last
        ]
        self.begin = 0
        self.active = False
        self.frozen: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []
        self.frozen_share = EpochMean()

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        if self.cfg.extra_epochs:
            self.begin = total_steps - self.cfg.extra_epochs * steps_per_epoch
        else:
            self.begin = round(self.cfg.start * total_steps)

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


@POLICIES.register("cga", CGAConfig)
def _build(cfg: CGAConfig, model: nn.Module, bits: int) -> Policy:
    return CGA(cfg, model)
