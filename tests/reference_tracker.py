"""Today's per-layer tracker of a whole model, as it was before the flat one
(`oscbench.oscillation.tracker.OscillationTracker`, issue 26): one `LayerTracker` per layer,
each updated on its own. tests/test_tracker.py runs every preset with both and compares
them bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from oscbench.oscillation.tracker import (
    LayerTracker,
    Movement,
    TrackerConfig,
    level_distance,
    on_level,
    summarise,
    tracked_layers,
)
from oscbench.quant.modules import QuantizedLayer


def placed(layer: QuantizedLayer) -> dict[str, float]:
    """The layer's share of weights on a level (PARQ's relative_quantized_frac)."""
    w = layer.quantizer_input()
    return {"on_level_share": on_level(layer.weight_quantizer, w).item() / w.numel()}


class OscillationTracker(nn.Module):
    """The measurement of a whole model: one `LayerTracker` per tracked quantized layer
    (the 8-bit first and last ones only with `track_first_last`). Built by the run and
    handed to the loop, which calls `update` once per optimizer step, and to the policies
    that read it (`tracked()`, `step_share()`); its state is saved with the run's
    checkpoints. Each layer also has a `Movement` (d_Q / d_w)."""

    def __init__(self, model: nn.Module, cfg: TrackerConfig, total_steps: int) -> None:
        super().__init__()
        self.momentum = cfg.effective_momentum(total_steps)
        self.threshold = cfg.threshold
        self.names, self.layers = tracked_layers(model, cfg)  # the layers: not submodules
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
                codes = q.to_int(w)
                delta = state.update(codes)
                move.update(w, level_distance(q, w, codes, delta))

    def layer_mask(self, layers: list[QuantizedLayer]) -> torch.Tensor:
        chosen = {id(layer) for layer in layers}
        return torch.tensor([id(layer) in chosen for layer in self.layers])

    def step_share(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The share of tracked weights (of the layers in `mask`; all by default) whose code
        changed in the last update, as a device scalar."""
        mask = [True] * len(self.layers) if mask is None else mask.tolist()
        chosen = [
            (layer, s) for layer, s, m in zip(self.layers, self.states, mask, strict=True) if m
        ]
        total = sum(layer.weight.numel() for layer, _ in chosen)
        return sum(s.switches for _, s in chosen) / max(total, 1)

    def stats(self, threshold: float | None = None) -> dict | None:
        """Epoch metrics per layer and over the model (weighted by weight count; the model's
        d_Q / d_w is the ratio of its sums), and a histogram of per-weight oscillation counts
        so far; resets the epoch counters. None when no layer is tracked."""
        threshold = self.threshold if threshold is None else threshold
        states = zip(self.names, self.layers, self.states, self.moves, strict=True)
        layers = {
            name: s.epoch_stats(threshold) | m.epoch_stats() | placed(layer)
            for name, layer, s, m in states
        }
        if not layers:
            return None
        return summarise(layers, torch.cat([s.count.flatten() for s in self.states]))

    def counts(self) -> torch.Tensor:
        """Per-weight oscillation counts of every tracked weight, flattened (histograms)."""
        return torch.cat([s.count.flatten().long() for s in self.states]).cpu()
