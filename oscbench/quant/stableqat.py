"""StableQAT: LSQ whose straight-through gradient is shaped by a Fourier series of rounding.

Chen, Chen, Qu, Zhao, Yan, Ko, Liang, Cameron, "StableQAT: Stable Quantization-Aware Training
at Ultra-Low Bitwidths", arXiv:2601.19320 (2026); code microsoft/StableQAT at 4760535:
`models/utils_quant.py` (`lsq_backward_kernel`, `LsqBinaryTernaryExtensionRegular`),
`train.py` (the step's initial value), `train_configs/*sine_soft_q*amp_0.21*.yaml` (one
harmonic at amplitude 0.21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from oscbench.quant.base import FIXED_GRID, QUANTIZED, QUANTIZERS
from oscbench.quant.lsq import LSQConfig, LSQQuantizer, _lsq_grads
from oscbench.registry import check

ROOT2_PI = math.sqrt(2) * math.pi  # the reference's 4.442882938158366


@dataclass
class StableQATConfig(LSQConfig):
    """LSQ's options, plus the surrogate's."""

    amplitudes: list[float]  # a_k of the harmonics 1, 3, 5, ...; []: LSQ's straight-through
    mask: str  # where the gradient passes: reference (x/s in [n, p]) | lsq (round(x/s) in [n, p])

    def __post_init__(self) -> None:
        super().__post_init__()
        total = sum(abs(a) for a in self.amplitudes)
        check(
            total * ROOT2_PI < 1,
            "amplitudes",
            self.amplitudes,
            f"sum |a_k| below 1 / (sqrt(2) pi) = {1 / ROOT2_PI:.4f}, where the factor stays finite "
            "and positive",
        )
        check(self.mask in ("reference", "lsq"), "mask", self.mask, "reference, lsq")


def surrogate_factor(xs: torch.Tensor, amplitudes: list[float]) -> torch.Tensor:
    """The factor on the straight-through gradient at t = x/s: (1 - c S) / (1 + c S), with
    S = sum_k a_k cos((2k + 1) pi (t + round(t))) and c = sqrt(2) pi (the reference's
    `grad_x`). One harmonic at 0.21: 1 at the rounding thresholds, 0.035 at the levels."""
    angle = torch.pi * (xs + torch.round(xs))
    series = torch.zeros_like(angle)
    for k, a in enumerate(amplitudes):
        series += a * torch.cos((2 * k + 1) * angle)
    return (1 - ROOT2_PI * series) / (1 + ROOT2_PI * series)


class _StableRound(torch.autograd.Function):
    """LSQ's fake quantization; the gradient to x is the mask times `surrogate_factor`, the
    step's gradient is LSQ's under the same mask (q - x/s inside, n or p outside, times g)."""

    @staticmethod
    def forward(ctx, x, s, n: int, p: int, g: float, amplitudes: list, mask: str):  # noqa: ANN001, ANN205
        xs = x * s.reciprocal()
        r = torch.round(xs)
        q = r.clamp(n, p)
        inside = ((xs >= n) & (xs <= p)) if mask == "reference" else torch.eq(r, q)
        inside = inside.float()
        ds = q - xs * inside
        factor = inside * surrogate_factor(xs, amplitudes) if amplitudes else inside
        ctx.save_for_backward(factor, ds)
        ctx.g, ctx.s_shape = g, s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return *_lsq_grads(ctx, grad), None, None, None, None, None


@QUANTIZERS.register("stableqat", StableQATConfig)
class StableQATQuantizer(LSQQuantizer):
    """LSQ's forward and step; the weight's straight-through gradient multiplied by
    `surrogate_factor`, which damps the gradient of a weight near its level and keeps it whole
    at a rounding threshold. Amplitudes [] give LSQ's straight-through estimator exactly.

    As the reference (`lsq_backward_kernel`): the mask and the step's coefficient use t = x/s
    before rounding (`mask: reference`: inside iff n <= t <= p; `lsq`: oscbench LSQ's, the
    rounded code inside, PyTorch's fused convention; they differ within half a step outside
    the range); the step's gradient scale is g = 1/sqrt(N p) with N the whole weight's
    elements, per channel too (the reference's `grad_scale`; oscbench's LSQ counts a row's).
    The reference's step starts at max|w| / p per row (`init: max`) and is clamped to at
    least 1e-5 before each forward (`keep_positive: true` here: max(|s|, eps), torch.ao's).
    Weights only, as the reference quantizes no activations; its 1-bit sign branch is not
    here (oscbench's grids start at 2 bits).
    """

    capabilities = frozenset({QUANTIZED, FIXED_GRID})

    def init_from(self, x: torch.Tensor) -> None:
        super().init_from(x)
        self.g = 1.0 / math.sqrt(x.numel() * self.p) if self.cfg.grad_scale else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        self._keep_positive()
        x = x.float()
        s = self._view(self.s, x)
        args = (self.n, self.p, self.g, list(self.cfg.amplitudes), self.cfg.mask)
        return _StableRound.apply(x, s, *args)
