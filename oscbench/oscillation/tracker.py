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
are powers of two that rarely move, so there the two agree); on uneven levels (PARQ's LSBQ)
it is the distance between the two codes' current levels (`level_distance`).

Per layer and epoch, at its end, PARQ's `relative_quantized_frac` (Jin et al., ICML 2025;
facebookresearch/parq at 36bae00c, `parq/optim/quantopt.py`: `_count_quantized_params`): the
share of the weights the quantizer reads that lie on a level, within float32's machine epsilon
(an absolute distance, as there). A straight-through method's latent weights almost never do;
PARQ's proximal map puts its weights there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.base import Quantizer
from oscbench.quant.modules import QuantizedLayer, quantized_layers
from oscbench.registry import check

COUNT_MAX = torch.iinfo(torch.int16).max
SATURATE_EVERY = 1024  # counts rise by at most one a step: clamping this often keeps int16 safe
ON_LEVEL_EPS = torch.finfo(torch.float32).eps  # PARQ's tolerance for a weight on a level


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


def _saturate(count: torch.Tensor, steps: int) -> int:
    """Clamps the oscillation counts every SATURATE_EVERY updates; returns steps + 1."""
    if steps % SATURATE_EVERY == 0:
        count.clamp_(max=COUNT_MAX - SATURATE_EVERY)
    return steps + 1


