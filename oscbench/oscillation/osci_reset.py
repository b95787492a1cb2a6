"""OsciReset: put oscillating weights back at the centre of their bin, periodically.

TetraJet-v2 (Chen et al., "TetraJet-v2: Accurate NVFP4 Training for Large Language Models
with Oscillation Suppression and Outlier Control", arXiv:2510.27527); code
thu-ml/TetraJet-v2-NVFP4Training at ca5953f6: `olmo2-training/olmo/quantization_real/
oscillation_reset.py` (`quant_weight_dist_init_snapshots`, `quant_weight_dist_track`,
`fp4_elements_centralize_DistRatio`, `fp4_elements_centralize_BinEdge`), the schedule in
`calibrate.py: linear_oscillation_reset_with_mix`, defaults in `olmo/config.py:
OscillationPerturb_Config`, values in `configs/*/TJv2-mix_fp8-osci_reset.yaml`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, Policy, RunContext
from oscbench.quant.base import QUANTIZED
from oscbench.quant.modules import quantized_layers
from oscbench.records.console import warn
from oscbench.registry import check


@dataclass
class OsciResetConfig:
    detect: str  # ratio: d_Q/d_w over a window (TetraJet-v2's `distance_ratio`) | bin_edge |
    #              all: every low-bit weight (WinQ)
    start: float  # nothing before this share of training (their configs: 8000/12505,
    #               15000/25500, 35000/50500 steps, i.e. 0.59-0.69; code default 0)
    period: int  # steps between resets (`perturb_period`: 200 in the 70M/150M configs)
    track_steps: int  # ratio: steps over which d_Q and d_w are summed (`detect_DistRatio_iters`)
    ratio_threshold: float  # ratio: reset where d_Q/d_w >= this (code default 16; configs 8)
    edge_threshold: float  # bin_edge: reset where |w - centre| > this x bin width (0.495)
    strength: float  # a reset moves w this share of the way to its centre (1: TetraJet-v2;
    #                  WinQ: below 1)
    noise: float  # gradients at w + N(0, (noise x step)^2) from `start` on (0: none; WinQ > 0)

    def __post_init__(self) -> None:
        detectors = ("ratio", "bin_edge", "all")
        check(self.detect in detectors, "detect", self.detect, ", ".join(detectors))
        check(0 <= self.start < 1, "start", self.start, "0 <= x < 1")
        check(self.period >= 2, "period", self.period, ">= 2")
        check(
            self.detect != "ratio" or 0 < self.track_steps < self.period - 1,
            "track_steps",
            self.track_steps,
            "0 < x < period - 1",
        )
        check(self.ratio_threshold > 0, "ratio_threshold", self.ratio_threshold, "> 0")
        check(0 < self.edge_threshold < 0.5, "edge_threshold", self.edge_threshold, "0 < x < 0.5")
        check(0 < self.strength <= 1, "strength", self.strength, "0 < x <= 1")
        check(self.noise >= 0, "noise", self.noise, ">= 0")


@POLICIES.register("osci_reset", OsciResetConfig)
class OsciReset(Policy):
    """After optimizer step i (0-based; TetraJet-v2 calls its hook after each train step
    with `global_step - 1`), from step ceil(start T) on, in each of the low-bit quantized
    layers (not the 8-bit first and last ones):

    - detect=ratio: at i % period == 0 snapshot each weight w and its quantized value Q(w);
      at 1 <= i % period <= track_steps add |w - w_prev| to d_w and |Q(w) - Q(w_prev)| to
      d_Q per weight (Q as the forward computes it, on the step's own grid); at
      i % period == track_steps + 1 set every weight with d_Q/d_w >= ratio_threshold
      (d_w = 0: ratio 0) to the centre of its current bin, and drop the snapshots.
    - detect=bin_edge: at i % period == 0 set every weight farther than edge_threshold x
      the bin width (the step) from its bin's centre to that centre (beyond the grid: to
      the outermost level).

    - detect=all: at i % period == 0 every weight (WinQ's periodic reset).

    A reset sets w to w + strength (centre - w): strength 1 is TetraJet-v2's; below 1, the
    linear interpolation of the full-precision and the quantized weight of WinQ (Li et al.,
    "WinQ: Accelerating Quantization-Aware Training of Language Models Around Saddle
    Points", ICML 2026, arXiv:2605.17471; no public code, and of the paper only the abstract
    was at hand: its interpolation weight, period and noise are this policy's options, not
    values from the paper). `noise` > 0 adds WinQ's other part: from step ceil(start T) on,
    each step's forward and backward run at w + e, e ~ N(0, (noise x step)^2) per weight
    (the step of the weight's grid), and the optimizer updates w (the noise is taken off
    after backward; drawn from torch's global generator, saved with checkpoints).

    The bin centre is `Quantizer.code_centre` of the weight's current code: TetraJet-v2's
    dequantized value, the level it rounds to. Resets happen in `on_step_end`, so the
    tracker sees the reset weights, as the next forward does. Snapshots live in the
    policy's extra state (a checkpoint inside a window resumes it exactly). TetraJet-v2's
    memory-efficient variant (tracking a 10 % sample of weights) is not implemented.
    """

    requires = frozenset({QUANTIZED})
    not_on_folded = (
        "it resets latent weights to their level's centre, which for a folded weight is a "
        "centre of W gamma / sigma, moving with the BatchNorm's scale and statistics"
    )

    def __init__(self, cfg: OsciResetConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [m for _, m in quantized_layers(run.model) if not m.is_first_or_last]
        self.first = math.ceil(cfg.start * run.schedule.total)
        self.step = 0
        self.window: list[dict[str, torch.Tensor]] | None = None  # ratio: the open window
        self.clean: list[torch.Tensor] | None = None  # noise: the weights under this step's noise
        device = next(run.model.parameters()).device
        self.reset_count = torch.zeros((), dtype=torch.int64, device=device)  # this epoch
        self.resets = 0  # reset events this epoch
        self.numel = sum(m.weight.numel() for m in self.layers)
        if self.first_reset() >= run.schedule.total:
            warn(
                f"osci_reset: no reset happens in this run of {run.schedule.total} steps (the "
                f"first would follow step {self.first_reset()}); lower policy.osci_reset.period "
                "(and track_steps) or policy.osci_reset.start"
            )

    def first_reset(self) -> int:
        """The step after which the first reset happens."""
        cfg = self.cfg
        window = math.ceil(self.first / cfg.period) * cfg.period
        return window + cfg.track_steps + 1 if cfg.detect == "ratio" else window

    @torch.no_grad()
    def on_step_start(self, step: int, total: int) -> None:
        self.step = step
        if self.cfg.noise > 0 and step >= self.first:
            self.clean = [m.weight.detach().clone() for m in self.layers]
            for m in self.layers:
                q, w = m.weight_quantizer, m.weight
                w.add_(torch.randn_like(w) * (self.cfg.noise * q.step(w.detach())))

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if self.clean is not None:
            for m, w in zip(self.layers, self.clean, strict=True):
                m.weight.copy_(w)
            self.clean = None

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        i, cfg = self.step, self.cfg
        if i < self.first:
            return
        phase = i % cfg.period
        if cfg.detect == "all":
            if phase == 0:
                self._reset([torch.ones_like(m.weight, dtype=torch.bool) for m in self.layers])
        elif cfg.detect == "bin_edge":
            if phase == 0:
                self._reset([self._edge_mask(m) for m in self.layers])
        elif phase == 0:
            self.window = [self._snapshot(m) for m in self.layers]
        elif self.window is not None and phase <= cfg.track_steps:
            for m, win in zip(self.layers, self.window, strict=True):
                self._track(m, win)
        elif self.window is not None and phase == cfg.track_steps + 1:
            masks = [self.ratio(win) >= cfg.ratio_threshold for win in self.window]
            self.window = None
            self._reset(masks)

    @staticmethod
    def _snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
        w = layer.weight.detach()
        return {
            "w": w.clone(),
            "q": layer.weight_quantizer(w).detach(),
            "dw": torch.zeros_like(w),
            "dq": torch.zeros_like(w),
        }

    @staticmethod
    def _track(layer: nn.Module, win: dict[str, torch.Tensor]) -> None:
        w = layer.weight.detach()
        q = layer.weight_quantizer(w).detach()
        win["dw"].add_((w - win["w"]).abs_())
        win["dq"].add_((q - win["q"]).abs_())
        win["w"].copy_(w)
        win["q"].copy_(q)

    @staticmethod
    def ratio(win: dict[str, torch.Tensor]) -> torch.Tensor:
        """d_Q / d_w per weight, 0 where the latent weight did not move."""
        return torch.where(win["dw"] > 0, win["dq"] / win["dw"], 0.0)

    def _edge_mask(self, layer: nn.Module) -> torch.Tensor:
        q, w = layer.weight_quantizer, layer.weight.detach()
        centre = q.code_centre(q.to_int(w), w)
        return (w - centre).abs() > self.cfg.edge_threshold * q.step(w)

    def _reset(self, masks: list[torch.Tensor]) -> None:
        for layer, mask in zip(self.layers, masks, strict=True):
            q, w = layer.weight_quantizer, layer.weight
            centre = q.code_centre(q.to_int(w), w)
            if self.cfg.strength < 1:
                centre = torch.lerp(w, centre, self.cfg.strength)
            torch.where(mask, centre, w, out=w)
            self.reset_count += mask.sum()
        self.resets += 1

    def get_extra_state(self) -> dict:
        return {"window": self.window}

    def set_extra_state(self, state: dict) -> None:
        self.window = state["window"]

    def metrics(self) -> dict[str, float]:
        """Resets in the epoch and the share of low-bit weights they moved (all resets)."""
        out = {
            "osci_reset/resets": float(self.resets),
            "osci_reset/reset_share": self.reset_count.item() / max(self.numel, 1),
        }
        self.reset_count.zero_()
        self.resets = 0
        return out
