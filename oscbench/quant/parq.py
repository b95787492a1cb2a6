"""PARQ's levels: the uniform grid its proximal map pulls the weights to, with an identity
forward (Jin, Zhang, Xiao, "PARQ: Piecewise-Affine Regularized Quantization", ICML 2025,
arXiv:2503.15748; code facebookresearch/parq at 36bae00c, `parq/quant/uniform.py`
(`UnifQuantizer`, `get_q_max`), as ported to torchao 0.18 `torchao/prototype/parq/quant/
uniform.py`). Training is policy `parq` (oscbench.oscillation.parq), which sets the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    EXTRA_BIT,
    PROXIMAL,
    QUANTIZED,
    QUANTIZERS,
    UNIFORM,
    IntegerForm,
    Quantizer,
    UniformGrid,
    channel_view,
)
from oscbench.registry import check


@dataclass
class PARQConfig:
    per_channel: bool  # one grid per output channel (`--quant-per-channel`; off in their scripts)
    scale_method: str  # mean: q_max = min(b mean|w|, max|w|) (UnifQuantizer's default) | max
    int_shift: float  # 0.5: 2^b mid-rise levels (k + 1/2) s (UnifQuantizer) | 1: 2^b - 1
    #                   levels k s with zero (MaxUnifQuantizer)

    def __post_init__(self) -> None:
        check(self.scale_method in ("mean", "max"), "scale_method", self.scale_method, "mean, max")
        check(self.int_shift in (0.5, 1.0), "int_shift", self.int_shift, "0.5, 1.0")


@QUANTIZERS.register("parq", PARQConfig)
class PARQQuantizer(Quantizer):
    """Symmetric uniform levels s (k + offset) with s = q_max / (2^(b-1) - int_shift):
    int_shift 0.5 gives the codes k = -2^(b-1)..2^(b-1)-1 at offset 1/2 (±s/2, ±3s/2, ...;
    UnifQuantizer, zero_point 0.5), int_shift 1 the codes -(2^(b-1)-1)..2^(b-1)-1 at offset
    0 (MaxUnifQuantizer, zero_point 0). q_max, from the weights the policy hands
    `set_levels` (the latent ones, every `quant_period` steps): min(b mean|w|, max|w|)
    (scale_method mean) or max|w|, per tensor or per output channel, at least float32's
    smallest normal (`q_max.clamp_(min=tiny)`). Not implemented: `center` (subtracting the
    mean first; off by default there) and LSBQ's non-uniform levels (the CIFAR script's
    `--quant-method lsbq`; the example's default is `unif`).

    The forward is the identity: PARQ has no straight-through estimator; its weights are
    what the proximal map made them, on the levels once its slope reaches 0. `to_int` is
    the nearest level's code, which the tracker reads. Weights only."""

    signed = True
    capabilities = frozenset({QUANTIZED, PROXIMAL})
    driven_by = "parq"
    deploy = EXTRA_BIT  # with the default int_shift 0.5 (deploy_for)

    @staticmethod
    def deploy_for(options: dict) -> str:
        """Mid-rise levels (int_shift 0.5) need one more bit; int_shift 1's are a b-bit grid."""
        return EXTRA_BIT if options["int_shift"] == 0.5 else UNIFORM

    def __init__(self, cfg: PARQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.cfg = cfg
        self.per_channel = cfg.per_channel
        self.deploy = self.deploy_for(vars(cfg))
        half = 2 ** (bits - 1)
        if cfg.int_shift == 0.5:
            self.n, self.p, self.offset = -half, half - 1, 0.5
        else:
            self.n, self.p, self.offset = -(half - 1), half - 1, 0.0
        self.register_buffer("scale", torch.ones(channels if cfg.per_channel else ()))

    def init_from(self, w: torch.Tensor) -> None:
        self.set_levels(w)
        self.ready = True

    @torch.no_grad()
    def set_levels(self, w: torch.Tensor) -> None:
        """The grid of `w` (the latent weights), as UnifQuantizer.quantize computes it."""
        a = w.detach().abs()
        if self.per_channel:
            a = a.flatten(1)
            top, mean = a.amax(dim=1), a.mean(dim=1)
        else:
            top, mean = a.max(), a.mean()
        if self.cfg.scale_method == "mean":
            top = torch.minimum(self.bits * mean, top)
        top = top.clamp(min=torch.finfo(top.dtype).tiny)
        self.scale.copy_(top / (2 ** (self.bits - 1) - self.cfg.int_shift))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        return w

    def grid(self, w: torch.Tensor) -> UniformGrid:
        return UniformGrid(
            channel_view(self.scale, w, self.per_channel), self.n, self.p, self.offset
        )

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        s = channel_view(self.scale, w, self.per_channel)
        return torch.clamp(torch.round(w / s - self.offset), self.n, self.p)

    def integer_form(self, w: torch.Tensor | None) -> IntegerForm:
        """int_shift 1: the codes at step s; 0.5: the odd integers 2k + 1 at step s / 2."""
        if self.deploy == UNIFORM:
            return IntegerForm(
                self.scale.flatten(), self.n, self.p, 0 if self.per_channel else None
            )
        return IntegerForm(
            (self.scale / 2).flatten(),
            2 * self.n + 1,
            2 * self.p + 1,
            0 if self.per_channel else None,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int_shift={self.cfg.int_shift}"
