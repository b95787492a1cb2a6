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


def ema_code(xs: torch.Tensor, ema_s: torch.Tensor) -> torch.Tensor:
    """TetraJet's code, unclamped, from t = x/s and e = ema/s: the cell of |t|,
    [floor(|t|), floor(|t|) + 1], whose upper end is taken iff sign(t) e - floor(|t|) >= 1/2;
    the code carries t's sign (0 for t = 0)."""
    sign = xs.sign()
    k = xs.abs().floor_()
    return (ema_s * sign).sub_(k).ge_(0.5).add_(k).mul_(sign)


class _QEMARound(torch.autograd.Function):
    """LSQ's fake quantization with the code chosen by the EMA: code = clamp(`ema_code`,
    n, p). The gradients are LSQ's (oscbench.quant.lsq: `_save_and_scale`, `_lsq_grads`):
    straight through where the EMA's code is inside [n, p]; for the step, g times LSQ's
    coefficient under round to nearest (`step_code: nearest`: round(t) - t where round(t)
    is inside [n, p], n or p outside) or under the EMA's code (`ema`: code - t inside, n or
    p outside)."""

    @staticmethod
    def forward(ctx, x, s, ema, n: int, p: int, g: float, step_code: str):  # noqa: ANN001, ANN205
        inv = s.reciprocal()
        xs = x * inv
        raw = ema_code(xs, ema * inv)
        q = raw.clamp(n, p)
        ds = None
        if step_code == "nearest":
            r = torch.round(xs)
            qn = r.clamp(n, p)
            ds = qn - xs * torch.eq(r, qn)
        return _save_and_scale(ctx, xs, raw, q, s, g, ds)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return *_lsq_grads(ctx, grad), None, None, None, None, None


@QUANTIZERS.register("qema", QEMAConfig)
class QEMAQuantizer(LSQQuantizer):
    """Weights only. After every optimizer step (`after_step`, called by the training loop,
    as TetraJet's `engine.py` does after `loss_scaler(...)`):
    ema <- decay * ema + (1 - decay) * w, starting from the weight at quantization
    (TetraJet: `ema_weight = weight.clone()`). From `warmup` updates on, in training and in
    evaluation alike, a weight's grid cell comes from the current weight and the EMA decides
    which end it rounds to (`ema_code`): with t = w/s and e = ema/s, the cell of |t| is
    [floor(|t|), floor(|t|) + 1], and |code| is its upper end iff sign(t) e - floor(|t|) >= 1/2.
    The EMA is a buffer (saved with the model); the update count is extra state.

    The transfer from MXFP4 to a uniform grid: TetraJet rounds the mantissa of |w| (its
    cell: floor of |w| / 2^exponent in mantissa steps) up iff sign(w) * ema, in the same
    units, lies half a step or more above the cell's floor; here the same rule runs on LSQ's
    grid of |t|. So a weight exactly on a level k != 0 has the cell from k away from zero
    (w = -0.25 on a step of 0.25, its EMA at -0.425: code -2), a tie goes away from zero,
    and w = 0 gives 0 whatever the EMA. Clipping is LSQ's: the code is clamped to [n, p].

    The step's gradient (`step_code`), a choice TetraJet's code leaves open (its MXFP4
    scales are not learned): `nearest` (default) gives LSQ's step the gradient it would
    have under round to nearest, so the EMA changes the forward values and not how the
    step learns; `ema` puts the EMA's code into LSQ's (q - w/s). With `ema` the step takes
    a biased gradient (|q - w/s| up to a whole step) and moves every code with it: on the
    default digits run at 4 bits (`method=lsq_qema bits=4`), 1,011,658 crossings against
    LSQ's 200,193 (`nearest`: 143,494).

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
        return ema_code(x.float() * inv, self.ema * inv).clamp_(self.n, self.p)
