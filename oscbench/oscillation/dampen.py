"""Oscillation dampening (Nagel et al., ICML 2022, "Overcoming Oscillations in
Quantization-Aware Training", arXiv:2203.11086, Sec. 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, delayed_cosine
from oscbench.quant.base import clip_to_grid
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


@dataclass
class DampenConfig:
    lambda_start: float  # Nagel et al.: 0
    lambda_end: float  # Nagel et al.: 0.1 (their ImageNet runs)
    start: float  # off before this share of training (Nagel et al.: 0.25), then cosine
    aggregation: (
        str  # kernel_mean (Nagel's default): sum over output channels, then mean; sum; mean
    )

    def __post_init__(self) -> None:
        check(0 <= self.start < 1, "policy.dampen.start", self.start, "0 <= x < 1")
        check(
            self.aggregation in ("kernel_mean", "sum", "mean"),
            "policy.dampen.aggregation",
            self.aggregation,
            "kernel_mean, sum, mean",
        )


def _aggregate(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "kernel_mean":
        return x.sum(0).mean()
    return x.sum() if how == "sum" else x.mean()


class Dampen(Policy):
    """L += lambda(t) sum_layers agg((w_q.detach() - clip(w, s n, s p))^2) over every
    quantized layer. w_q and the clipping range are detached, so the step size takes no
    gradient from this term; it only pulls latent weights towards their grid point.
    lambda = 0 before `start` T, then a cosine from lambda_start to lambda_end at T."""

    def __init__(self, cfg: DampenConfig, model: nn.Module) -> None:
        self.cfg = cfg
        self.layers = [m for _, m in quantized_layers(model)]
        self.lam = 0.0
        self.loss = EpochMean()

    def on_step_start(self, step: int, total: int) -> None:
        self.lam = delayed_cosine(
            step, total, self.cfg.start, self.cfg.lambda_start, self.cfg.lambda_end
        )

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        total = 0.0
        for layer in self.layers:
            w, q = layer.weight, layer.weight_quantizer
            diff = layer.last_quantized_weight - clip_to_grid(q, w)  # this step's w_q
            total = total + _aggregate(diff * diff, self.cfg.aggregation)
        loss = self.lam * total
        self.loss.add(loss)
        return loss

    def metrics(self) -> dict[str, float]:
        return {"dampen/lambda": self.lam, "dampen/loss": self.loss.pop()}


@POLICIES.register("dampen", DampenConfig)
def _build(cfg: DampenConfig, model: nn.Module, bits: int) -> Policy:
    return Dampen(cfg, model)
