"""AOQ: Allowing Oscillation Quantization (ICCV 2025; code: github.com/muzenc/AOQ).

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

from oscbench.quant.base import Quantizer, uniform_threshold_distance


@dataclass
class AOQConfig:
    """Options of `quantizer: aoq`; its schedule is the `aoq_schedule` policy."""

    grad_scale: bool  # scale s_le's gradient by 1/sqrt(numel * 2^(b-1)) as LSQ does (our choice)


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


class AOQQuantizer(Quantizer):
    signed = True
    per_channel = False
    learnable_params = ("s_le",)

    def __init__(self, bits: int, grad_scale: bool) -> None:
        super().__init__(bits)
        self.grad_scale = grad_scale
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

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "g": self.g}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.g = state["g"]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Also keeps the detached level coefficients as `last_coef` for the schedule's
        stage-3 term in the same step: c(w), the level of w's bin on the uniform grid of
        the thresholds (also for the two outer bins; AOQ's dampening target), is
        last_coef * s_th."""
        self._check_ready()
        coef = self.to_int(w).add_(0.5)  # bin index i - (2^b - 1)/2
        self.last_coef = coef
        return _AOQLevels.apply(w, coef, self.s_le, self.g)

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """Bin index i (the number of thresholds <= w, 0..2^b-1) minus 2^(b-1): shifted to
        the signed range, so it fits int8."""
        return torch.floor(w.detach() / self.s_th).clamp_(-self.half, self.half - 1)

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        i = torch.arange(2**self.bits, device=self.s_le.device, dtype=self.s_le.dtype)
        return (i - self.centre) * self.s_le.detach()

    def thresholds(self, w: torch.Tensor) -> torch.Tensor:
        j = torch.arange(2**self.bits - 1, device=self.s_th.device, dtype=self.s_th.dtype)
        return (j - self.half + 1) * self.s_th

    def step(self, w: torch.Tensor) -> torch.Tensor:
        return self.s_th

    def threshold_distance(self, w: torch.Tensor) -> torch.Tensor:
        return uniform_threshold_distance(w.detach(), self.s_th, 0.0, 1 - self.half, self.half - 1)

    def code_centre(self, codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (codes + 0.5) * self.s_th  # bin i = code + 2^(b-1) spans [T_{i-1}, T_i)
