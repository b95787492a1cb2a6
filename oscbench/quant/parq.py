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
from oscbench.registry import ConfigError, check


@dataclass
class PARQConfig:
    levels: str  # uniform (UnifQuantizer, `--quant-method unif`) | lsbq (LSBQuantizer, greedy:
    #              `--quant-method lsbq`, their ResNet-20 script)
    per_channel: bool  # one grid per output channel (`--quant-per-channel`; off in their scripts)
    scale_method: str  # uniform: mean: q_max = min(b mean|w|, max|w|) (UnifQuantizer's) | max
    int_shift: float  # uniform: 0.5: 2^b mid-rise levels (k + 1/2) s (UnifQuantizer) | 1:
    #                   2^b - 1 levels k s with zero (MaxUnifQuantizer)
    center: bool  # the quantizers' `center`: levels set on w - mean(w) (per tensor or row),
    #               the mean added back to the levels and the rounded weights (off there)
    optimal: bool  # lsbq at 2 bits: LSBQuantizer's `optimal` least-squares v_1, v_2
    #                (`--quant-lsbq-optimal`; off in their scripts); greedy at other widths
    optimal_rows: str  # optimal per channel: reference (compute_v_per_channel's scoring of a
    #                    candidate v_1: v_1 subtracted twice) | least_squares (with the v_2
    #                    the map then takes: each row's least residual among the candidates)

    def __post_init__(self) -> None:
        check(self.levels in ("uniform", "lsbq"), "levels", self.levels, "uniform, lsbq")
        check(self.scale_method in ("mean", "max"), "scale_method", self.scale_method, "mean, max")
        check(self.int_shift in (0.5, 1.0), "int_shift", self.int_shift, "0.5, 1.0")
        check(
            self.levels == "lsbq" or not self.optimal,
            "optimal",
            self.optimal,
            "false with levels=uniform (it is LSBQ's: levels=lsbq)",
        )
        rows = ("reference", "least_squares")
        check(self.optimal_rows in rows, "optimal_rows", self.optimal_rows, ", ".join(rows))
        check(
            self.optimal_rows == "reference" or (self.optimal and self.per_channel),
            "optimal_rows",
            self.optimal_rows,
            "reference unless optimal=true and per_channel=true (per tensor the reference "
            "already scores each candidate by its own residual)",
        )


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


