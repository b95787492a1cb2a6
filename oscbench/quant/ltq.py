"""LTQ: learnable non-uniform thresholds with uniform output levels (N2UQ), the activation
quantizer of AOQ.

Liu, Cheng, Zhou, Yang, Shen, "Nonuniform-to-Uniform Quantization: Towards Accurate
Quantization via Generalized Straight-Through Estimation", CVPR 2022; code
liuzechun/Nonuniform-to-Uniform-Quantization at 547a8d30, `resnet/resnet.py: LTQ`. AOQ's
copy: muzenc/AOQ at 79f36d2a, `AO_QAT/quan/quantizer.py: LTQ` (quantized_object "act").

With n = 2^b - 1 intervals a_0..a_(n-1) (learnable, each at least `eps`), a start b_0 and the
interval u = init_range / n: the input is first scaled, z = scale_in x; the backward
thresholds are b_(i+1) = b_i + a_i and the forward ones f_i = b_i + a_i / 2, the middle of
each interval. Forward: the code k = #{i : z > f_i} in 0..n, output scale_out k u (uniform
levels; here k (u scale_out), one scale, so that an integer runtime's DequantizeLinear
gives the same value, where the references multiply k u by scale_out: a last-bit
difference). Backward (the generalized straight-through estimator): the gradient of the
piecewise-linear k(z) ~ i + (z - b_i) / a_i on [b_i, b_(i+1)], constant (no gradient)
below b_0 and above b_n, times scale_out u; so x, scale_in, the intervals and the start
all learn through it, and scale_out through the output's value.

The two codes differ in three values, each a config value (conf/act_quantizer/ltq.yaml
holds N2UQ's; the AOQ recipe sets AOQ's): `learn_start` (N2UQ: the start is learnable;
AOQ: fixed at 0), `eps` (N2UQ 1e-3, AOQ 1e-6) and `scale_out` at start (N2UQ 1, AOQ 2).
Both start from a_i = u with `init_range` 2 and scale_in 1, without looking at data (the
calibration batch only marks the quantizer ready), as here. Where the references loop
over the n thresholds with torch.where, this evaluates the same function with one
bucketize and gathers (memory: a few tensors of the input's size, not n).

Deployed (`deploy` LOOKUP), the code is a multi-threshold, the count of the forward
thresholds below x scale_in (`threshold_form`), and the level a DequantizeLinear of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.base import (
    ACTIVATIONS,
    LOOKUP,
    QUANTIZERS,
    IntegerForm,
    Quantizer,
    ThresholdForm,
)
from oscbench.registry import check


@dataclass
class LTQConfig:
    init_range: float  # u n: the span of the output levels and of the first intervals (2)
    learn_start: bool  # N2UQ: true; AOQ: false (the start stays at 0)
    eps: float  # the smallest interval (N2UQ: 1e-3; AOQ: 1e-6)
    scale_out: float  # the output scale at start (N2UQ: 1; AOQ: 2)

    def __post_init__(self) -> None:
        check(self.init_range > 0, "init_range", self.init_range, "> 0")
        check(self.eps > 0, "eps", self.eps, "> 0")
        check(self.scale_out > 0, "scale_out", self.scale_out, "> 0")


@QUANTIZERS.register("ltq", LTQConfig)
class LTQQuantizer(Quantizer):
    """Activations only (act_quantizer=ltq); unsigned codes 0..2^b - 1."""

    capabilities = frozenset({ACTIVATIONS})
    deploy = LOOKUP
    signed = False
    per_channel = False

    def __init__(self, cfg: LTQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.cfg = cfg
        self.levels_n = 2**bits - 1
        self.u = cfg.init_range / self.levels_n
        self.a = nn.Parameter(torch.full((self.levels_n,), self.u))
        self.start = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_start)
        self.scale_in = nn.Parameter(torch.ones(()))
        self.scale_out = nn.Parameter(torch.full((), cfg.scale_out))

    def _edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(intervals a clamped to eps, backward thresholds b_0..b_n, forward f_0..f_(n-1))."""
        a = torch.where(self.a > self.cfg.eps, self.a, self.cfg.eps)
        b = torch.cumsum(torch.cat([self.start.reshape(1), a]), 0)
        return a, b, b[:-1] + a / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        z = x.float() * self.scale_in
        a, b, f = self._edges()
        code = torch.bucketize(z.detach(), f.detach()).float()  # #{i : z > f_i}
        seg = torch.bucketize(z.detach(), b[:-1].detach()) - 1  # the interval z lies in
        inside = (seg >= 0) & (z.detach() <= b[-1].detach())
        j = seg.clamp_min(0)
        ramp = (z - b[j]) / a[j] + j  # k(z) inside [b_0, b_n]: i + (z - b_i) / a_i
        ramp = torch.where(inside, ramp, ramp.detach())
        k = code + (ramp - ramp.detach())  # the code forward, the ramp's gradient backward
        return k * (self.u * self.scale_out)

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x.float() * self.scale_in, self._edges()[2]).float()

    def integer_form(self, x: torch.Tensor | None) -> IntegerForm:
        """The output levels: codes 0..n at the step u scale_out."""
        return IntegerForm((self.u * self.scale_out).detach().float(), 0, self.levels_n)

    def threshold_form(self) -> ThresholdForm:
        """The code: the number of forward thresholds f_i below x scale_in."""
        scale_in = self.scale_in.detach().float()
        return ThresholdForm(scale_in, self._edges()[2].detach(), self.integer_form(None))

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.levels_n + 1, device=self.a.device, dtype=torch.float32)
        return k * (self.u * self.scale_out.detach())

    def thresholds(self, x: torch.Tensor) -> torch.Tensor:
        """Where the code steps up, in the input's units (not between the output levels:
        LTQ maps its input onto levels of another scale)."""
        return self._edges()[2].detach() / self.scale_in.detach()

    def code_centre(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return codes * (self.u * self.scale_out.detach())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learn_start={self.cfg.learn_start}"