def advance(
    state: LayerTracker | LayerView, new: torch.Tensor, momentum: float, wide: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update of the per-weight state in `state`'s buffers `code`, `direction`, `freq`
    and `count` from the new int8 codes (`code` is left to the caller); returns the code
    changes (int16 when `wide`), their signs and the oscillation mask (int8 0/1)."""
    delta = torch.sub(new.to(torch.int16) if wide else new, state.code)
    direction = delta.sign().to(torch.int8)
    # Branch-free int8 arithmetic (a `where` on a random mask is ~10x slower on CPUs).
    # Directions are -1 (0xFF), 0 or 1: a reversal is exactly direction ^ last == -2.
    osc = torch.bitwise_xor(direction, state.direction).eq_(-2)  # int8 0/1
    state.freq.mul_(1 - momentum).add_(osc, alpha=momentum)
    state.count.add_(osc)
    # last switch direction: kept where direction == 0 (mask |d| - 1 = 0xFF), else d
    state.direction.bitwise_and_(direction.abs().sub_(1)).bitwise_or_(direction)
    return delta, direction, osc


def stuck(state: LayerTracker | OscillationTracker) -> torch.Tensor:
    """The weights that never left their level since the epoch's start (`epoch_code`,
    `epoch_count`): the same code, and no reversal (returning to a code takes one, and each
    adds to `count`); a count the saturation may have clamped (`_saturate`) counts as moved."""
    return (
        state.code.eq(state.epoch_code)
        & state.count.eq(state.epoch_count)
        & state.epoch_count.lt(COUNT_MAX - SATURATE_EVERY)
    )


def on_level(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """How many elements of w lie within float32's epsilon of the level of their code (a
    device scalar; `relative_quantized_frac` in the module docstring)."""
    centre = q.code_centre(q.to_int(w), w)
    return (w.detach() - centre).abs().le(ON_LEVEL_EPS).sum()


def start_epoch(state: LayerTracker | OscillationTracker) -> None:
    state.epoch_code.copy_(state.code)
    state.epoch_count.copy_(state.count)


class LayerTracker(nn.Module):
    """State of one quantized weight tensor, all in buffers (saved with the tracker).

    8 bytes per weight: int8 last code, int8 last switch direction, float32 frequency EMA,
    int16 oscillation count (saturating between 31743 and 32767); 3 more for the code and
    count at the epoch's start (`stuck`; not saved: a checkpoint is an epoch's end). Epoch
    counters and the last update's switch count (`switches`) are device scalars, so an
    update never synchronises with the host. Codes of more than 7 bits (`wide`) are
    differenced in int16, so that -128 -> 127 cannot overflow.
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
        self.register_buffer("epoch_code", self.code.clone(), persistent=False)
        self.register_buffer("epoch_count", self.count.clone(), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = 0  # clamp the loaded counts on the next update
        start_epoch(self)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Record the codes after one optimizer step; returns the change of each code (int8,
        int16 when wide). Ignored outside training mode (returns None)."""
        if not self.training:
            return None
        self._steps = _saturate(self.count, self._steps)
        new = codes.to(torch.int8, copy=True)  # becomes the state: never the caller's tensor
        delta, direction, osc = advance(self, new, self.momentum, self.wide)
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
            "stuck_share": int(stuck(self).sum()) / self.freq.numel(),
        }
        self.epoch_switches.zero_()
        self.epoch_oscillations.zero_()
        start_epoch(self)
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
    def update(self, weight: torch.Tensor, dq: torch.Tensor) -> None:
        """`dq`: how far the quantized weights moved in the step (`level_distance`)."""
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


def code_distance(delta: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    """Σ |code change| x the level spacing: a scalar, or one per output channel (summed per
    channel first)."""
    moved = delta.abs()
    if spacing.dim():
        return torch.dot(moved.flatten(1).sum(1, dtype=torch.float32), spacing.float())
    return moved.sum(dtype=torch.float32) * spacing


def level_distance(
    q: Quantizer, w: torch.Tensor, codes: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """How far the quantized values of w moved in one step (codes: after it; delta: its
    code changes), summed: `code_distance` on evenly spaced levels, and on uneven ones
    (`Quantizer.uneven`: PARQ's LSBQ, a `LevelGrid`) |level(code) - level(code - change)|
    per weight."""
    if q.uneven:
        grid = q.grid(w)
        moved = grid.code_centre(codes) - grid.code_centre(codes - delta)
        return moved.abs().sum(dtype=torch.float32)
    return code_distance(delta, level_spacing(q.levels(w)))


HIST_MAX = 20  # per-epoch histogram of oscillations so far: 0, 1, ..., 19, >= 20


def summarise(layers: dict[str, dict], counts: torch.Tensor) -> dict:
    """The model's epoch metrics from its layers' (weighted by weight count; the model's
    d_Q / d_w is the ratio of its sums), with a histogram of the per-weight oscillation
    `counts` so far, and the layers' own."""
    total = sum(s["numel"] for s in layers.values())
    dq = sum(s["dq"] for s in layers.values())
    dw = sum(s["dw"] for s in layers.values())
    return {
        "count_hist": torch.bincount(
            counts.long().clamp(max=HIST_MAX), minlength=HIST_MAX + 1
        ).tolist(),
        "osc_share": sum(s["osc_share"] * s["numel"] for s in layers.values()) / total,
        "mean_freq": sum(s["mean_freq"] * s["numel"] for s in layers.values()) / total,
        "stuck_share": sum(s["stuck_share"] * s["numel"] for s in layers.values()) / total,
        "on_level_share": sum(s["on_level_share"] * s["numel"] for s in layers.values()) / total,
        "crossings": sum(s["crossings"] for s in layers.values()),
        "oscillations": sum(s["oscillations"] for s in layers.values()),
        "dq": dq,
        "dw": dw,
        "dq_dw": dq / dw if dw > 0 else 0.0,
        "tracked_weights": total,
        "layers": layers,
    }


def tracked_layers(model: nn.Module, cfg: TrackerConfig) -> tuple[list[str], list[QuantizedLayer]]:
    """The names and the quantized layers of `model` that are tracked: the 8-bit first and
    last ones only with `track_first_last`."""
    found = [
        (name, layer)
        for name, layer in quantized_layers(model)
        if cfg.track_first_last or not layer.is_first_or_last
    ]
    return [name for name, _ in found], [layer for _, layer in found]


class LayerView:
    """A span of the flat state, shaped (views into the tracker's buffers, which are updated
    in place): one layer's is what policies read of it (`code`, `freq`, `momentum`);
    `update` advances a span of several layers at once."""

    def __init__(self, tracker: OscillationTracker, start: int, shape: torch.Size) -> None:
        self.tracker, self.start, self.shape = tracker, start, shape

    def _view(self, name: str) -> torch.Tensor:
        flat = getattr(self.tracker, name)
        return flat[self.start : self.start + self.shape.numel()].view(self.shape)

    code = property(lambda self: self._view("code"))
    direction = property(lambda self: self._view("direction"))
    freq = property(lambda self: self._view("freq"))
    count = property(lambda self: self._view("count"))
    momentum = property(lambda self: self.tracker.momentum)


class OscillationTracker(nn.Module):
    """The measurement of a whole model: the per-weight state (`LayerTracker`'s, 8 bytes a
    weight, and 3 more for the code and count at the epoch's start) of every tracked
    quantized layer (the 8-bit first and last ones only with `track_first_last`) in one
    flat buffer each, so that on a GPU an update advances every
    layer's state in a few kernels, not a dozen per layer (launches cost more there than
    the arithmetic; `update`).
    Per layer remain its codes (`Quantizer.to_int`, written into the flat buffer), its
    counts and its `Movement` (d_Q / d_w). Built by the run and handed to the loop, which
    calls `update` once per optimizer step, and to the policies that read it (`tracked()`,
    `step_share()`); its state is saved with the run's checkpoints. The numbers are
    `LayerTracker`'s per layer, bit for bit."""

    def __init__(self, model: nn.Module, cfg: TrackerConfig, total_steps: int) -> None:
        super().__init__()
        self.momentum = cfg.effective_momentum(total_steps)
        self.threshold = cfg.threshold  # what `stats` counts as oscillating unless told
        self.names, self.layers = tracked_layers(model, cfg)  # the layers: not submodules
        self.wide = any(layer.weight_quantizer.bits > 7 for layer in self.layers)
        sizes = [layer.weight.numel() for layer in self.layers]
        self.total = sum(sizes)
        ends = list(itertools.accumulate(sizes))
        self.bounds = [(end - n, end) for end, n in zip(ends, sizes, strict=True)]
        self.views = [
            LayerView(self, a, layer.weight.shape)
            for (a, _), layer in zip(self.bounds, self.layers, strict=True)
        ]
        device = self.layers[0].weight.device if self.layers else torch.device("cpu")
        codes = (
            torch.cat(
                [
                    layer.weight_quantizer.to_int(layer.quantizer_input()).flatten()
                    for layer in self.layers
                ]
            )
            if self.layers
            else torch.zeros(0)
        )
        self._steps = 0  # since construction or load; the first update clamps the counts
        self.register_buffer("code", codes.to(device=device, dtype=torch.int8))
        self.register_buffer("direction", torch.zeros_like(self.code))
        self.register_buffer("freq", torch.zeros_like(self.code, dtype=torch.float32))
        self.register_buffer("count", torch.zeros_like(self.code, dtype=torch.int16))
        layers = len(self.layers)
        self.register_buffer("switches", torch.zeros(layers, dtype=torch.int64, device=device))
        self.register_buffer(
            "sizes", torch.tensor(sizes, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "epoch_switches", torch.zeros(layers, dtype=torch.int64, device=device)
        )
        self.register_buffer(
            "epoch_oscillations", torch.zeros(layers, dtype=torch.int64, device=device)
        )
        self.register_buffer("epoch_code", self.code.clone(), persistent=False)
        self.register_buffer("epoch_count", self.count.clone(), persistent=False)
        self.moves = nn.ModuleList(Movement(layer.quantizer_input()) for layer in self.layers)
        self.groups = [[i] for i in range(len(self.layers))]  # a CPU's: layer by layer
        if device.type == "cuda":
            self.in_one_span()

    def in_one_span(self) -> None:
        """Advance every layer's state in one span from now on: a GPU's way (`update`)."""
        self.groups = [list(range(len(self.layers)))]

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = 0  # clamp the loaded counts on the next update
        start_epoch(self)

    def tracked(self) -> list[tuple[QuantizedLayer, LayerView]]:
        return list(zip(self.layers, self.views, strict=True))

    @torch.no_grad()
    def update(self) -> None:
        """Once per optimizer step: feed each layer's current integer codes (evaluating a
        model never counts as a step: nothing happens when the layers are not training).

        The state advances in `groups` of consecutive layers, each one span of the flat
        buffers: on a GPU all layers at once (a few launches), on a CPU layer by layer, so
        that each pass finds the layer's codes still in cache (resnet18-CIFAR: 25 ms an
        update, against 35 ms in one span). The numbers are the same either way."""
        if not self.layers or not all(layer.training for layer in self.layers):
            return
        self._steps = _saturate(self.count, self._steps)
        switches, oscillations = [], []
        for group in self.groups:
            start, end = self.bounds[group[0]][0], self.bounds[group[-1]][1]
            new = self.code.new_empty(end - start)
            for i in group:
                (a, b), layer = self.bounds[i], self.layers[i]
                codes = layer.weight_quantizer.to_int(layer.quantizer_input())
                new[a - start : b - start].view(layer.weight.shape).copy_(codes)
            span = LayerView(self, start, torch.Size([end - start]))
            delta, direction, osc = advance(span, new, self.momentum, self.wide)
            span.code.copy_(new)
            for i in group:
                (a, b), layer = self.bounds[i], self.layers[i]
                q, w = layer.weight_quantizer, layer.quantizer_input()
                a, b = a - start, b - start
                switches.append(direction[a:b].count_nonzero())
                oscillations.append(osc[a:b].count_nonzero())
                codes, change = new[a:b].view(w.shape), delta[a:b].view(w.shape)
                self.moves[i].update(w, level_distance(q, w, codes, change))
        switches = torch.stack(switches)
        self.switches.copy_(switches)
        self.epoch_switches.add_(switches)
        self.epoch_oscillations.add_(torch.stack(oscillations))

    def layer_mask(self, layers: list[QuantizedLayer]) -> torch.Tensor:
        """1 for each of `layers` among the tracked ones, else 0 (for `step_share`)."""
        chosen = {id(layer) for layer in layers}
        return torch.tensor(
            [float(id(layer) in chosen) for layer in self.layers], device=self.sizes.device
        )

    def step_share(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The share of tracked weights (of the layers in `mask`, from `layer_mask`; all by
        default) whose code changed in the last update, as a device scalar (reading it does
        not synchronise with the host)."""
        if mask is None:
            return self.switches.sum() / max(self.total, 1)
        return (self.switches * mask).sum() / (self.sizes * mask).sum().clamp_min(1)

    @torch.no_grad()
    def stats(self, threshold: float | None = None) -> dict | None:
        """Epoch metrics per layer and over the model (`summarise`; oscillating: frequency
        above `threshold`, default `oscillation.threshold`), with the share of weights that
        never left their level in the epoch (`stuck_share`); resets the epoch counters. None
        when no layer is tracked."""
        if not self.layers:
            return None
        threshold = self.threshold if threshold is None else threshold
        switches, oscillations = self.epoch_switches.tolist(), self.epoch_oscillations.tolist()
        self.epoch_switches.zero_()
        self.epoch_oscillations.zero_()
        still = stuck(self)
        held = torch.stack([still[a:b].sum() for a, b in self.bounds]).tolist()
        placed = torch.stack(
            [on_level(m.weight_quantizer, m.quantizer_input()) for m in self.layers]
        ).tolist()
        start_epoch(self)
        layers = {
            name: {
                "numel": view.shape.numel(),
                "osc_share": (view.freq > threshold).float().mean().item(),
                "mean_freq": view.freq.mean().item(),
                "crossings": switches[i],
                "oscillations": oscillations[i],
                "stuck_share": held[i] / view.shape.numel(),
                "on_level_share": placed[i] / view.shape.numel(),
            }
            | move.epoch_stats()
            for i, (name, view, move) in enumerate(
                zip(self.names, self.views, self.moves, strict=True)
            )
        }
        return summarise(layers, self.count)

    def counts(self) -> torch.Tensor:
        """Per-weight oscillation counts of every tracked weight, flattened (histograms)."""
        return self.count.long().cpu()
