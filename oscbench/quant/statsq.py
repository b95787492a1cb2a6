"""StatsQ: statistics-based weight quantizer of OFQ (Liu, Liu, Cheng, ICML 2023,
"Oscillation-free Quantization for Low-bit Vision Transformers", arXiv:2302.02210; code:
nbasyl/OFQ, `src/quantization/quantizer/statsq.py`: `StatsQuantizer`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    EXTRA_BIT,
    QUANTIZERS,
    IntegerForm,
    Quantizer,
    UniformGrid,
    channel_view,
    straight_through,
)

CLIP_EPS = 1e-6  # OFQ clamps w/s to [-1, 1 - 1e-6] so the top bin stays in range


@dataclass
class StatsQConfig:
    """StatsQ has no options beyond the bit-width; its scale is a statistic, not learned."""


@QUANTIZERS.register("statsq", StatsQConfig)
class StatsQQuantizer(Quantizer):
    """Per output row: s = 2 mean|w| (recomputed every forward, detached); mid-rise grid
    without a zero level, n2 = 2^(b-1): w_c = clamp(w/s, -1, 1 - 1e-6),
    k = round(n2 w_c - 0.5) in {-n2..n2-1}, w_q = s (k + 0.5) / n2. At 2 bits the levels are
    {-1.5, -0.5, 0.5, 1.5} mean|w|. The straight-through estimator is the identity (no clip
    mask), as in OFQ's code. Weights only; the scale takes no gradient.
    """

    signed = True
    per_channel = True
    deploy = EXTRA_BIT

    def __init__(self, cfg: StatsQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.n2 = 2 ** (bits - 1)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """s = 2 mean|w| per output row, detached, shaped to broadcast over w."""
        s = 2 * w.detach().abs().flatten(1).mean(dim=1).clamp_min(1e-12)
        return channel_view(s, w, True)

    def _codes(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        wc = torch.clamp(w.detach() / s, -1.0, 1.0 - CLIP_EPS)
        return torch.round(self.n2 * wc - 0.5)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w)
        wq = s * (self._codes(w, s) + 0.5) / self.n2
        return straight_through(wq, w)

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        return self._codes(w, self.scale(w))

    def grid(self, w: torch.Tensor) -> UniformGrid:
        """Levels (k + 0.5) s / n2 for k = -n2..n2-1, thresholds at j s / n2."""
        return UniformGrid(self.scale(w) / self.n2, -self.n2, self.n2 - 1, offset=0.5)

    def integer_form(self, w: torch.Tensor | None) -> IntegerForm:
        """The level (k + 1/2) s / n2 is the odd integer 2k + 1 on the step s / (2 n2), a power
        of two's fraction of s, so both give the same float: codes -(2^b - 1)..2^b - 1."""
        top = 2 * self.n2 - 1
        return IntegerForm(self.scale(w).flatten() / (2 * self.n2), -top, top, axis=0)
