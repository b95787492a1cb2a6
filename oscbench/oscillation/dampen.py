"""Oscillation dampening (Nagel et al., ICML 2022, "Overcoming Oscillations in
Quantization-Aware Training", arXiv:2203.11086, Sec. 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext, delayed_cosine
from oscbench.quant.base import QUANTIZED
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


@dataclass
class DampenConfig:
    lambda_start: float  # Nagel et al.: 0 (--oscillations-dampen-weight)
    lambda_end: float  # Nagel et al.: 0.1 (their ImageNet runs)
    start: float  # lambda_start before this share of training (Nagel et al.: 0.25), then cosine
    aggregation: (
        str  # kernel_mean (Nagel's default): sum over output channels, then mean; sum; mean
    )

    def __post_init__(self) -> None:
        check(self.lambda_start >= 0, "lambda_start", self.lambda_start, ">= 0")
        check(self.lambda_end >= 0, "lambda_end", self.lambda_end, ">= 0")
        check(0 <= self.start < 1, "start", self.start, "0 <= x < 1")
        check(
            self.aggregation in ("kernel_mean", "sum", "mean"),
            "aggregation",
            self.aggregation,
            "kernel_mean, sum, mean",
        )


class _DampenTerm(torch.autograd.Function):
    """sum((w_q - clip(w))^2) / divisor with w_q and the bounds detached, in two passes
    instead of autograd's dozen: every aggregation is the plain sum times a constant.
    Outside the grid w_q is the end level, so the difference and with it the gradient
    (-2 (w_q - clip(w)) / divisor, as autograd computes it) is zero there."""

    @staticmethod
    def forward(ctx, w, wq, lo, hi, divisor: int):  # noqa: ANN001, ANN205
        d = torch.clamp(w, lo, hi)
        torch.sub(wq, d, out=d)
        ctx.save_for_backward(d)
        ctx.divisor = divisor
        return torch.dot(d.reshape(-1), d.reshape(-1)) / divisor

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (d,) = ctx.saved_tensors
        return d * (grad / ctx.divisor * -2), None, None, None, None


def _divisor(w: torch.Tensor, how: str) -> int:
    """kernel_mean: sum over dim 0 (output channels), then the mean over the rest."""
    if how == "kernel_mean":
        return w.numel() // w.shape[0]
    return 1 if how == "sum" else w.numel()


@POLICIES.register("dampen", DampenConfig)
class Dampen(Policy):
    """L += lambda(t) sum_layers agg((w_q.detach() - clip(w, s n, s p))^2) over every
    quantized layer (Qualcomm-AI-research/oscillations-qat, `utils/qat_utils.py`:
    `DampeningLoss`, `dampening_loss`). w_q and the clipping range are detached, so the step
    size takes no gradient from this term; it only pulls latent weights towards their grid
    point. lambda(t), on Nagel's iteration counter t = step + 1: lambda_start before
    `start` T, then a cosine from lambda_start to lambda_end, reached at the last step."""

    requires = frozenset({QUANTIZED})

    def __init__(self, cfg: DampenConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [m for _, m in quantized_layers(run.model)]
        self.lam = 0.0
        self.loss = EpochMean()

    def on_step_start(self, step: int, total: int) -> None:
        cfg = self.cfg
        self.lam = delayed_cosine(
            step + 1, total, cfg.start, cfg.lambda_start, cfg.lambda_end, before=cfg.lambda_start
        )

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        total = 0.0
        for layer in self.layers:
            w = layer.quantizer_input()
            lo, hi = layer.weight_quantizer.bounds(w)
            wq = layer.last_quantized_weight  # this step's w_q
            total = total + _DampenTerm.apply(w, wq, lo, hi, _divisor(w, self.cfg.aggregation))
        loss = self.lam * total
        self.loss.add(loss)
        return loss

    def metrics(self) -> dict[str, float]:
        return {"dampen/lambda": self.lam, "dampen/loss": self.loss.pop()}
