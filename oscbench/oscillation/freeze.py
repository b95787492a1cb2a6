"""Iterative weight freezing (Nagel et al., ICML 2022, "Overcoming Oscillations in
Quantization-Aware Training", arXiv:2203.11086, Sec. 4.2; code:
Qualcomm-AI-research/oscillations-qat, `utils/oscillation_tracking_utils.py`:
`TrackOscillation.__call__` and `check_init`, schedule in `utils/qat_utils.py`:
`UpdateFreezingThreshold`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, Policy, RunContext, delayed_cosine
from oscbench.quant.base import FIXED_GRID, QUANTIZED
from oscbench.registry import ConfigError, check


@dataclass
class FreezeConfig:
    start: float  # off before this share of training (Nagel et al.: 0.25)
    threshold_start: float  # Nagel et al.: 0.1
    threshold_end: float | None  # Nagel et al.: 0.01 at 4 bits, 0.011 at 3 bits; null = that

    def __post_init__(self) -> None:
        check(0 <= self.start < 1, "start", self.start, "0 <= x < 1")
        check(0 < self.threshold_start, "threshold_start", self.threshold_start, "> 0")
        check(
            self.threshold_end is None or self.threshold_end > 0,
            "threshold_end",
            self.threshold_end,
            "null (by bits) or > 0",
        )


class FreezeState(nn.Module):
    """Per-weight freezing state of one layer, in buffers (saved with the policy)."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frozen", torch.zeros_like(codes, dtype=torch.bool))
        self.register_buffer("code", torch.zeros_like(codes, dtype=torch.int8))
        self.register_buffer("ema_code", torch.zeros_like(codes, dtype=torch.float32))


@POLICIES.register("freeze", FreezeConfig)
class Freeze(Policy):
    """Freezes, for good, each weight whose oscillation frequency f (the tracker's EMA, same
    momentum m) exceeds the threshold f_th(t), to round(EMA of its integer code).

    As in Nagel et al.'s code, step by step (t = step + 1, their iteration counter):
    f_th(t) = 0 while t < `start` T, then a cosine from threshold_start to threshold_end,
    reached at the last step. Before the forward of iteration t, with the frequencies the
    trackers hold after the previous step: at the first t with f_th > 0 the code EMA is
    created from the current codes (`check_init`); while f_th > 0, weights with f > f_th
    that are not yet frozen take round(EMA) as their frozen code (the EMA before this
    update), then the EMA takes this step's codes. A weight frozen at iteration t still gets
    its gradient in iteration t and is frozen from the next forward on; the trackers see
    frozen weights at their frozen codes, never switching.

    One deliberate difference: Nagel et al. substitute the frozen code in the forward pass
    and let momentum and weight decay keep moving the latent weight. Here a frozen weight's
    gradient is zeroed after backward and, after every optimizer step, its latent value is
    put back at the centre of its frozen code's bin, so that the forward pass needs no
    substitution: the code never changes and nothing drifts. A consequence for LSQ: a
    frozen weight adds (code - w/s) = 0 to the step size's gradient, where Nagel's
    substituted constant code adds the code itself, as a clipped weight does. Masks,
    codes and EMAs are buffers (saved in checkpoints; Nagel's were not).
    """

    requires = frozenset({QUANTIZED, FIXED_GRID})
    not_on_folded = (
        "it pins a latent weight where its code is, but a folded weight also moves with the "
        "BatchNorm's scale and statistics it is multiplied by, so the code does not stay"
    )

    def __init__(self, cfg: FreezeConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.threshold_end = cfg.threshold_end or (0.011 if run.bits == 3 else 0.01)
        self.f_th = 0.0
        self.started = False  # the code EMAs exist from the first step with f_th > 0
        tracked = run.tracker.tracked() if run.tracker is not None else []
        if not tracked:
            raise ConfigError("policy=freeze found no tracked layer: it needs a quantized model")
        self.layers = [layer for layer, _ in tracked]  # the layers and their tracker states,
        self.trackers = [state for _, state in tracked]  # read, not owned (no submodules)
        self.states = nn.ModuleList(FreezeState(state.code) for state in self.trackers)
        self.new: list[torch.Tensor | None] = [None] * len(self.layers)  # frozen at this step

    @torch.no_grad()
    def on_step_start(self, step: int, total: int) -> None:
        cfg = self.cfg
        self.f_th = delayed_cosine(
            step + 1, total, cfg.start, cfg.threshold_start, self.threshold_end, before=0.0
        )
        if self.f_th == 0:
            return
        for i, (st, tr) in enumerate(zip(self.states, self.trackers, strict=True)):
            if not self.started:
                st.ema_code.copy_(tr.code)
            new = torch.gt(tr.freq, self.f_th).gt_(st.frozen)  # above f_th, not yet frozen
            # code = where(new, round(EMA), code), branch-free (see the tracker):
            # code ^= (code ^ round(EMA)) & -new
            flip = st.ema_code.round().to(torch.int8).bitwise_xor_(st.code)
            st.code.bitwise_xor_(flip.bitwise_and_(new.view(torch.int8).neg()))
            st.ema_code.mul_(1 - tr.momentum).add_(tr.code, alpha=tr.momentum)
            self.new[i] = new
        self.started = True

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for layer, st in zip(self.layers, self.states, strict=True):
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(st.frozen, 0.0)

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        for i, (layer, st) in enumerate(zip(self.layers, self.states, strict=True)):
            q, w = layer.weight_quantizer, layer.weight
            if self.new[i] is not None:
                st.frozen.logical_or_(self.new[i])
                self.new[i] = None
            torch.where(st.frozen, q.code_centre(st.code.float(), w), w, out=w)

    def get_extra_state(self) -> dict:
        return {"started": self.started}

    def set_extra_state(self, state: dict) -> None:
        self.started = state["started"]

    def metrics(self) -> dict[str, float]:
        frozen = sum(int(st.frozen.sum()) for st in self.states)
        total = sum(layer.weight.numel() for layer in self.layers)
        return {"freeze/threshold": self.f_th, "freeze/frozen_share": frozen / total}
