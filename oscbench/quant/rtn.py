"""Round-to-nearest uniform quantizer: post-training quantization (PTQ), cross-bit
evaluation, and the grid of the oscillation regulariser (Wenshoj, Pepin, Selvan, TMLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    QUANTIZED,
    QUANTIZERS,
    UNIFORM,
    IntegerForm,
    Quantizer,
    UniformGrid,
    channel_view,
    straight_through,
)


@dataclass
class RTNConfig:
    per_channel: bool  # Wenshoj et al.: one scale per tensor
    scale_grad: bool  # the scale max|w|/p takes gradient (Wenshoj et al.'s code) or not


@QUANTIZERS.register("rtn", RTNConfig)
class RTNQuantizer(Quantizer):
    """Symmetric: s = max|w| / (2^(b-1) - 1) from the tensor itself, codes in
    [-(2^(b-1)-1), 2^(b-1)-1] (2 bits is ternary), round to nearest; the straight-through
    estimator is the identity. Weights only.

    `scale_grad`: the scale takes gradient too (through each tensor's largest-magnitude
    weight), as in Wenshoj et al.'s code (saintslab/osc_reg, `osciquant/quantizers.py`:
    `UniformQuantizer`, RoundSTE(w / s) * s with s not detached); off, s is detached."""

    signed = True
    capabilities = frozenset({QUANTIZED})
    deploy = UNIFORM

    def __init__(self, cfg: RTNConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.per_channel = cfg.per_channel
        self.scale_grad = cfg.scale_grad
        self.p = 2 ** (bits - 1) - 1

    def scale(self, w: torch.Tensor, detach: bool = True) -> torch.Tensor:
        a = (w.detach() if detach else w).abs()
        m = a.flatten(1).amax(dim=1) if self.per_channel else a.amax()
        return channel_view(m.clamp_min(1e-12) / self.p, w, self.per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.scale_grad:
            s = self.scale(w, detach=False)
            t = w / s
            return straight_through(torch.round(t), t) * s
        s = self.scale(w)
        return straight_through(torch.clamp(torch.round(w.detach() / s), -self.p, self.p) * s, w)

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / self.scale(w)), -self.p, self.p)

    def grid(self, w: torch.Tensor) -> UniformGrid:
        return UniformGrid(self.scale(w), -self.p, self.p)

    def integer_form(self, w: torch.Tensor | None) -> IntegerForm:
        return IntegerForm(
            self.scale(w).flatten(), -self.p, self.p, 0 if self.per_channel else None
        )
