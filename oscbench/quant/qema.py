"""Q-EMA: LSQ whose rounding direction follows an EMA of the latent weight.

Chen, Xi, Zhu, Chen, "Oscillation-Reduced MXFP4 Training for Vision Transformers"
(TetraJet), ICML 2025, arXiv:2502.20853; code thu-ml/TetraJet-MXFP4Training at bbe9bd67:
`quantization/QuantizerFP_torch.py` (`SymmQuantizer_with_EMA_Torch`,
`cast_to_fp_ExMy_with_EMA`), `quantization/QLinear.py` (`ema_weight`, `ema_step`),
`engine.py` (the EMA update after each optimizer step),
`scripts/Pretrain-TetraJet-Q-EMA/*.sh` (the decays).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import QUANTIZED, QUANTIZERS, channel_view
from oscbench.quant.lsq import LSQConfig, LSQQuantizer, _lsq_grads, _save_and_scale
from oscbench.registry import check


@dataclass
class QEMAConfig(LSQConfig):
    """LSQ's options, plus the EMA's."""

    decay: float  # TetraJet: 0.9983 (DeiT-Tiny script; DeiT-Small 0.9972, DeiT-Base 0.999)
    warmup: int  # the EMA decides from this many updates on (TetraJet: `ema_step >= 10`)
    step_code: str  # the code in LSQ's step gradient (q - w/s): nearest (round(w/s)) | ema

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.decay < 1, "decay", self.decay, "0 < x < 1")
        check(self.warmup >= 0, "warmup", self.warmup, ">= 0")
        check(self.step_code in ("nearest", "ema"), "step_code", self.step_code, "nearest, ema")


class _QEMARound(torch.autograd.Function):
    """LSQ's fake quantization with the code chosen by the EMA: with t = x/s and e = ema/s,
    code = clamp(floor(t) + [e - floor(t) >= 1/2], n, p). The gradients are LSQ's
    (oscbench.quant.lsq: `_save_and_scale`, `_lsq_grads`): straight through where the code
    is inside [n, p]; for the step, g times (c - t) there and n or p outside, with
    c = round(t) (`step_code: nearest`) or c = the EMA's code (`step_code: ema`)."""

    @staticmethod
    def forward(ctx, x, s, ema, n: int, p: int, g: float, step_code: str):  # noqa: ANN001, ANN205
        inv = s.reciprocal()
        xs = x * inv
        raw = torch.floor(xs)
        raw += (ema * inv).sub_(raw).ge_(0.5)
        q = raw.clamp(n, p)
        code = q if step_code == "ema" else torch.round(xs).clamp_(n, p)
        return _save_and_scale(ctx, xs, raw, q, code, s, g)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return *_lsq_grads(ctx, grad), None, None, None, None, None


@QUANTIZERS.register("qema", QEMAConfig)
class QEMAQuantizer(LSQQuantizer):
    """Weights only. After every optimizer step (`after_step`, called by the training loop,
    as TetraJet's `engine.py` does after `loss_scaler(...)`):
    ema <- decay * ema + (1 - decay) * w, starting from the weight at quantization
    (TetraJet: `ema_weight = weight.clone()`). From `warmup` updates on, in training and in
    evaluation alike, a weight's grid cell [floor(t), floor(t) + 1], t = w/s, comes from the
    current weight and the EMA decides which end it rounds to: up iff ema/s - floor(t) >= 1/2.
    The EMA is a buffer (saved with the model); the update count is extra state.

    The transfer from MXFP4 to a uniform grid: TetraJet rounds the mantissa of |w| (its
    cell: floor of |w| / 2^exponent in mantissa steps) up iff sign(w) * ema, in the same
    units, lies half a step or more above the cell's floor: the same rule on the grid of
    |w|. Here it runs on LSQ's signed grid with floor(t), which is the same cell and the
    same choice except at exact ties (here up, there away from zero) and at w = 0 exactly
    (there always 0). Clipping is LSQ's: the code is clamped to [n, p].

    The step's gradient (`step_code`), a choice TetraJet's code leaves open (its MXFP4
    scales are not learned): `nearest` (default) gives LSQ's step the gradient it would
    have under round to nearest, so the EMA changes the forward values and not how the
    step learns; `ema` puts the EMA's code into LSQ's (q - w/s). With `ema` the step takes
    a biased gradient (|q - w/s| up to a whole step) and moves every code with it: on the
    default digits run at 4 bits, 985,697 crossings against LSQ's 186,504 (`nearest`:
    144,325).

    With other quantizers: quantizer=qema is LSQ's grid (per tensor or per channel, LSQ's
    step gradient, `init`). Policies that pin weights to codes (freeze) are refused: a
    code here is not a function of the weight alone (no FIXED_GRID); dampening, CGA and
    OsciReset compose. Round to nearest, StatsQ and AOQ keep their own rounding.
    """

    capabilities = frozenset({QUANTIZED})
    extra_state = (*LSQQuantizer.extra_state, "updates")

    def __init__(self, cfg: QEMAConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(cfg, bits, channels, is_weight)
        self.register_buffer("ema", None)
        self.updates = 0

    def init_from(self, x: torch.Tensor) -> None:
        super().init_from(x)
        self.ema = x.detach().float().clone()
        self.updates = 0

    @property
    def active(self) -> bool:
        """Whether the EMA decides the rounding (after `warmup` updates)."""
        return self.ema is not None and self.updates >= self.cfg.warmup

    @torch.no_grad()
    def after_step(self, x: torch.Tensor) -> None:
        self.ema.mul_(self.cfg.decay).add_(x.detach(), alpha=1 - self.cfg.decay)
        self.updates += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return super().forward(x)
        self._check_ready()
        self._keep_positive()
        x = x.float()
        s = channel_view(self.s, x, self.per_channel)
        return _QEMARound.apply(x, s, self.ema, self.n, self.p, self.g, self.cfg.step_code)

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return super().to_int(x)
        inv = channel_view(self.s, x, self.per_channel).reciprocal()
        raw = torch.floor(x.float() * inv)
        return raw.add_((self.ema * inv).sub_(raw).ge_(0.5)).clamp_(self.n, self.p)
