"""AOQ: Allowing Oscillation Quantization (ICCV 2025; code: muzenc/AOQ,
`AO_QAT/quan/quantizer.py`: `AOQ`).

Thresholds and levels are decoupled. With b bits, per tensor:
levels L_i = (i - (2^b - 1)/2) s_le, i = 0..2^b-1 (mid-rise, no zero level);
thresholds T_j = (j - 2^(b-1) + 1) s_th, j = 0..2^b-2; w_hat = L_i for T_{i-1} <= w < T_i.
Init s_th = s_le = std(w) / 2^(b-2), which is a uniform mid-rise quantizer. Backward: the
identity straight-through estimator for w; s_le gets gradient through the chosen level's
coefficient; s_th none (the `aoq_schedule` policy moves it). The public code does 2 bits
only; the formulas above are its generalisation. It leaves s_le's gradient unscaled, a sum
over every weight of the tensor; oscbench scales it by LSQ's g = 1/sqrt(numel * 2^(b-1))
by default (`quantizer.grad_scale`), without which the 8-bit end layers' steps diverge
under the shared quantizer learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.base import (
    DECOUPLED,
    EXTRA_BIT,
    FIXED_GRID,
    QUANTIZED,
    QUANTIZERS,
    IntegerForm,
    Quantizer,
    UniformGrid,
    keep_positive_,
    kept_positive,
)


@dataclass
class AOQConfig:
    """Options of `quantizer: aoq`; its schedule is the `aoq_schedule` policy."""

    grad_scale: bool  # scale s_le's gradient by 1/sqrt(numel * 2^(b-1)) as LSQ does (our choice)
    keep_positive: bool  # s_le = max(|s_le|, eps) before each forward (as LSQ's option)


class _AOQLevels(torch.autograd.Function):
    """(w, coef, s_le) -> coef * s_le: the identity gradient to w, g * sum(grad * coef) to
    s_le. The level step is evaluated as s_le g + s_le (1 - g), the value autograd sees
    when the gradient is scaled by g through `s_le g + (s_le (1 - g)).detach()`; the sum
    is taken as autograd takes it (a product, then `sum`), so results equal the plain
    autograd expression bit for bit."""

    @staticmethod
    def forward(ctx, w, coef, s_le, g: float):  # noqa: ANN001, ANN205
        ctx.save_for_backward(coef)
        ctx.g = g
        return coef * (s_le * g + s_le * (1 - g))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (coef,) = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[2]:
            grad_s = (grad * coef).sum() * ctx.g
        return grad, None, grad_s, None


@QUANTIZERS.register("aoq", AOQConfig)
class AOQQuantizer(Quantizer):
    """See the module's docstring. Part of its interface for the `aoq_schedule` policy:
    `s_th` (threshold step, a buffer), `s_le` (level step, learned), `s0` (both at init),
    and `last_coef`, the detached level coefficients of the last forward (see `forward`)."""

    signed = True
    per_channel = False
    bit_range = range(2, 5)
    bit_note = "AOQ is defined here for 2..4-bit weights (its public code does 2)"
    capabilities = frozenset({QUANTIZED, FIXED_GRID, DECOUPLED})
    deploy = EXTRA_BIT
    extra_state = ("g",)

    def __init__(self, cfg: AOQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.grad_scale = cfg.grad_scale
        self.keep_positive = cfg.keep_positive
        self.g = 1.0
        self.half = 2 ** (bits - 1)
        self.centre = (2**bits - 1) / 2
        self.s_le = nn.Parameter(torch.ones(()))
        self.register_buffer("s_th", torch.ones(()))
        self.register_buffer("s0", torch.ones(()))  # std(w) / 2^(b-2) at init, for the schedule

    def init_from(self, x: torch.Tensor) -> None:
        s = (x.detach().std() / 2 ** (self.bits - 2)).clamp_min(1e-8)
        self.s_le.data.copy_(s)
        self.s_th.copy_(s)
        self.s0.copy_(s)
        self.g = 1 / math.sqrt(x.numel() * self.half) if self.grad_scale else 1.0
        self.ready = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Also keeps the detached level coefficients as `last_coef` for the schedule's
        stage-3 term in the same step: c(w), the level of w's bin on the uniform grid of
        the thresholds (also for the two outer bins; AOQ's dampening target), is
        last_coef * s_th.

        `keep_positive` (off: AOQ's code has no guard): first s_le = max(|s_le|, eps)
        (`keep_positive_`). Without it the common recipe's 8-bit classifier's level step
        went below 0 in 2 of 5 W2A2 runs of the claims benchmark (its weights' signs
        flipped), which ended at 14-24 %."""
        self._check_ready()
        if self.keep_positive:
            keep_positive_(self.s_le)
        coef = self.to_int(w).add_(0.5)  # bin index i - (2^b - 1)/2
        self.last_coef = coef
        return _AOQLevels.apply(w, coef, self.s_le, self.g)

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """Bin index i (the number of thresholds <= w, 0..2^b-1) minus 2^(b-1): shifted to
        the signed range, so it fits int8."""
        return torch.floor(w.detach() / self.s_th).clamp_(-self.half, self.half - 1)

    def grid(self, w: torch.Tensor) -> UniformGrid:
        """The thresholds' grid: bin i = code + 2^(b-1) spans [T_{i-1}, T_i), its centre
        (code + 0.5) s_th; the levels have a step of their own (`levels`)."""
        return UniformGrid(self.s_th, -self.half, self.half - 1, offset=0.5)

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        i = torch.arange(2**self.bits, device=self.s_le.device, dtype=self.s_le.dtype)
        return (i - self.centre) * self.s_le.detach()

    def integer_form(self, w: torch.Tensor | None) -> IntegerForm:
        """The level (k + 1/2) s_le is the odd integer 2k + 1 on the step s_le / 2, with s_le
        as the forward pass evaluates it (`_AOQLevels`, after `keep_positive`): codes
        -(2^b - 1)..2^b - 1."""
        s = self.s_le.detach().float()
        if self.keep_positive:
            s = kept_positive(s)
        top = 2 * self.half - 1
        return IntegerForm((s * self.g + s * (1 - self.g)) / 2, -top, top)

    def bounds(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lv = self.levels(w)
        return lv[0], lv[-1]
