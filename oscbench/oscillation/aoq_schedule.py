"""AOQ's staged schedule (Allowing Oscillation Quantization, ICCV 2025; code: muzenc/AOQ,
`AO_QAT/quan/quantizer.py`: `AOQ.forward`, and the training scripts' loss, e.g.
`AO_QAT/resnet_imagenet/train.py`; CIFAR run of 250 epochs, here in shares of training)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext
from oscbench.quant.base import DECOUPLED
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


class _DistanceNorm(torch.autograd.Function):
    """||w - c||_2 for a detached target c, whose buffer it reuses for w - c; the gradient
    grad ((w - c) / ||w - c||) (0 where w = c everywhere), as autograd computes it, in
    two passes over the weights."""

    @staticmethod
    def forward(ctx, w, c):  # noqa: ANN001, ANN205
        d = torch.sub(w, c, out=c)
        norm = torch.linalg.vector_norm(d)
        ctx.save_for_backward(d, norm)
        return norm

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        d, norm = ctx.saved_tensors
        return (d / torch.where(norm > 0, norm, 1.0)).mul_(grad), None  # d = 0 if norm = 0


@dataclass
class AOQScheduleConfig:
    stage1_end: float  # AOQ: epoch 50 of 250 = 0.2
    stage2_end: float  # 0.6 (DESIGN.md's reading of the public code)
    alpha_end: float  # AOQ: 0.30 = 0.65 - 0.35
    dampen_lambda: float  # stage 3: AOQ uses 0.01

    def __post_init__(self) -> None:
        check(
            0 < self.stage1_end <= self.stage2_end <= 1,
            "stage1_end/stage2_end",
            (self.stage1_end, self.stage2_end),
            "0 < stage1_end <= stage2_end <= 1",
        )
        check(0 < self.alpha_end <= 1, "alpha_end", self.alpha_end, "0 < x <= 1")
        check(self.dampen_lambda >= 0, "dampen_lambda", self.dampen_lambda, ">= 0")


@POLICIES.register("aoq_schedule", AOQScheduleConfig)
class AOQSchedule(Policy):
    """Three stages over the (0-based) step t of T, T1 = stage1_end T, T2 = stage2_end T,
    boundaries inclusive as in AOQ's code (`epoch <= 50`, `epoch <= 150` of 250):

    - stage 1 (t <= T1): s_th and s_le are frozen and both scaled by
      alpha(t) = a + (1 - a)/2 (1 + cos(pi t / T1)), from 1.0 to a = alpha_end, reached
      at t = T1 (AOQ: 0.65 + 0.35 cos(2 pi epoch / 100), a = 0.30 at epoch 50), which
      shrinks the grid and makes more weights cross thresholds. AOQ's code updates alpha
      every 5 epochs; here every step.
    - stage 2 (T1 < t <= T2): thresholds stay at a s_th0; s_le is learned from a s_le0 (no
      jump). AOQ's code learns a step that it multiplies by a, i.e. an effective learning
      rate a^2 times ours.
    - stage 3 (t > T2): adds lambda sum_layers ||w - c(w).detach()||_2 (unsquared),
      c = the centre of w's threshold bin.

    Applies to the AOQ layers at the run's bit-width (not the 8-bit first and last)."""

    requires = frozenset({DECOUPLED})

    def __init__(self, cfg: AOQScheduleConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [
            m
            for _, m in quantized_layers(run.model)
            if DECOUPLED in m.weight_quantizer.capabilities and not m.is_first_or_last
        ]
        self.alpha, self.stage = 1.0, None
        self.loss = EpochMean()

    def on_step_start(self, step: int, total: int) -> None:
        t1, t2, a = self.cfg.stage1_end * total, self.cfg.stage2_end * total, self.cfg.alpha_end
        previous = self.stage
        if step <= t1:
            self.stage = 1
            self.alpha = a + (1 - a) / 2 * (1 + math.cos(math.pi * step / t1))  # a at t = T1
        else:
            self.stage = 2 if step <= t2 else 3
            self.alpha = a
        # s_le follows alpha in stage 1 and is learned from a * s0 once stage 1 ends (checked
        # against the previous step's stage, so a resumed run keeps its learned s_le)
        set_levels = self.stage == 1 or previous == 1
        with torch.no_grad():
            for layer in self.layers:
                q = layer.weight_quantizer
                q.s_th.copy_(self.alpha * q.s0)
                if set_levels:
                    q.s_le.copy_(self.alpha * q.s0)

    def after_backward(self, model: nn.Module) -> None:
        if self.stage == 1:
            for layer in self.layers:
                layer.weight_quantizer.s_le.grad = None  # frozen: the optimizer skips it

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.stage < 3 or self.cfg.dampen_lambda == 0:
            return None
        total = sum(
            _DistanceNorm.apply(
                m.quantizer_input(), m.weight_quantizer.last_coef * m.weight_quantizer.s_th
            )
            for m in self.layers  # last_coef * s_th: this step's bin centres c(w)
        )
        loss = self.cfg.dampen_lambda * total
        self.loss.add(loss)
        return loss

    def get_extra_state(self) -> dict:
        return {"stage": self.stage}

    def set_extra_state(self, state: dict) -> None:
        self.stage = state["stage"]

    def metrics(self) -> dict[str, float]:
        return {
            "aoq/alpha": self.alpha,
            "aoq/stage": self.stage,
            "aoq/dampen_loss": self.loss.pop(),
        }
