"""Oscillation tracking in the integer domain (Nagel et al., ICML 2022, arXiv:2203.11086).

Per weight, once per optimizer step: delta = q_t - q_{t-1}; a *switch* (a threshold
crossing) is delta != 0; an *oscillation* is a switch whose direction is opposite to the
weight's previous switch (no time window; a weight's first switch never counts); the
oscillation frequency is the EMA f = m * osc + (1 - m) * f.

Per layer and epoch, also TetraJet's ratio d_Q / d_w (Chen et al., ICML 2025, "Oscillation-
Reduced MXFP4 Training for Vision Transformers"; thu-ml/TetraJet-MXFP4Training,
`quantization/Qoptimizers/Qengine_DeiT.py`: `BSRamping_calib_update_period`): d_w = sum over
steps and weights of |w_t - w_{t-1}| (latent movement), d_Q = the same sum of
|Q(w_t) - Q(w_{t-1})| (movement of the quantized weight). A weight that hovers at a
threshold moves its quantized value a whole level for a tiny latent step: a high ratio.
Here |Q(w_t) - Q(w_{t-1})| = |code change| x the level spacing of the current grid, so the
ratio counts level changes and not the drift of a learned step size (TetraJet's MXFP4 scales
are powers of two that rarely move, so there the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.modules import QuantizedLayer, quantized_layers
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
        check(0 < self.momentum <= 1, "momentum", self.momentum, "0 < m <= 1")
        check(
            self.window_fraction is None or 0 < self.window_fraction <= 1,
            "window_fraction",
            self.window_fraction,
            "null or 0 < x <= 1",
        )
        check(0 <= self.threshold < 1, "threshold", self.threshold, "0 <= x < 1")

    def effective_momentum(self, total_steps: int) -> float:
        """The paper's m, raised for short runs so that the EMA window spans at most
        `window_fraction` of training."""
        if self.window_fraction is None:
            return self.momentum
        return min(1.0, max(self.momentum, 1.0 / (self.window_fraction * max(total_steps, 1))))


class LayerTracker(nn.Module):
    """State of one quantized weight tensor, all in buffers (saved with the tracker).

    8 bytes per weight: int8 last code, int8 last switch direction, float32 frequency EMA,
    int16 oscillation count (saturating between 31743 and 32767). Epoch counters and the last
    update's switch count (`switches`) are device scalars, so an update never synchronises
    with the host. Codes of more than 7 bits (`wide`) are differenced in int16, so that
    -128 -> 127 cannot overflow.
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
        self.register_buffer("switches", codes.new_zeros((), dtype=torch.int64))  # last update's
        self.register_buffer("epoch_switches", codes.new_zeros((), dtype=torch.int64))
        self.register_buffer("epoch_oscillations", codes.new_zeros((), dtype=torch.int64))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = 0  # clamp the loaded counts on the next update

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Record the codes after one optimizer step; returns the change of each code (int8,
        int16 when wide). Ignored outside training mode (returns None)."""
        if not self.training:
            return None
        if self._steps % SATURATE_EVERY == 0:
            self.count.clamp_(max=COUNT_MAX - SATURATE_EVERY)
        self._steps += 1
        new = codes.to(torch.int8, copy=True)  # becomes the state: never the caller's tensor
        delta = torch.sub(new.to(torch.int16) if self.wide else new, self.code)
        direction = delta.sign().to(torch.int8)
        # Branch-free int8 arithmetic (a `where` on a random mask is ~10x slower on CPUs).
        # Directions are -1 (0xFF), 0 or 1: a reversal is exactly direction ^ last == -2.
        osc = torch.bitwise_xor(direction, self.direction).eq_(-2)  # int8 0/1
        self.freq.mul_(1 - self.momentum).add_(osc, alpha=self.momentum)
        self.count.add_(osc)
        # last switch direction: kept where direction == 0 (mask |d| - 1 = 0xFF), else d
        self.direction.bitwise_and_(direction.abs().sub_(1)).bitwise_or_(direction)
        self.code = new
        self.switches.copy_(direction.count_nonzero())
        self.epoch_switches.add_(self.switches)
        self.epoch_oscillations.add_(osc.count_nonzero())
        return delta

    @torch.no_grad()
    def epoch_stats(self, threshold: float) -> dict[str, float]:
        """Per-layer numbers for the epoch; resets the epoch counters."""
        stats = {
            "numel": self.freq.numel(),
            "osc_share": (self.freq > threshold).float().mean().item(),
            "mean_freq": self.freq.mean().item(),
            "crossings": int(self.epoch_switches.item()),
            "oscillations": int(self.epoch_oscillations.item()),
        }
        self.epoch_switches.zero_()
        self.epoch_oscillations.zero_()
        return stats


class Movement(nn.Module):
    """d_Q and d_w of one layer over the epoch (module docstring): a float32 copy of the
    latent weight (4 bytes per weight) and two device scalars (float64 sums)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("previous", weight.detach().float().clone())
        self.register_buffer("epoch_dq", weight.new_zeros((), dtype=torch.float64))
        self.register_buffer("epoch_dw", weight.new_zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, weight: torch.Tensor, delta: torch.Tensor, spacing: torch.Tensor) -> None:
        """`delta`: the step's code changes; `spacing`: the level spacing, a scalar or one
        per output channel."""
        moved = delta.abs()
        if spacing.dim():  # per channel: sum |code change| per channel first
            dq = torch.dot(moved.flatten(1).sum(1, dtype=torch.float32), spacing.float())
        else:
            dq = moved.sum(dtype=torch.float32) * spacing
        self.epoch_dq.add_(dq)
        self.epoch_dw.add_(
            torch.sub(weight.detach(), self.previous).abs_().sum()
        )  # 3x dist's speed
        self.previous.copy_(weight.detach())

    def epoch_stats(self) -> dict[str, float]:
        """dq, dw and dq_dw (0 when nothing moved) of the epoch; resets the sums."""
        dq, dw = self.epoch_dq.item(), self.epoch_dw.item()
        self.epoch_dq.zero_()
        self.epoch_dw.zero_()
        return {"dq": dq, "dw": dw, "dq_dw": dq / dw if dw > 0 else 0.0}


