"""Transition-rate scheduling (TRS): schedule the share of weights that change level per step,
and steer the latent weights' learning rate to meet it.

Lee, Kim, Jeon, Ham, "Scheduling Weight Transitions for Quantization-Aware Training",
ICCV 2025, arXiv:2404.19248 (v3). Re-implemented from the paper, no reference code (none
is public); this workplace's library holds no copy of the paper's text either, so the
update rules below are written from its method as the paper states it in its abstract and
overview (a target transition rate is scheduled instead of a learning rate, and a
transition-adaptive learning rate, TALR, drives the latent weights towards it), with every
form the text would fix made a config value. Check them against the paper's Sec. 3 before
citing numbers from this implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext
from oscbench.quant.base import QUANTIZED
from oscbench.registry import ConfigError, check


@dataclass
class TRSConfig:
    """The values in conf/policy/trs.yaml are ours, chosen for the digits runs (LSQ's own
    rate there falls from about 2 % of the codes per step to 0.05 %)."""

    rate_start: float  # R_0: the target transition rate (share of weights per step) at t = 0
    rate_end: float  # R_T: the target at the end of the main epochs (cosine from R_0)
    gamma: float  # TALR step: mu += gamma (R_t - k_t), in learning-rate units per unit rate
    momentum: float  # k_t = momentum k_(t-1) + (1 - momentum) r_(t-1): the measured rate's EMA
    lr_start: float | None  # mu_0; null = the trainer's learning rate (trainer.lr)
    steer: str  # latent: TALR for the latent weights | latent_and_steps: their steps too

    def __post_init__(self) -> None:
        check(0 < self.rate_start <= 1, "rate_start", self.rate_start, "0 < x <= 1")
        check(0 <= self.rate_end <= 1, "rate_end", self.rate_end, "0 <= x <= 1")
        check(self.gamma > 0, "gamma", self.gamma, "> 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= x < 1")
        check(self.lr_start is None or self.lr_start > 0, "lr_start", self.lr_start, "null or > 0")
        check(
            self.steer in ("latent", "latent_and_steps"),
            "steer",
            self.steer,
            "latent, latent_and_steps",
        )


@POLICIES.register("trs", TRSConfig)
class TRS(Policy):
    """Per optimizer step t (0-based) of the T main steps:

    - target (the TR scheduler): R_t = R_T + (R_0 - R_T) (1 + cos(pi t / T)) / 2, R_T after T;
    - measured transition rate r_(t-1): the share of the low-bit layers' weights whose
      integer code changed at step t - 1 (`OscillationTracker.step_share`, a device scalar:
      no host synchronisation per step), smoothed k_t = m k_(t-1) + (1 - m) r_(t-1),
      k_0 = R_0;
    - TALR: mu_t = max(0, mu_(t-1) + gamma (R_t - k_t)) from mu_0 = lr_start (step 0 keeps
      mu_0): raised while weights change level less often than scheduled, lowered while
      they change more often;
    - the low-bit latent weights (the tracker's layers but the 8-bit first and last, which
      it tracks with `oscillation.track_first_last`; their transitions are the ones counted)
      take the optimizer's update at learning rate mu_t instead of the scheduled one; every
      other parameter (norms, biases, the 8-bit first and last layers, quantizer steps)
      keeps the trainer's schedule. With `steer: latent_and_steps` the weight quantizers'
      learned steps of those layers follow too, at quant_lr x mu_t / mu_0: a learned step
      moves every code of its tensor, and at 4 bits on digits LSQ's steps alone change
      about 1.5 % of the codes per step in the first third of training, more than any
      target the latent rate could be steered to (there `latent` does not track: mean
      error 2.2x the target over the second half of 12 epochs; `latent_and_steps`: 0.11x).
      The updates of the groups involved are computed at learning rate 1 and scaled, by
      mu_t or by the scheduled rate (SGD's and AdamW's updates, decoupled decay included,
      are linear in the learning rate), so mu_t never leaves the device.

    Per epoch it logs the mean target, measured rate and mu (`trs/target`, `trs/rate`,
    `trs/lr`) and the last mu (`trs/lr_last`): the learning-rate trace that meets the
    schedule. mu and k are buffers (saved with the run).
    """

    requires = frozenset({QUANTIZED})

    def __init__(self, cfg: TRSConfig, run: RunContext) -> None:
        super().__init__()
        if run.tracker is None or not run.tracker.tracked():
            raise ConfigError("policy=trs reads the oscillation tracker: it needs tracked layers")
        self.cfg = cfg
        tracker = run.tracker  # read, not owned
        layers = [layer for layer, _ in tracker.tracked() if not layer.is_first_or_last]
        if not layers:
            raise ConfigError("policy=trs steers the low-bit layers: this model has none")
        self.register_buffer("low_bit", tracker.layer_mask(layers), persistent=False)
        self.share = tracker.step_share
        self.steered = {id(layer.weight) for layer in layers}
        if cfg.steer == "latent_and_steps":
            self.steered |= {id(p) for m in layers for p in m.weight_quantizer.parameters()}
        self.main = run.schedule.main
        device = next(run.model.parameters()).device
        self.register_buffer("mu", torch.zeros((), device=device))
        self.register_buffer("rate", torch.full((), cfg.rate_start, device=device))
        self.mu0: float | None = None  # set at the first step
        self.step = 0
        self.target = cfg.rate_start
        self.means = {k: EpochMean() for k in ("target", "rate", "lr")}

    def scheduled(self, t: int) -> float:
        """R_t, the target transition rate of step t."""
        cfg = self.cfg
        progress = min(t / max(self.main, 1), 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.rate_end + (cfg.rate_start - cfg.rate_end) * cosine

    def on_step_start(self, step: int, total: int) -> None:
        self.step = step
        self.target = self.scheduled(step)

    @torch.no_grad()
    def optimizer_step(self, opt: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        cfg = self.cfg
        group = next(g for g in opt.param_groups if g["name"] == "latent")
        if self.mu0 is None:  # the first step of the run
            base = group.get("initial_lr", group["lr"])  # the schedule's peak (trainer.lr)
            self.mu0 = cfg.lr_start if cfg.lr_start is not None else base
            self.mu.fill_(self.mu0)
        if self.step > 0:
            measured = self.share(self.low_bit)
            self.rate.mul_(cfg.momentum).add_(measured, alpha=1 - cfg.momentum)
            self.mu.add_(cfg.gamma * (self.target - self.rate)).clamp_(min=0)
            self.means["rate"].add(measured)
        self.means["target"].add(self.target)
        self.means["lr"].add(self.mu)
        groups = [g for g in opt.param_groups if any(id(p) in self.steered for p in g["params"])]
        rates = [g["lr"] for g in groups]
        ratios = [  # the steps: quant_lr x mu_t / mu_0
            1.0 if g is group else g.get("initial_lr", r) / max(self.mu0, 1e-30)
            for g, r in zip(groups, rates, strict=True)
        ]
        before = [[p.detach().clone() for p in g["params"]] for g in groups]
        for g in groups:
            g["lr"] = 1.0
        try:
            step()
        finally:
            for g, r in zip(groups, rates, strict=True):
                g["lr"] = r
        for g, r, ratio, saved in zip(groups, rates, ratios, before, strict=True):
            for p, p0 in zip(g["params"], saved, strict=True):  # p0 + rate (p - p0)
                p.data.lerp_(p0, 1 - self.mu * ratio if id(p) in self.steered else 1 - r)

    def get_extra_state(self) -> dict:
        return {"mu0": self.mu0}

    def set_extra_state(self, state: dict) -> None:
        self.mu0 = state["mu0"]

    def metrics(self) -> dict[str, float]:
        out = {f"trs/{k}": m.pop() for k, m in self.means.items()}
        out["trs/lr_last"] = self.mu.item()
        return out
