"""PARQ: the optimizer updates latent weights; after each step a piecewise-affine proximal map
sets the model's weights between them and their nearest level, annealed to hard rounding.

Jin, Zhang, Xiao, "PARQ: Piecewise-Affine Regularized Quantization", ICML 2025,
arXiv:2503.15748; code facebookresearch/parq at 36bae00c: `parq/optim/quantopt.py`
(`QuantOptimizer.step`), `parq/optim/parq.py` (`ProxPARQ`, `normalized_mirror_sigmoid`),
`examples/qat_resnet_cifar10.py` (defaults), `scripts/qat_resnet_cifar10.sh` (ResNet-20:
`--anneal-end 150` of 200 epochs). The same code is `torchao.prototype.parq` (torchao 0.18),
against which tests/test_parq.py checks the map and the schedule. torchao's `QuantOptimizer`
is not used: it replaces the run's optimizer and keeps the latent weights and the levels in
that optimizer's state, where the plugin contract keeps them in the policy (buffers) and the
quantizer (oscbench.quant.parq); importing it loads torchao.quantization (4.8 s a run here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from oscbench.oscillation.policy import POLICIES, Policy, RunContext
from oscbench.quant.base import PROXIMAL, QUANTIZED, UniformGrid, bucket, take
from oscbench.quant.modules import quantized_layers
from oscbench.quant.parq import PARQQuantizer
from oscbench.registry import ConfigError, check


@dataclass
class PARQScheduleConfig:
    warmup_steps: int  # steps of the plain optimizer first (QuantOptimizer's default 0; their
    #                    examples' `--quant-warmup-steps`: 200)
    quant_period: int  # the levels are set again every this many steps (`--quant-period`: 10)
    anneal_start: float  # share of the main steps where the slope starts to fall (epoch 0)
    anneal_end: float  # share where it reaches 0, hard rounding after (their script: 150/200)
    steepness: float  # the mirror sigmoid's s (`--anneal-steepness`: 100; ProxPARQ's own: 10)
    anneal_center: float  # where the sigmoid is centred in the annealing span (0.5)

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.quant_period >= 1, "quant_period", self.quant_period, ">= 1")
        check(
            0 <= self.anneal_start < self.anneal_end <= 1,
            "anneal_end",
            self.anneal_end,
            "anneal_start < anneal_end <= 1 (shares of the main steps)",
        )
        check(self.steepness > 0, "steepness", self.steepness, "> 0")


def mirror_sigmoid(t: int, start: int, end: int, s: float, c: float) -> float:
    """PARQ's inverse slope at step t, falling from 1 at `start` to 0 at `end`: the mirror
    sigmoid 1 / (1 + exp(s (f - c))) of the progress f = (t - start) / (end - start),
    normalised to its values at f = 0 and 1 (`normalized_mirror_sigmoid`: with c = 0.5;
    their normalisation uses the values at c = 0.5 for any c, as here)."""
    if t < start:
        return 1.0
    if t >= end:
        return 0.0
    f = (t - start) / (end - start)
    value = 1 / (1 + math.exp(s * (f - c)))
    first, last = 1 / (1 + math.exp(-0.5 * s)), 1 / (1 + math.exp(0.5 * s))
    return (value - last) / (first - last)


def inv_slope(t: int, start: int, end: int, s: float, c: float) -> float:
    """The slope ProxPARQ maps with: `mirror_sigmoid`, at least float32's smallest normal
    while it is positive."""
    slope = mirror_sigmoid(t, start, end, s, c)
    return max(torch.finfo(torch.float32).tiny, slope) if slope > 0 else 0.0


def prox_(w: torch.Tensor, levels: torch.Tensor, inv_slope: float) -> None:
    """The proximal map in place (`ProxPARQ.apply_`): in the bin [lo, hi] of neighbouring
    levels holding w (beyond the grid, lo = hi = the outermost level), w becomes
    clamp(c + (w - c) / inv_slope, lo, hi) with c = (lo + hi) / 2; with inv_slope 0 the
    nearest level (ties to the lower one, as torch.bucketize on the midpoints). `levels`
    (L,) for the whole of w, or (C, L) for the rows of w (C, K)."""
    last = levels.shape[-1] - 1
    if inv_slope == 0:
        mid = (levels[..., :-1] + levels[..., 1:]) / 2
        w.copy_(take(levels, bucket(w, mid)))
        return
    idx = bucket(w, levels)
    lo, hi = take(levels, (idx - 1).clamp_(min=0)), take(levels, idx.clamp(max=last))
    centre = (lo + hi) / 2
    w.copy_(torch.minimum(torch.maximum(centre + (w - centre) / inv_slope, lo), hi))


def prox_uniform_(w: torch.Tensor, grid: UniformGrid, inv_slope: float) -> None:
    """`prox_` on evenly spaced levels (`grid`, its step a scalar or (C, 1) for the rows of
    w), without a search: the code of the upper end of w's bin (of its nearest level at
    inv_slope 0) from w / step, then corrected by comparing w with the levels (the
    midpoints) around it, each the grid's `code_centre`, as `UniformGrid.levels` computes
    it. The estimate is off by one code at most, where w / step rounds across an integer, so
    one correction each way gives `prox_`'s result bit for bit (tests/test_parq.py)."""
    level, n, p = grid.code_centre, grid.n, grid.p
    if inv_slope == 0:
        k = torch.round(w / grid.step - grid.offset)
        k.sub_(((level(k - 1) + level(k)) / 2 >= w).to(k.dtype))  # ties: the lower level
        k.add_(((level(k) + level(k + 1)) / 2 < w).to(k.dtype))
        w.copy_(level(k.clamp_(n, p)))
        return
    k = torch.ceil(w / grid.step - grid.offset)  # the first level >= w, as bucketize finds it
    k.add_((level(k) < w).to(k.dtype))
    # one too high only where w is a level and w / step rounds up past it: the bin above
    # maps w to itself as the bin below does (its lower end), so no correction is needed
    lo, hi = level((k - 1).clamp_(n, p)), level(k.clamp_(n, p))
    centre = (lo + hi) / 2
    w.copy_(torch.minimum(torch.maximum(centre + (w - centre) / inv_slope, lo), hi))


