"""The EMA copy of the model (`trainer.ema_decay`): timm's `ModelEmaV3`, updated after every
optimizer step. Imported only by runs that keep one (timm takes seconds to import)."""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from oscbench.training.config import TrainerConfig


class ModelEma(ModelEmaV3):
    """timm's `ModelEmaV3`. With `ema_buffers: average` timm lerps every floating-point
    value of `state_dict()`, which also holds modules' extra state (a quantizer's or a
    policy's `get_extra_state`, a dict), and fails on it; here the average runs over the
    parameters and the floating-point buffers (BN statistics, a quantizer's EMA of its
    weight), and every other buffer is copied from the live model, as timm does with
    integer ones. Extra state stays the copy's own (a deep copy at the start)."""

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        pairs = [
            *zip(self.module.parameters(), model.parameters(), strict=True),
            *zip(self.module.buffers(), model.buffers(), strict=True),
        ]
        ema = [e for e, _ in pairs if e.is_floating_point()]
        live = [m.to(device=e.device, dtype=e.dtype) for e, m in pairs if e.is_floating_point()]
        if ema:
            torch._foreach_lerp_(ema, live, weight=1.0 - decay)
        for e, m in pairs:
            if not e.is_floating_point():
                e.copy_(m.to(device=e.device))


def build_ema(model: nn.Module, cfg: TrainerConfig) -> ModelEma:
    """timm's model EMA of the whole model (latent weights, quantizer parameters and, with
    `ema_buffers: average`, float buffers such as BN statistics; `copy` takes the live
    model's buffers, so no code or mask a policy keeps in a buffer is averaged), at
    `ema_decay` (with timm's warm-up if `ema_warmup`). Evaluating the copy quantizes its own
    latent weights with its own quantizers."""
    return ModelEma(
        model,
        decay=cfg.ema_decay,
        use_warmup=cfg.ema_warmup,
        exclude_buffers=cfg.ema_buffers == "copy",
    )
