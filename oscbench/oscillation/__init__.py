"""Oscillation measurement (tracker) and the policies that act on oscillating weights."""

from __future__ import annotations

import torch
from torch import nn

from oscbench.oscillation.tracker import OscillationTracker, TrackerConfig
from oscbench.quant.modules import quantized_layers

__all__ = [
    "OscillationTracker",
    "TrackerConfig",
    "attach_trackers",
    "update_trackers",
    "model_stats",
    "oscillation_counts",
]


def attach_trackers(model: nn.Module, cfg: TrackerConfig, total_steps: int) -> int:
    """Give each tracked quantized layer a tracker; returns how many were attached."""
    m = cfg.effective_momentum(total_steps)
    attached = 0
    for _, layer in quantized_layers(model):
        if layer.is_first_or_last and not cfg.track_first_last:
            continue
        codes = layer.weight_quantizer.to_int(layer.weight)
        bits = layer.weight_quantizer.bits
        layer.tracker = OscillationTracker(codes, m, bits).to(layer.weight.device)
        attached += 1
    return attached


def _tracked(model: nn.Module):
    return [(n, m) for n, m in quantized_layers(model) if m.tracker is not None]


@torch.no_grad()
def update_trackers(model: nn.Module) -> None:
    """Once per optimizer step: feed each tracker its layer's current integer codes."""
    for _, layer in _tracked(model):
        layer.tracker.update(layer.weight_quantizer.to_int(layer.weight))


HIST_MAX = 20  # per-epoch histogram of oscillations so far: 0, 1, ..., 19, >= 20


def model_stats(model: nn.Module, threshold: float) -> dict | None:
    """Epoch metrics per layer and over the model (weighted by weight count), and a
    histogram of per-weight oscillation counts so far; resets the epoch counters. None when
    nothing is tracked (full precision)."""
    layers = {name: layer.tracker.epoch_stats(threshold) for name, layer in _tracked(model)}
    if not layers:
        return None
    total = sum(s["numel"] for s in layers.values())
    counts = torch.cat([layer.tracker.count.flatten() for _, layer in _tracked(model)])
    return {
        "count_hist": torch.bincount(
            counts.long().clamp(max=HIST_MAX), minlength=HIST_MAX + 1
        ).tolist(),
        "osc_share": sum(s["osc_share"] * s["numel"] for s in layers.values()) / total,
        "mean_freq": sum(s["mean_freq"] * s["numel"] for s in layers.values()) / total,
        "crossings": sum(s["crossings"] for s in layers.values()),
        "oscillations": sum(s["oscillations"] for s in layers.values()),
        "tracked_weights": total,
        "layers": layers,
    }


def oscillation_counts(model: nn.Module) -> torch.Tensor | None:
    """Per-weight oscillation counts of every tracked weight, flattened (for histograms)."""
    counts = [layer.tracker.count.flatten().long() for _, layer in _tracked(model)]
    return torch.cat(counts).cpu() if counts else None


from oscbench.oscillation import aoq_schedule, cga, dampen, freeze, osc_reg  # noqa: E402,F401  (register)