@POLICIES.register("parq", PARQScheduleConfig)
class PARQ(Policy):
    """Each optimizer step t (QuantOptimizer.step): before step `warmup_steps`, the plain
    optimizer. From it on: the latent weights are put back into the layers (at t =
    warmup_steps they are the weights themselves), the optimizer steps them with the
    gradient the forward took at the proximal weights, they are kept as the new latent
    weights, every `quant_period` steps from warmup_steps the quantizer sets its levels from
    them (`PARQQuantizer.set_levels`), and from the annealing's start the layers' weights
    become `prox_(latent, levels, inv_slope(t))`, inv_slope = max(float32's tiny,
    mirror_sigmoid) in the annealing span (at its first step 1: only weights beyond the grid
    move, to its ends). From its end (slope 0), a step that sets the levels rounds as the
    quantizer does (`PARQQuantizer.quantize`: ProxPARQ's `p.copy_(q)`), the others to the
    nearest level. On evenly spaced levels the map is `prox_uniform_`, `prox_` without its
    search (the same weights, bit for bit).

    Which weights: every layer quantized by `quantizer: parq` (the 8-bit first and last at
    their bits; the reference quantizes every weight but the norms' and a ViT's head and
    patch embedding at one width). Not implemented, both off in their scripts: `quant_shrink`
    (AProx's 1/Σlr scaling) and `anneal_wd_frac`. Latent weights are buffers; the step count
    is extra state."""

    requires = frozenset({QUANTIZED, PROXIMAL})
    not_on_folded = (
        "its proximal map sets the convolution's weight, which folding then multiplies by the "
        "BatchNorm's gamma / sigma, so the folded weight is not on PARQ's levels"
    )

    def __init__(self, cfg: PARQScheduleConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [
            m
            for _, m in quantized_layers(run.model)
            if isinstance(m.weight_quantizer, PARQQuantizer)
        ]
        for i, m in enumerate(self.layers):
            self.register_buffer(f"latent_{i}", m.weight.detach().clone())
        self.start = round(cfg.anneal_start * run.schedule.main)
        self.end = max(round(cfg.anneal_end * run.schedule.main), self.start + 1)
        if cfg.warmup_steps >= run.schedule.total:
            raise ConfigError(
                f"policy.parq.warmup_steps={cfg.warmup_steps} is not below the run's "
                f"{run.schedule.total} steps, so PARQ's map would never act and the weights "
                f"would stay in full precision; use policy.parq.warmup_steps="
                f"{run.schedule.total // 10} or more epochs"
            )
        self.steps = 0
        self.inv_slope = 1.0

    def _latents(self) -> list[torch.Tensor]:
        return [getattr(self, f"latent_{i}") for i in range(len(self.layers))]

    def optimizer_step(self, opt: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        t, cfg = self.steps, self.cfg
        self.steps += 1
        if t < cfg.warmup_steps:
            step()
            return
        with torch.no_grad():
            if t > cfg.warmup_steps:
                for m, latent in zip(self.layers, self._latents(), strict=True):
                    m.weight.copy_(latent)
        step()
        update = (t - cfg.warmup_steps) % cfg.quant_period == 0
        slope = inv_slope(t, self.start, self.end, cfg.steepness, cfg.anneal_center)
        self.inv_slope = slope
        with torch.no_grad():
            for m, latent in zip(self.layers, self._latents(), strict=True):
                latent.copy_(m.weight)
                q = m.weight_quantizer
                if update:
                    q.set_levels(latent)
                if t >= self.end and update:  # ProxPARQ takes the quantizer's own rounding
                    m.weight.copy_(q.quantize(latent))
                elif t >= self.start:  # before it, ProxPARQ leaves the weights as they are
                    w = m.weight.flatten(1) if q.per_channel else m.weight.view(-1)
                    grid = q.grid(m.weight)
                    if q.uneven:
                        prox_(w, grid.levels(), slope)
                    else:  # the step per row of w
                        step = grid.step.reshape(-1, 1) if q.per_channel else grid.step
                        prox_uniform_(w, replace(grid, step=step), slope)

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "inv_slope": self.inv_slope}

    def set_extra_state(self, state: dict) -> None:
        self.steps, self.inv_slope = state["steps"], state["inv_slope"]

    def metrics(self) -> dict[str, float]:
        """The inverse slope of the epoch's last step (1: no pull yet; 0: hard rounding)."""
        return {"parq/inv_slope": self.inv_slope}
