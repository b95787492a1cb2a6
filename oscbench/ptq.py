"""Post-training quantization (round to nearest), cross-bit evaluation, and the
end-of-training histogram of latent-weight distance to the nearest threshold."""

from __future__ import annotations

import copy

import torch
from torch import nn

from oscbench.config import TrainerConfig
from oscbench.data import Data
from oscbench.quant import QuantPlan, quantize_model, quantized_layers
from oscbench.quant.base import Quantizer, clip_to_grid
from oscbench.quant.rtn import RTNQuantizer
from oscbench.train import evaluate, reestimate_bn

DIST_BINS = 20  # over [0, 0.5] step: inside the grid a weight is at most half a step away


def _rtn(bits: int, channels: int | None, is_weight: bool) -> Quantizer | None:
    return RTNQuantizer(bits, per_channel=False) if is_weight else None


def with_weight_bits(model: nn.Module, bits: int, first_last_bits: int) -> nn.Module:
    """A copy of `model` whose weights are rounded to nearest at `bits` (per tensor,
    s = max|w| / (2^(b-1) - 1)); the ends at `first_last_bits`. A full-precision model gets
    weight-only PTQ; a QAT model keeps its trained activation quantizers."""
    m = copy.deepcopy(model)
    layers = list(quantized_layers(m))
    if not layers:
        return quantize_model(m, _rtn, lambda *a: None, QuantPlan(bits, bits, first_last_bits))
    for _, layer in layers:
        layer.weight_quantizer = RTNQuantizer(
            first_last_bits if layer.is_first_or_last else bits, per_channel=False
        )
        layer.tracker = None
    return m


def cross_bit_accuracy(
    model: nn.Module, data: Data, bits: list[int], first_last_bits: int, cfg: TrainerConfig
) -> dict[str, float]:
    """`acc@Nbit` for each N: weights rounded to nearest at N bits, BN statistics
    re-estimated as for the main result (trainer.bn_reestimate_batches)."""
    out = {}
    for b in sorted(set(bits)):
        q = with_weight_bits(model, b, first_last_bits)
        reestimate_bn(q, data, cfg.bn_reestimate_batches, cfg.batch_size)
        out[f"acc@{b}bit"] = evaluate(q, data, cfg.eval_batch_size)["acc"]
    return out


@torch.no_grad()
def threshold_distance_histogram(model: nn.Module, bits: int, first_last_bits: int) -> dict:
    """Histogram of |w - nearest threshold| / step over the low-bit layers' latent weights
    (the 8-bit ends excluded), on each layer's own grid, or for a full-precision model on
    the round-to-nearest grid at `bits`. The last bin collects weights beyond the grid.
    Also the mean distance of latent weights, clipped to the grid's range as dampening
    does, to their quantized value, in steps."""
    layers = [m for _, m in quantized_layers(model) if not m.is_first_or_last]
    if not layers:
        layers = [
            m
            for _, m in quantized_layers(with_weight_bits(model, bits, first_last_bits))
            if not m.is_first_or_last
        ]
    dists, to_level = [], []
    for m in layers:
        q, w = m.weight_quantizer, m.weight
        step = q.step(w)
        dists.append((q.threshold_distance(w) / step).flatten().float())
        to_level.append(((q(w) - clip_to_grid(q, w)).abs() / step).flatten().float())
    dists = torch.cat(dists)
    edges = torch.linspace(0, 0.5, DIST_BINS + 1)
    counts = torch.histc(dists.clamp(max=0.5).cpu(), bins=DIST_BINS, min=0.0, max=0.5)
    beyond = int((dists > 0.5).sum())
    counts[-1] -= beyond
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in counts] + [beyond],
        "near_share": float((dists <= 0.1).float().mean()),  # within 0.1 step of a threshold
        "mean": float(dists.clamp(max=0.5).mean()),
        "mean_to_level": float(torch.cat(to_level).mean()),  # |clip(w) - q(w)| / step
    }
