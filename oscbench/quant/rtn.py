"""Round-to-nearest uniform quantizer: post-training quantization (PTQ), cross-bit
evaluation, and the grid of the oscillation regulariser (Wenshoj, Pepin, Selvan, TMLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    Quantizer,
    channel_view,
    straight_through,
    uniform_threshold_distance,
)


@dataclass
class RTNConfig:
    per_channel: bool  # Wenshoj et al.: one scale per tensor


class RTNQuantizer(Quantizer):
    """Symmetric: s = max|w| / (2^(b-1) - 1) from the tensor itself, codes in
    [-(2^(b-1)-1), 2^(b-1)-1] (2 bits is ternary), round to nearest; the straight-through
    estimator is the identity. Weights only.

    `scale_grad`: the scale takes gradient too (through each tensor's largest-magnitude
    weight), as in Wenshoj et al.'s code (saintslab/osc_reg, `osciquant/quantizers.py`:
    `UniformQuantizer`, RoundSTE(w / s) * s with s not detached); off, s is detached."""

    signed = True

    def __init__(self, bits: int, per_channel: bool, scale_grad: bool = False) -> None:
        super().__init__(bits)
        self.per_channel = per_channel
        self.scale_grad = scale_grad
        self.p = 2 ** (bits - 1) - 1

    def init_from(self, x: torch.Tensor) -> None:
        self.ready = True  # the scale is recomputed from the tensor on every call

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

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        k = torch.arange(-self.p, self.p + 1, device=w.device, dtype=w.dtype)
        s = self.scale(w)
        return (s.flatten(1) if self.per_channel else s.reshape(1)) * k

    def thresholds(self, w: torch.Tensor) -> torch.Tensor:
        lv = self.levels(w)
        return (lv[..., 1:] + lv[..., :-1]) / 2

    def step(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale(w)

    def threshold_distance(self, w: torch.Tensor) -> torch.Tensor:
        return uniform_threshold_distance(w.detach(), self.scale(w), 0.5, -self.p, self.p - 1)
