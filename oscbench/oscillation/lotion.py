"""LOTION: train the expected loss under unbiased stochastic rounding of the weights, in its
second-order form, then cast the weights to the grid.

Kwun, Morwani, Su, Gil, Anand, Kakade, "LOTION: Smoothing the Optimization Landscape for
Quantized Training", arXiv:2510.08757. No public code: re-implemented from the paper's
abstract and its stated second-order form (the rest of its text was not at hand), as TRS is;
every choice below is ours and a config value. Stochastic rounding of w on a grid of step s
gives w + e with E[e] = 0 and Var[e] = sigma^2 = s^2 d (1 - d), d = w/s - floor(w/s), so
E[L(w + e)] ~ L(w) + 1/2 sum_i g_ii sigma_i^2 with g_ii the Gauss-Newton (Fisher) diagonal:
LOTION's L_GN. The run trains in full precision on L(w) + lam L_GN's curvature term and is
cast to the grid at the end (`ptq`), as the paper casts its models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext
from oscbench.quant.base import FULL_PRECISION
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from oscbench.registry import check


@dataclass
class LotionConfig:
    lam: float  # the curvature term's factor (the second-order form's: 1)
    bits: int | None  # the grid the weights are cast to; null = the run's `bits`
    fisher_decay: float  # EMA decay of the squared gradients that estimate g_ii (Adam's 0.999)

    def __post_init__(self) -> None:
        check(self.lam >= 0, "lam", self.lam, ">= 0")
        check(self.bits is None or 2 <= self.bits <= 8, "bits", self.bits, "null or 2..8")
        check(0 <= self.fisher_decay < 1, "fisher_decay", self.fisher_decay, "0 <= x < 1")


def fraction(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """d = w/s - floor(w/s): where w lies in its bin of the grid of step s (differentiable
    in w, its derivative 1/s)."""
    t = w / s
    return t - torch.floor(t).detach()


def rounding_variance(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sigma^2 = s^2 d (1 - d): the variance of stochastically rounding w to the grid of
    step s (differentiable in w; s as given)."""
    d = fraction(w, s)
    return s * s * d * (1 - d)


def stochastic_round(w: torch.Tensor, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """w rounded up with probability d, down with 1 - d (unbiased): LOTION's noise."""
    t = w / s
    low = torch.floor(t)
    up = torch.rand(w.shape, generator=gen, dtype=w.dtype) < (t - low)
    return (low + up) * s


@POLICIES.register("lotion", LotionConfig)
class Lotion(Policy):
    """Full-precision training with L = L_task + lam/2 sum_layers sum_i g_ii sigma_i^2(w), on
    the symmetric per-tensor grid the run is cast to (RTN: s = max|w| / (2^(b-1) - 1),
    detached). g_ii: B x an EMA (bias-corrected, as Adam's second moment) of the squared
    mini-batch gradients of the task loss, detached, updated after each backward (B the
    batch size: for per-sample gradients of mean m and variance v, E[mean gradient^2] =
    m^2 + v/B, so this is v plus B m^2, the empirical Fisher diagonal where the mean
    gradient is small). Counting the term's own gradient in it would feed the curvature
    back into itself: on the claims benchmark every such run diverged within two epochs.
    Before the first backward g is 0. Conv and linear weights, as osc_reg's."""

    requires = frozenset({FULL_PRECISION})

    def __init__(self, cfg: LotionConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = RTNQuantizer(
            RTNConfig(per_channel=False, scale_grad=False), cfg.bits or run.bits, None, True
        )
        self.weights = [
            m.weight for m in run.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        for i, w in enumerate(self.weights):
            self.register_buffer(f"fisher_{i}", torch.zeros_like(w))
        self.updates = 0
        self.batch = run.batch_size
        self.loss = EpochMean()

    def curvature(self, i: int) -> torch.Tensor:
        """g_ii of weight tensor i: B x the bias-corrected EMA of squared gradients."""
        if self.updates == 0:
            return getattr(self, f"fisher_{i}")
        return getattr(self, f"fisher_{i}") * (
            self.batch / (1 - self.cfg.fisher_decay**self.updates)
        )

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.cfg.lam == 0:
            return None
        terms = [
            (self.curvature(i) * rounding_variance(w, self.q.scale(w))).sum()
            for i, w in enumerate(self.weights)
        ]
        loss = 0.5 * self.cfg.lam * sum(terms)
        self.loss.add(loss)
        return loss

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        """The EMA takes the task loss's gradient: the weight's gradient less the term's own,
        lam/2 g_ii d sigma^2/dw = lam/2 g_ii s (1 - 2 d) (g_ii as the term used it), so that
        the term never feeds its own curvature estimate."""
        beta = self.cfg.fisher_decay
        for i, w in enumerate(self.weights):
            if w.grad is None:
                continue
            task = w.grad
            if self.cfg.lam > 0:
                s = self.q.scale(w)
                own = 0.5 * self.cfg.lam * self.curvature(i) * s * (1 - 2 * fraction(w, s))
                task = w.grad - own
            getattr(self, f"fisher_{i}").mul_(beta).addcmul_(task, task, value=1 - beta)
        self.updates += 1

    def get_extra_state(self) -> dict:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates = state["updates"]

    def metrics(self) -> dict[str, float]:
        return {"lotion/loss": self.loss.pop()}
