"""StatsQ: statistics-based weight quantizer of OFQ (Liu, Liu, Cheng, ICML 2023,
"Oscillation-free Quantization for Low-bit Vision Transformers", arXiv:2302.02210)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    Quantizer,
    channel_view,
    straight_through,
    uniform_threshold_distance,
)

CLIP_EPS = 1e-6  # OFQ clamps w/s to [-1, 1 - 1e-6] so the top bin stays in range


@dataclass
class StatsQConfig:
    """StatsQ has no options beyond the bit-width; its scale is a statistic, not learned."""


class StatsQQuantizer(Quantizer):
    """Per output row: s = 2 mean|w| (recomputed every forward, detached); mid-rise grid
    without a zero level, n2 = 2^(b-1): w_c = clamp(w/s, -1, 1 - 1e-6),
    k = round(n2 w_c - 0.5) in {-n2..n2-1}, w_q = s (k + 0.5) / n2. At 2 bits the levels are
    {-1.5, -0.5, 0.5, 1.5} mean|w|. The straight-through estimator is the identity (no clip
    mask), as in OFQ's code. Weights only; the scale takes no gradient.
    """

    signed = True
    per_channel = True

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.n2 = 2 ** (bits - 1)

    def init_from(self, x: torch.Tensor) -> None:
        self.ready = True  # nothing to learn: the scale is recomputed from w every forward

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

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        """Levels per output row of w, shape (rows, 2^b)."""
        k = torch.arange(-self.n2, self.n2, device=w.device, dtype=w.dtype) + 0.5
        return self.scale(w).flatten(1) * k / self.n2

    def thresholds(self, w: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1 - self.n2, self.n2, device=w.device, dtype=w.dtype)
        return self.scale(w).flatten(1) * k / self.n2

    def step(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale(w) / self.n2

    def threshold_distance(self, w: torch.Tensor) -> torch.Tensor:
        return uniform_threshold_distance(w.detach(), self.step(w), 0.0, 1 - self.n2, self.n2 - 1)