def lsbq_optimal_2bit(
    w: torch.Tensor, signs: torch.Tensor, least_squares: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSBQuantizer's optimal 2-bit solution (`quantize_optimal_2bits`) for the rows of w (C,
    K), or the whole of a 1-D w: returns each weight's v_1 s_1 + v_2 s_2 and the 4 sorted
    levels ±v_1 ± v_2.

    Per tensor, the candidates v_1 solve |w|_(i) <= v_1 < |w|_(i+1) with v_1 the mean of the
    means of |w| below and above i (v_2 half their difference), plus v_1 = v_2 = mean|w| / 2
    where it lies below every |w|; the first of least residual norm, among those below |w|'s
    own, wins. The reference loops over the n - 1 splits in Python; the same float operations
    are taken here for all splits at once. Where no candidate qualifies or beats |w|'s own
    norm (w all zero, where the reference's assertion fails), the levels are 0. Per row, v_1
    is `compute_v_per_channel`'s (its candidates' residuals subtract v_1 twice: the
    reference's `v.mean` over a dimension of size 1 leaves v_1 as v_2 there, so its choice
    can leave more residual than greedy's; `least_squares` scores each with the v_2 below
    instead), then v_2 = mean|w - v_1 s_1|; the levels are
    sorted (the reference returns V B^T in its sign patterns' order, out of order where v_2
    > v_1, and its proximal map then bucketizes on them as if sorted)."""
    signs = signs.to(w.dtype)
    if w.dim() == 2:
        v1 = _v1_per_row(w, least_squares)
        s = binary_sign(w).mul_(v1)
        r = w.sub(s)
        v2 = r.abs().mean(dim=-1, keepdim=True)
        q = s.add_(binary_sign(r).mul_(v2))
        return q, torch.sort(torch.cat((v1, v2), dim=-1) @ signs.T, dim=-1).values
    a = w.abs().sort().values
    cumsum, n = torch.cumsum(a, dim=0), a.numel()
    split = torch.arange(1, n, device=w.device)  # i + 1 for i = 0..n-2
    above = (cumsum[-1] - cumsum[:-1]) / (n - split)
    below = cumsum[:-1] / split
    v1, v2 = (above + below) / 2, (above - below) / 2
    ok = (above >= below) & (v1 >= a[:-1]) & (v1 < a[1:])
    first = cumsum[-1] / n / 2
    pairs = [(first, first)] if first < a[0] else []
    pairs += list(zip(v1[ok], v2[ok], strict=True))
    best, best_q = torch.linalg.vector_norm(w), torch.zeros_like(w)
    v = torch.zeros(2, dtype=w.dtype, device=w.device)
    for pair in pairs:
        r = w.detach().clone()
        for vi in pair:
            r.sub_(vi * binary_sign(r))
        error = torch.linalg.vector_norm(r)
        if error < best:
            best, best_q, v = error, w - r, torch.stack(pair)
    return best_q, signs @ v


def _v1_per_row(p: torch.Tensor, least_squares: bool = False) -> torch.Tensor:
    """`compute_v_per_channel(p, dim=-1, ternary=False)` (torchao's parq/quant/lsbq.py):
    each row's v_1 (C, 1), its candidates padded with 0 as the reference's nested tensor.
    `least_squares`: each candidate is scored by the residual it leaves with its own v_2 =
    mean|p - v_1 s_1| (what `lsbq_optimal_2bit` then takes), the padding left out (a row
    without candidates keeps v_1 = 0, as the reference's)."""
    cands = p.abs().sort(dim=-1).values
    cumsum = cands.cumsum(dim=-1)
    cumsum, total = cumsum[:, 1:-1], cumsum[:, -1:]
    counts = torch.arange(1, p.size(-1), device=p.device)
    r2l = (total - cumsum).div_(counts[:-1].flip((-1,)).mul_(2))
    lo, hi = cands[:, 1:-1], cands[:, 2:]
    mask = (lo <= r2l).logical_and_(hi >= r2l)
    l2r = cumsum.div_(counts[1:].mul_(2)).add_(r2l)
    mask.logical_or_((lo <= l2r).logical_and_(hi >= l2r))
    # each row's candidates in order, then zeros: the reference's padded nested tensor
    width = max(int(mask.sum(dim=-1).max()), 1)
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :width]
    kept = torch.arange(width, device=p.device) < mask.sum(dim=-1, keepdim=True)
    v = torch.where(kept, lo.gather(1, order), 0.0).unsqueeze(-1)
    r = p.unsqueeze(-2)
    r = r.sub(v * binary_sign(r))
    r = r.sub((r.abs().mean(dim=-1, keepdim=True) if least_squares else v) * binary_sign(r))
    cost = torch.linalg.vector_norm(r, dim=-1)
    if least_squares:
        cost = cost.masked_fill(~kept, torch.inf)
    best = cost.argmin(dim=-1, keepdim=True)
    return v.squeeze(-1).gather(1, best)


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

    - `center` (both): the levels are set on w - mean(w), per tensor or row, and the mean is
      added back to them and to the rounded weights, as the reference quantizers' `center`
      does; the levels are then a `LevelGrid` (table) too.
    - `optimal` (lsbq at 2 bits): LSBQuantizer's least-squares v_1, v_2
      (`lsbq_optimal_2bit`); its 1-bit solution is the greedy one, and for more bits the
      reference has none (refused here). Its ternary levels (b = 0) are not implemented.
      Per channel, `optimal_rows: least_squares` scores the reference's candidate v_1 by
      the residual each leaves (the reference's scoring, `reference`, is the default).

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
        LSBQ's and centred levels are a table."""
        # records from before LSBQ and centring have neither key
        if options.get("levels") == "lsbq" or options.get("center"):
            return LOOKUP
        return EXTRA_BIT if options["int_shift"] == 0.5 else UNIFORM

    def __init__(self, cfg: PARQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        super().__init__(bits)
        if cfg.optimal and bits > 2:
            raise ConfigError(
                f"quantizer.optimal=true at {bits} bits: LSBQ's optimal levels exist for 1 "
                "and 2 bits only (with first_last=bits the first and last layers take "
                "first_last_bits); use bits=2 with first_last=same or fp, or optimal=false"
            )
        self.cfg = cfg
        self.per_channel = cfg.per_channel
        self.deploy = self.deploy_for(vars(cfg))
        self.lsbq = cfg.levels == "lsbq"
        self.uneven = self.lsbq or cfg.center
        half = 2 ** (bits - 1)
        if cfg.int_shift == 0.5 or self.lsbq:
            self.n, self.p, self.offset = -half, half - 1, 0.5
        else:
            self.n, self.p, self.offset = -(half - 1), half - 1, 0.0
        rows = (channels,) if cfg.per_channel else ()
        if self.uneven:
            self.register_buffer("values", torch.zeros(*rows, self.p - self.n + 1))
        else:
            self.register_buffer("scale", torch.ones(rows))
        if self.lsbq:
            self.register_buffer("signs", sign_patterns(bits), persistent=False)

    def init_from(self, w: torch.Tensor) -> None:
        self.set_levels(w)
        self.ready = True

    def _rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w as the reference quantizes it: its rows (C, K) per channel, else flat, less their
        mean where `center` (the mean, (C, 1) or one value, is returned; else None)."""
        rows = w.detach().flatten(1) if self.per_channel else w.detach().reshape(-1)
        if not self.cfg.center:
            return rows, None
        mean = rows.mean(dim=-1, keepdim=True) if self.per_channel else rows.mean()
        return rows - mean, mean

    def _scale(self, rows: torch.Tensor) -> torch.Tensor:
        """Uniform levels' step, q_max / (2^(b-1) - int_shift) (`get_q_max`): (C, 1) or one."""
        a = rows.abs()
        top, mean = (
            a.amax(dim=-1, keepdim=self.per_channel),
            a.mean(dim=-1, keepdim=self.per_channel),
        )
        if self.cfg.scale_method == "mean":
            top = torch.minimum(self.bits * mean, top)
        top = top.clamp(min=torch.finfo(top.dtype).tiny)
        return top / (2 ** (self.bits - 1) - self.cfg.int_shift)

    def _lsbq(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.optimal and self.bits == 2:
            return lsbq_optimal_2bit(rows, self.signs, self.cfg.optimal_rows == "least_squares")
        return lsbq_greedy(rows, self.bits, self.signs)

    @torch.no_grad()
    def set_levels(self, w: torch.Tensor) -> None:
        """The levels of `w` (the latent weights), as the reference quantizer's `quantize`
        computes them."""
        rows, mean = self._rows(w)
        if self.lsbq:
            levels = self._lsbq(rows)[1]
        else:
            s = self._scale(rows)
            if not self.uneven:
                self.scale.copy_(s.flatten() if self.per_channel else s)
                return
            levels = UniformGrid(
                s.flatten() if self.per_channel else s, self.n, self.p, self.offset
            ).levels()
        self.values.copy_(levels if mean is None else levels + mean)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """w rounded as the reference quantizer's `quantize` rounds it on the levels it sets:
        uniform, (clamp(round(w / s - offset), n, p) + offset) s (UnifQuantizer clamps w to
        ±q_max first, which gives the same codes); lsbq, each weight's sum of ±v_i (greedy:
        its nearest level where v_1 >= v_2 + ... + v_b, v_2 >= v_3 + ..., and otherwise
        not always; LSBQuantizer's q, which the proximal map uses where it sets the levels at
        hard rounding); with `center`, on w - mean, the mean added back."""
        rows, mean = self._rows(w)
        if self.lsbq:
            q = self._lsbq(rows)[0]
        else:
            s = self._scale(rows)
            q = (torch.clamp(torch.round(rows / s - self.offset), self.n, self.p) + self.offset) * s
        return (q if mean is None else q + mean).view(w.shape)

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
            raise NotDeployable("LSBQ's or centred levels are a table (`grid(w)`)")
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
