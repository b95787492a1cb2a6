"""The oscillation regulariser (Wenshoj, Pepin, Selvan, TMLR 2025, "Oscillations make
neural networks robust to quantization"; code: saintslab/osc_reg, `osciquant/quantizers.py`
and the `OsciQuantLoss` of its README)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext
from oscbench.quant.base import FULL_PRECISION
from oscbench.quant.rtn import RTNConfig, RTNQuantizer
from oscbench.registry import check


@dataclass
class OscRegConfig:
    lam: float  # Wenshoj et al.: 1
    bits: int | None  # grid of the regulariser; null = the run's `bits`
    detach_scale: bool  # false: s = max|w|/p takes gradient, as in their code; true: detached

    def __post_init__(self) -> None:
        check(self.lam >= 0, "lam", self.lam, ">= 0")
        check(self.bits is None or 2 <= self.bits <= 8, "bits", self.bits, "null or 2..8")


@POLICIES.register("osc_reg", OscRegConfig)
class OscReg(Policy):
    """Full-precision training with L = L_task + lam sum_layers mean(q(w)^2 - w^2), where q
    rounds to nearest on a symmetric per-tensor grid s = max|w| / (2^(b-1) - 1) and is NOT
    detached: through the straight-through round the extra gradient is
    lam 2 (q(w) - w) / numel per layer, pushing weights towards thresholds as QAT does.
    As in their code, s takes gradient as well, which reaches each tensor's
    largest-magnitude weight (`detach_scale: true` detaches it). Conv and linear weights
    only: norm layers are excluded."""

    requires = frozenset({FULL_PRECISION})

    def __init__(self, cfg: OscRegConfig, run: RunContext) -> None:
        super().__init__()
        self.lam = cfg.lam
        rtn = RTNConfig(per_channel=False, scale_grad=not cfg.detach_scale)
        self.q = RTNQuantizer(rtn, cfg.bits or run.bits, None, True)
        self.weights = [
            m.weight for m in run.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        self.loss = EpochMean()

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        loss = self.lam * sum((self.q(w) ** 2 - w**2).mean() for w in self.weights)
        self.loss.add(loss)
        return loss

    def metrics(self) -> dict[str, float]:
        return {"osc_reg/loss": self.loss.pop()}
