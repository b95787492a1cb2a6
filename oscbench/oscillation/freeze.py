"""Iterative weight freezing (Nagel et al., ICML 2022, "Overcoming Oscillations in
Quantization-Aware Training", arXiv:2203.11086, Sec. 4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, Policy, delayed_cosine
from oscbench.quant.modules import quantized_layers
from oscbench.registry import ConfigError, check


@dataclass
class FreezeConfig:
    start: float  # off before this share of training (Nagel et al.: 0.25)
    threshold_start: float  # Nagel et al.: 0.1
    threshold_end: float | None  # Nagel et al.: 0.01 at 4 bits, 0.011 at 3 bits; null = that

    def __post_init__(self) -> None:
        check(0 <= self.start < 1, "policy.freeze.start", self.start, "0 <= x < 1")
        check(
            0 < self.threshold_start, "policy.freeze.threshold_start", self.threshold_start, "> 0"
        )
        check(
            self.threshold_end is None or self.threshold_end > 0,
            "policy.freeze.threshold_end",
            self.threshold_end,
            "null (by bits) or > 0",
        )


class FreezeState(nn.Module):
    """Per-weight freezing state, in buffers so that it is saved with the model."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frozen", torch.zeros_like(codes, dtype=torch.bool))
        self.register_buffer("code", torch.zeros_like(codes, dtype=torch.int8))
        self.register_buffer("ema_code", codes.float())


class Freeze(Policy):
    """A weight whose oscillation frequency f (the tracker's EMA, same momentum) exceeds
    f_th(t) is frozen for good to round(EMA of its integer code), the EMA taken before this
    step's codes enter it. f_th = 0 (off) before `start` T, then a cosine from
    threshold_start to threshold_end at T.

    Nagel et al. only override the frozen integer code in the forward pass, so momentum
    and weight decay keep moving the latent weight. Here a frozen weight's gradient is
    zeroed after backward and, after every optimizer step, its latent value is put back at
    the centre of its frozen code's bin: the code never changes and nothing drifts. Masks,
    codes and EMAs are buffers (saved in checkpoints; Nagel's were not).
    """

    def __init__(self, cfg: FreezeConfig, model: nn.Module, bits: int) -> None:
        self.cfg = cfg
        self.threshold_end = cfg.threshold_end or (0.011 if bits == 3 else 0.01)
        self.f_th = 0.0
        self.layers = [m for _, m in quantized_layers(model) if m.tracker is not None]
        if not self.layers:
            raise ConfigError("policy=freeze found no tracked layer: it needs a quantized model")

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        for layer in self.layers:
            if not hasattr(layer, "freeze_state"):
                layer.freeze_state = FreezeState(layer.tracker.code)

    def on_step_start(self, step: int, total: int) -> None:
        self.f_th = delayed_cosine(
            step, total, self.cfg.start, self.cfg.threshold_start, self.threshold_end
        )

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for layer in self.layers:
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(layer.freeze_state.frozen, 0.0)

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        for layer in self.layers:
            st, tr = layer.freeze_state, layer.tracker
            if self.f_th > 0:
                new = torch.gt(tr.freq, self.f_th).gt_(st.frozen)  # above f_th, not yet frozen
                # code = where(new, round(EMA), code), branch-free (see the tracker):
                # code ^= (code ^ round(EMA)) & -new
                flip = st.ema_code.round().to(torch.int8).bitwise_xor_(st.code)
                st.code.bitwise_xor_(flip.bitwise_and_(new.view(torch.int8).neg()))
                st.frozen.logical_or_(new)
            st.ema_code.mul_(1 - tr.momentum).add_(tr.code, alpha=tr.momentum)
            q, w = layer.weight_quantizer, layer.weight
            torch.where(st.frozen, q.code_centre(st.code.float(), w), w, out=w)

    def metrics(self) -> dict[str, float]:
        frozen = sum(int(layer.freeze_state.frozen.sum()) for layer in self.layers)
        total = sum(layer.weight.numel() for layer in self.layers)
        return {"freeze/threshold": self.f_th, "freeze/frozen_share": frozen / total}


@POLICIES.register("freeze", FreezeConfig)
def _build(cfg: FreezeConfig, model: nn.Module, bits: int) -> Policy:
    return Freeze(cfg, model, bits)
