"""PARQ's levels: the grid its proximal map pulls the weights to, with an identity forward
(Jin, Zhang, Xiao, "PARQ: Piecewise-Affine Regularized Quantization", ICML 2025,
arXiv:2503.15748; code facebookresearch/parq at 36bae00c, `parq/quant/uniform.py`
(`UnifQuantizer`, `get_q_max`) and `parq/quant/lsbq.py` (`LSBQuantizer`), as ported to
torchao 0.18 `torchao/prototype/parq/quant/`). Training is policy `parq`
(oscbench.oscillation.parq), which sets the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscbench.quant.base import (
    EXTRA_BIT,
    LOOKUP,
    PROXIMAL,
    QUANTIZED,
    QUANTIZERS,
    UNIFORM,
    IntegerForm,
    LevelGrid,
    NotDeployable,
    Quantizer,
    UniformGrid,
    channel_view,
)
from oscbench.registry import check


@dataclass
class PARQConfig:
    levels: str  # uniform (UnifQuantizer, `--quant-method unif`) | lsbq (LSBQuantizer, greedy:
    #              `--quant-method lsbq`, their ResNet-20 script)
    per_channel: bool  # one grid per output channel (`--quant-per-channel`; off in their scripts)
    scale_method: str  # uniform: mean: q_max = min(b mean|w|, max|w|) (UnifQuantizer's) | max
    int_shift: float  # uniform: 0.5: 2^b mid-rise levels (k + 1/2) s (UnifQuantizer) | 1:
    #                   2^b - 1 levels k s with zero (MaxUnifQuantizer)

    def __post_init__(self) -> None:
        check(self.levels in ("uniform", "lsbq"), "levels", self.levels, "uniform, lsbq")
        check(self.scale_method in ("mean", "max"), "scale_method", self.scale_method, "mean, max")
        check(self.int_shift in (0.5, 1.0), "int_shift", self.int_shift, "0.5, 1.0")


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = 1: every weight takes +v or -v (LSBQ's `binary_sign`)."""
    return torch.where(x == 0, 1.0, x.sign())


def sign_patterns(bits: int) -> torch.Tensor:
    """The 2^b x b matrix of every choice of signs ±1, row i the bits of i from the highest
    (0: -1, 1: +1): `itertools.product((-1, 1), repeat=b)`'s order, LSBQuantizer's basis."""
    i, j = torch.arange(2**bits), torch.arange(bits - 1, -1, -1)
    return ((i[:, None] >> j) & 1).float() * 2 - 1