def level_spacing(levels: torch.Tensor) -> torch.Tensor:
    """Distance between neighbouring levels, from `Quantizer.levels` ((L,) or (C, L)): a
    distance, so positive also where a learned step went negative and reversed the grid."""
    return (levels[..., 1] - levels[..., 0]).detach().abs()


HIST_MAX = 20  # per-epoch histogram of oscillations so far: 0, 1, ..., 19, >= 20


class OscillationTracker(nn.Module):
    """The measurement of a whole model: one `LayerTracker` per tracked quantized layer
    (the 8-bit first and last ones only with `track_first_last`). Built by the run and
    handed to the loop, which calls `update` once per optimizer step, and to the policies
    that read it (`tracked()`, `step_share()`); its state is saved with the run's
    checkpoints. Each layer also has a `Movement` (d_Q / d_w)."""

    def __init__(self, model: nn.Module, cfg: TrackerConfig, total_steps: int) -> None:
        super().__init__()
        self.momentum = cfg.effective_momentum(total_steps)
        found = [
            (name, layer)
            for name, layer in quantized_layers(model)
            if cfg.track_first_last or not layer.is_first_or_last
        ]
        self.names = [name for name, _ in found]
        self.layers: list[QuantizedLayer] = [layer for _, layer in found]  # not submodules
        self.states = nn.ModuleList(
            LayerTracker(
                layer.weight_quantizer.to_int(layer.weight),
                self.momentum,
                layer.weight_quantizer.bits,
            ).to(layer.weight.device)
            for layer in self.layers
        )
        self.moves = nn.ModuleList(Movement(layer.weight) for layer in self.layers)
        self.total = sum(layer.weight.numel() for layer in self.layers)

    def tracked(self) -> list[tuple[QuantizedLayer, LayerTracker]]:
        return list(zip(self.layers, self.states, strict=True))

    @torch.no_grad()
    def update(self) -> None:
        """Once per optimizer step: feed each layer's current integer codes (layers in
        training mode only: evaluating a model never counts as a step)."""
        for layer, state, move in zip(self.layers, self.states, self.moves, strict=True):
            if layer.training:
                q, w = layer.weight_quantizer, layer.weight
                delta = state.update(q.to_int(w))
                move.update(w, delta, level_spacing(q.levels(w)))

    def step_share(self) -> torch.Tensor:
        """The share of tracked weights whose code changed in the last update, as a device
        scalar (reading it does not synchronise with the host)."""
        return sum(s.switches for s in self.states) / max(self.total, 1)

    def stats(self, threshold: float) -> dict | None:
        """Epoch metrics per layer and over the model (weighted by weight count; the model's
        d_Q / d_w is the ratio of its sums), and a histogram of per-weight oscillation counts
        so far; resets the epoch counters. None when no layer is tracked."""
        states = zip(self.names, self.states, self.moves, strict=True)
        layers = {name: s.epoch_stats(threshold) | m.epoch_stats() for name, s, m in states}
        if not layers:
            return None
        total = sum(s["numel"] for s in layers.values())
        dq = sum(s["dq"] for s in layers.values())
        dw = sum(s["dw"] for s in layers.values())
        counts = torch.cat([s.count.flatten() for s in self.states])
        return {
            "count_hist": torch.bincount(
                counts.long().clamp(max=HIST_MAX), minlength=HIST_MAX + 1
            ).tolist(),
            "osc_share": sum(s["osc_share"] * s["numel"] for s in layers.values()) / total,
            "mean_freq": sum(s["mean_freq"] * s["numel"] for s in layers.values()) / total,
            "crossings": sum(s["crossings"] for s in layers.values()),
            "oscillations": sum(s["oscillations"] for s in layers.values()),
            "dq": dq,
            "dw": dw,
            "dq_dw": dq / dw if dw > 0 else 0.0,
            "tracked_weights": total,
            "layers": layers,
        }

    def counts(self) -> torch.Tensor:
        """Per-weight oscillation counts of every tracked weight, flattened (histograms)."""
        return torch.cat([s.count.flatten().long() for s in self.states]).cpu()
