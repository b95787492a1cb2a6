"""LSQ+: LSQ with a learnable offset, for asymmetric activations.

Bhalgat, Lee, Nagel, Blankevoort, Kwak, "LSQ+: Improving low-bit quantization through
learnable offsets and better initialization", CVPR Workshops 2020, arXiv:2004.09576, Sec. 3:
x_q = s round(clamp((x - beta) / s, n, p)) + beta with learnable s and beta, the codes
unsigned (n = 0, p = 2^b - 1), both gradients scaled by LSQ's g. No official code is public;
the forward and the step's gradient are LSQ's (`oscbench/quant/lsq.py: _LSQRound`, itself
PyTorch's `_fake_quantize_learnable_per_tensor_affine`) applied to x - beta, so the
offset's gradient is g times the incoming gradient where x is clipped (inside the range
x_q - beta follows x, and beta cancels). PyTorch's fused function learns an integer zero
point z = -beta / s instead, rounded in the forward pass: a different parameterisation
(offsets on the grid only), not used here.

Initialisation (`init`), a choice the paper leaves between two: `minmax` (the paper's
min-max: s = (max - min) / (p - n), beta = min - n s on the calibration batch) or `lsq`
(LSQ's step 2 mean|x| / sqrt(p) and beta = 0, where LSQ+ starts exactly as LSQ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.base import (
    ACTIVATIONS,
    QUANTIZERS,
    UNIFORM,
    IntegerForm,
    Quantizer,
    int_range,
)
from oscbench.quant.lsq import lsq_quantize
from oscbench.registry import check


@dataclass
class LSQPlusConfig:
    init: str  # minmax (LSQ+'s) | lsq (LSQ's step, offset 0)
    grad_scale: bool  # g = 1/sqrt(features per sample x p) for the step and the offset

    def __post_init__(self) -> None:
        check(self.init in ("minmax", "lsq"), "init", self.init, "minmax, lsq")


@QUANTIZERS.register("lsq_plus", LSQPlusConfig)
class LSQPlusQuantizer(Quantizer):
    """Activations only (act_quantizer=lsq_plus): a step s and an offset beta per tensor."""

    capabilities = frozenset({ACTIVATIONS})
    deploy = UNIFORM
    extra_state = ("g",)
    signed = False
    per_channel = False

    def __init__(
        self, cfg: LSQPlusConfig, bits: int, channels: int | None, is_weight: bool
    ) -> None:
        super().__init__(bits)
        self.cfg = cfg
        self.n, self.p = int_range(bits, signed=False)
        self.s = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.g = 1.0

    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.cfg.init == "minmax":
            lo, hi = x.min(), x.max()
            s = ((hi - lo) / (self.p - self.n)).clamp_min(1e-8)
            self.s.data.copy_(s)
            self.beta.data.copy_(lo - self.n * s)
        else:
            self.s.data.copy_((2 * x.abs().mean() / math.sqrt(self.p)).clamp_min(1e-8))
            self.beta.data.zero_()
        self.g = 1.0 / math.sqrt(x[0].numel() * self.p) if self.cfg.grad_scale else 1.0
        self.ready = True

    def _offset(self) -> torch.Tensor:
        """beta, whose gradient is scaled by g (the value is exactly beta's)."""
        return self.beta.detach() + (self.beta * self.g - (self.beta * self.g).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        beta = self._offset()
        return lsq_quantize(x.float() - beta, self.s, self.n, self.p, self.g) + beta

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        t = (x.float() - self.beta) * self.s.reciprocal()
        return t.round_().clamp_(self.n, self.p)

    def integer_form(self, x: torch.Tensor | None) -> IntegerForm:
        """Codes 0..p on step s with zero point 0, and the offset beta as a float (it is
        real-valued: -beta / s is not an integer zero point)."""
        return IntegerForm(
            self.s.detach().float(), self.n, self.p, offset=float(self.beta.detach())
        )

    def _codes(self) -> torch.Tensor:
        return torch.arange(self.n, self.p + 1, device=self.s.device, dtype=torch.float32)

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        return self.s.detach() * self._codes() + self.beta.detach()

    def thresholds(self, x: torch.Tensor) -> torch.Tensor:
        return self.s.detach() * (self._codes()[:-1] + 0.5) + self.beta.detach()

    def code_centre(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.s.detach() * codes + self.beta.detach()