def lsbq_greedy(
    w: torch.Tensor, bits: int, signs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy least-squares binary quantization of the rows of w (C, K), or of the whole of
    a 1-D w: v_i = mean|r_{i-1}| of the residual, r_i = r_{i-1} - v_i sign(r_{i-1}) from r_0 =
    w, for i = 1..b. Returns w - r_b (each weight's sum of ±v_i) and the 2^b sorted levels,
    the sums of ±v_i over every choice of signs ((2^b,) or (C, 2^b)), formed as
    `LSBQuantizer.quantize_greedy` forms them (`signs`, `sign_patterns(b)`, times v), so
    that the levels are its bit for bit."""
    rows, signs = w.dim() == 2, signs.to(w.dtype)
    r = w.detach().clone()
    vs = []
    for _ in range(bits):
        v = r.abs().mean(dim=-1, keepdim=True) if rows else r.abs().mean()
        r.sub_(binary_sign(r).mul_(v))
        vs.append(v)
    if rows:
        levels = torch.sort(torch.cat(vs, dim=1) @ signs.T, dim=-1).values
    else:
        levels = torch.msort(signs.matmul(torch.stack(vs)))
    return w - r, levels


@QUANTIZERS.register("parq", PARQConfig)
class PARQQuantizer(Quantizer):
    """The levels PARQ's proximal map pulls the weights to, set from the latent weights the
    policy hands `set_levels` (every `quant_period` steps), per tensor or per output channel:

    - `levels: uniform` (UnifQuantizer): symmetric levels s (k + offset), s = q_max /
      (2^(b-1) - int_shift); int_shift 0.5 gives the codes k = -2^(b-1)..2^(b-1)-1 at offset
      1/2 (±s/2, ±3s/2, ...; zero_point 0.5), int_shift 1 the codes -(2^(b-1)-1)..2^(b-1)-1
      at offset 0 (MaxUnifQuantizer, zero_point 0); q_max = min(b mean|w|, max|w|)
      (scale_method mean) or max|w|, at least float32's smallest normal.
    - `levels: lsbq` (LSBQuantizer, greedy, `lsbq_greedy`): the 2^b sums ±v_1 ± ... ± v_b,
      not evenly spaced (a `LevelGrid`; codes -2^(b-1).. in their order). Deployed, they
      are a table of levels and each weight's code (`deploy` LOOKUP: a Gather, not a
      DequantizeLinear).

    Not implemented: `center` (subtracting the mean first; off by default there) and LSBQ's
    `optimal` solutions for 1-2 bits and ternary (`--quant-lsbq-optimal`, off in their
    scripts).

    The forward is the identity: PARQ has no straight-through estimator; its weights are
    what the proximal map made them, on the levels once its slope reaches 0 (by the nearest
    level, or at a step that sets the levels by `quantize`, the reference quantizer's own
    rounding). `to_int` is the nearest level's code, which the tracker reads. Weights only."""

    signed = True
    capabilities = frozenset({QUANTIZED, PROXIMAL})
    driven_by = "parq"
    deploy = EXTRA_BIT  # with the default uniform levels and int_shift 0.5 (deploy_for)

    @staticmethod
    def deploy_for(options: dict) -> str:
        """Mid-rise levels (int_shift 0.5) need one more bit; int_shift 1's are a b-bit grid;
        LSBQ's are a table."""
        if options.get("levels") == "lsbq":  # records from before LSBQ have no `levels`
            return LOOKUP
        return EXTRA_BIT if options["int_shift"] == 0.5 else UNIFORM

    def __init__(self, cfg: PARQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        self.cfg = cfg
        self.per_channel = cfg.per_channel
        self.deploy = self.deploy_for(vars(cfg))
        self.uneven = cfg.levels == "lsbq"
        half = 2 ** (bits - 1)
        if cfg.int_shift == 0.5 or self.uneven:
            self.n, self.p, self.offset = -half, half - 1, 0.5
        else:
            self.n, self.p, self.offset = -(half - 1), half - 1, 0.0
        rows = (channels,) if cfg.per_channel else ()
        if self.uneven:
            self.register_buffer("values", torch.zeros(*rows, 2**bits))
            self.register_buffer("signs", sign_patterns(bits), persistent=False)
        else:
            self.register_buffer("scale", torch.ones(rows))

    def init_from(self, w: torch.Tensor) -> None:
        self.set_levels(w)
        self.ready = True

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().flatten(1) if self.per_channel else w.detach().reshape(-1)

    @torch.no_grad()
    def set_levels(self, w: torch.Tensor) -> None:
        """The levels of `w` (the latent weights), as the reference quantizer's `quantize`
        computes them."""
        if self.uneven:
            self.values.copy_(lsbq_greedy(self._rows(w), self.bits, self.signs)[1])
            return
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

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """w rounded as the reference quantizer's `quantize` rounds it on the levels it sets:
        uniform, (clamp(round(w / s - offset), n, p) + offset) s (UnifQuantizer clamps w to
        ±q_max first, which gives the same codes); lsbq, each weight's greedy sum of ±v_i,
        which is its nearest level where v_1 >= v_2 + ... + v_b, v_2 >= v_3 + ..., and
        otherwise need not be (LSBQuantizer's q; the proximal map uses it where it sets the
        levels at hard rounding)."""
        if self.uneven:
            return lsbq_greedy(self._rows(w), self.bits, self.signs)[0].view(w.shape)
        return (self.to_int(w) + self.offset) * channel_view(self.scale, w, self.per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        return w

    def grid(self, w: torch.Tensor) -> UniformGrid | LevelGrid:
        if self.uneven:
            return LevelGrid(self.values, self.n, w.dim())
        return UniformGrid(
            channel_view(self.scale, w, self.per_channel), self.n, self.p, self.offset
        )

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        if self.uneven:
            return self.grid(w).nearest(w).to(w.dtype).add_(self.n)
        s = channel_view(self.scale, w, self.per_channel)
        return torch.clamp(torch.round(w / s - self.offset), self.n, self.p)

    def integer_form(self, w: torch.Tensor | None) -> IntegerForm:
        """int_shift 1: the codes at step s; 0.5: the odd integers 2k + 1 at step s / 2."""
        if self.deploy == LOOKUP:
            raise NotDeployable("LSBQ's levels are not evenly spaced: a table (`grid(w)`)")
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
        return f"{super().extra_repr()}, levels={self.cfg.levels}, int_shift={self.cfg.int_shift}"
