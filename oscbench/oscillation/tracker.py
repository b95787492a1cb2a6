"""Oscillation tracking in the integer domain (Nagel et al., ICML 2022, arXiv:2203.11086).

Per weight, once per optimizer step: delta = q_t - q_{t-1}; a *switch* (a threshold
crossing) is delta != 0; an *oscillation* is a switch whose direction is opposite to the
weight's previous switch (no time window; a weight's first switch never counts); the
oscillation frequency is the EMA f = m * osc + (1 - m) * f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.registry import check

COUNT_MAX = torch.iinfo(torch.int16).max
SATURATE_EVERY = 1024  # counts rise by at most one a step: clamping this often keeps int16 safe


@dataclass
class TrackerConfig:
    """`oscillation:` in conf/config.yaml."""

    momentum: float  # Nagel et al.: 0.001 on ImageNet (~10^5 steps)
    window_fraction: float | None  # short runs: m >= 1 / (window_fraction * total steps)
    threshold: float  # a weight "oscillates" when f > threshold
    track_first_last: bool  # Nagel et al. track only <= 4-bit layers, i.e. not the 8-bit ends

    def __post_init__(self) -> None:
        check(0 < self.momentum <= 1, "oscillation.momentum", self.momentum, "0 < m <= 1")
        check(
            self.window_fraction is None or 0 < self.window_fraction <= 1,
            "oscillation.window_fraction",
            self.window_fraction,
            "null or 0 < x <= 1",
        )
        check(0 <= self.threshold < 1, "oscillation.threshold", self.threshold, "0 <= x < 1")

    def effective_momentum(self, total_steps: int) -> float:
        """The paper's m, raised for short runs so that the EMA window spans at most
        `window_fraction` of training."""
        if self.window_fraction is None:
            return self.momentum
        return min(1.0, max(self.momentum, 1.0 / (self.window_fraction * max(total_steps, 1))))


class OscillationTracker(nn.Module):
    """State of one quantized weight tensor, all in buffers (saved with the model).

    8 bytes per weight: int8 last code, int8 last switch direction, float32 frequency EMA,
    int16 oscillation count (saturating between 31743 and 32767). Epoch counters are device
    scalars, so an update never synchronises with the host. Codes of more than 7 bits
    (`wide`) are differenced in int16, so that -128 -> 127 cannot overflow.
    """

    def __init__(self, codes: torch.Tensor, momentum: float, bits: int = 4) -> None:
        super().__init__()
        self.momentum = momentum
        self.wide = bits > 7
        self._steps = 0  # since construction or load; the first update clamps the counts
        self.register_buffer("code", codes.to(torch.int8, copy=True))
        self.register_buffer("direction", torch.zeros_like(codes, dtype=torch.int8))
        self.register_buffer("freq", torch.zeros_like(codes, dtype=torch.float32))
        self.register_buffer("count", torch.zeros_like(codes, dtype=torch.int16))
        self.register_buffer("epoch_switches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("epoch_oscillations", torch.zeros((), dtype=torch.int64))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = 0  # clamp the loaded counts on the next update

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Record the codes after one optimizer step. Ignored outside training mode."""
        if not self.training:
            return
        if self._steps % SATURATE_EVERY == 0:
            self.count.clamp_(max=COUNT_MAX - SATURATE_EVERY)
        self._steps += 1
        new = codes.to(torch.int8, copy=True)  # becomes the state: never the caller's tensor
        if self.wide:
            direction = torch.sub(new.to(torch.int16), self.code).sign_().to(torch.int8)
        else:
            direction = torch.sub(new, self.code).sign_()
        # Branch-free int8 arithmetic (a `where` on a random mask is ~10x slower on CPUs).
        # Directions are -1 (0xFF), 0 or 1: a reversal is exactly direction ^ last == -2.
        osc = torch.bitwise_xor(direction, self.direction).eq_(-2)  # int8 0/1
        self.freq.mul_(1 - self.momentum).add_(osc, alpha=self.momentum)
        self.count.add_(osc)
        # last switch direction: kept where direction == 0 (mask |d| - 1 = 0xFF), else d
        self.direction.bitwise_and_(direction.abs().sub_(1)).bitwise_or_(direction)
        self.code = new
        self.epoch_switches.add_(direction.count_nonzero())
        self.epoch_oscillations.add_(osc.count_nonzero())

    @torch.no_grad()
    def epoch_stats(self, threshold: float, reset: bool = True) -> dict[str, float]:
        """Per-layer numbers for the epoch; resets the epoch counters."""
        stats = {
            "numel": self.freq.numel(),
            "osc_share": (self.freq > threshold).float().mean().item(),
            "mean_freq": self.freq.mean().item(),
            "crossings": int(self.epoch_switches.item()),
            "oscillations": int(self.epoch_oscillations.item()),
        }
        if reset:
            self.epoch_switches.zero_()
            self.epoch_oscillations.zero_()
        return stats
