"""LSQ: learned step size quantization (Esser et al., ICLR 2020, arXiv:1902.08153)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.quant.base import (
    ACTIVATIONS,
    FIXED_GRID,
    QUANTIZED,
    QUANTIZERS,
    UNIFORM,
    IntegerForm,
    Quantizer,
    UniformGrid,
    channel_view,
    int_range,
    keep_positive_,
    kept_positive,
)
from oscbench.registry import check


@dataclass
class LSQConfig:
    """Options of `quantizer: lsq` / `act_quantizer: lsq` (values live in conf/)."""

    per_channel: bool
    init: str  # "lsq": s = 2 mean|x| / sqrt(p) (Esser et al.); "mse": grid search (Nagel et al.);
    # "max": max|x| / p (StableQAT's and ParetoQ's `train.py`)
    grad_scale: bool  # g = 1/sqrt(numel * p); off gives plain STE gradients to s
    signed: (
        str  # auto (inputs: unsigned unless the calibration data has negatives) | signed | unsigned
    )
    keep_positive: bool  # s = max(|s|, eps) before each forward (torch.ao); false: as it is

    def __post_init__(self) -> None:
        check(self.init in ("lsq", "mse", "max"), "init", self.init, "lsq, mse, max")
        check(
            self.signed in ("auto", "signed", "unsigned"),
            "signed",
            self.signed,
            "auto, signed, unsigned",
        )


def _save_and_scale(ctx, xs, r, q, s, g: float, ds=None) -> torch.Tensor:  # noqa: ANN001
    """The end of an LSQ-style forward: saves the straight-through mask (the unclamped code
    `r` equals the clamped `q`) and the step's coefficient `ds` (by default LSQ's, q - x/s
    inside the range, n or p outside) for the backward; returns q * s. Eagerly it writes
    into the buffers of xs, r and q (three in all). Compiled, the same values come from
    pure ops, which Inductor fuses anyway: torch 2.11's compiled backward read the mask and
    the step gradient as zeros after `q.mul_(s)` (a run with no gradients at all, at chance
    accuracy; 2.14 is right either way)."""
    cpu = xs.device.type == "cpu"
    if torch.compiler.is_compiling():
        inside = torch.eq(r, q).float() if cpu else torch.eq(r, q)
        ds = q - xs * inside if ds is None else ds
        out = q * s
    else:
        inside = torch.eq(r, q, out=r) if cpu else torch.eq(r, q)
        ds = torch.sub(q, xs.mul_(inside), out=xs) if ds is None else ds
        out = q.mul_(s)
    ctx.save_for_backward(inside, ds)
    ctx.g, ctx.s_shape = g, s.shape
    return out


def _lsq_grads(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
    """The gradients to x and s from what `_save_and_scale` saved."""
    inside, ds = ctx.saved_tensors
    grad_x = grad * inside if ctx.needs_input_grad[0] else None
    grad_s = None
    if ctx.needs_input_grad[1]:
        if len(ctx.s_shape) == 0 or ctx.s_shape.numel() == 1:
            grad_s = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(ctx.s_shape)
        elif ctx.s_shape[0] == 1:  # one step per input channel (dim 1) of an activation
            grad_s = (grad * ds).sum_to_size(ctx.s_shape)
        else:  # one step per output channel (dim 0)
            grad_s = torch.linalg.vecdot(grad.flatten(1), ds.flatten(1)).reshape(ctx.s_shape)
        grad_s = grad_s * ctx.g
    return grad_x, grad_s


class _LSQRound(torch.autograd.Function):
    """x -> s * clamp(round(x / s), n, p) with LSQ's gradients.

    Follows PyTorch's fused `_fake_quantize_learnable_*_affine`: x / s is computed as
    x * (1 / s); the straight-through mask keeps elements whose *rounded* code lies in
    [n, p]; the step gradient is (q - x/s) inside and n or p outside, times g. The forward
    keeps that mask and coefficient, so the backward is one product and one dot product.
    On the CPU the mask is kept as 0/1 floats: a product with a bool tensor (or `where`)
    is several times slower there than a float product; elsewhere it is a bool.
    """

    @staticmethod
    def forward(ctx, x, s, n: int, p: int, g: float):  # noqa: ANN001, ANN205
        xs = x * s.reciprocal()
        r = torch.round(xs)
        q = r.clamp(n, p)
        return _save_and_scale(ctx, xs, r, q, s, g)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return *_lsq_grads(ctx, grad), None, None, None


def lsq_quantize(x: torch.Tensor, s: torch.Tensor, n: int, p: int, g: float) -> torch.Tensor:
    """Functional LSQ fake quantization; s broadcasts against x."""
    return _LSQRound.apply(x, s, n, p, g)


def mse_step(
    x: torch.Tensor, n: int, p: int, per_channel: bool, candidates: int = 100
) -> torch.Tensor:
    """Step size minimising the fake-quantization MSE over a grid of max|x| fractions."""
    flat = x.detach().flatten(1) if per_channel else x.detach().reshape(1, -1)
    amax = flat.abs().amax(dim=1).clamp_min(1e-8)
    best = torch.full_like(amax, float("inf"))
    best_s = amax / max(p, 1)
    for frac in torch.linspace(0.05, 1.0, candidates).tolist():
        s = (amax * frac / max(p, 1)).unsqueeze(1)
        err = ((torch.clamp(torch.round(flat / s), n, p) * s - flat) ** 2).mean(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s.squeeze(1), best_s)
    return best_s if per_channel else best_s.reshape(())


@QUANTIZERS.register("lsq", LSQConfig)
class LSQQuantizer(Quantizer):
    """LSQ with a learnable step s (per tensor or per output channel).

    Weights are signed (n = -2^(b-1), p = 2^(b-1) - 1), activations after a ReLU unsigned
    (n = 0, p = 2^b - 1); with `signed: auto` the sign is read off the calibration batch,
    which is a choice of ours (Esser et al. quantize only post-ReLU activations as unsigned).
    The step's gradient is scaled by g = 1/sqrt(N p), N = the number of weights (per
    channel when per-channel) or, for activations, of features per sample (Esser et al.).

    Activations per channel (`per_channel: true`, OFQ's `--aq-per-channel`: nbasyl/OFQ at
    e1c8d1d6, `src/quantization/quantizer/lsq.py`: `LsqQuantizer4img` for conv inputs,
    `LsqQuantizer` for token inputs): one step per index of dim 1 (a conv input's channels;
    for (batch, tokens, features) inputs, OFQ's choice, each token position), sized and set
    from the calibration batch, 2 mean|x| / sqrt(p) per channel (OFQ uses 4 mean|x| for
    unsigned inputs: LSQ's rule is kept), g = 1/sqrt(N p) with N the elements per channel
    in that batch (OFQ's); a 2-D input (the classifier's) keeps one step (OFQ's
    `LsqQuantizer4head_input`). OFQ's learnable shifts around the quantizer are not here.
    """

    capabilities = frozenset({QUANTIZED, FIXED_GRID, ACTIVATIONS})
    deploy = UNIFORM
    extra_state = ("signed", "g", "per_channel")

    def __init__(self, cfg: LSQConfig, bits: int, channels: int | None, is_weight: bool) -> None:
        """`channels`: output channels for a per-channel weight quantizer, else None."""
        super().__init__(bits)
        self.cfg = cfg
        self.is_weight = is_weight
        self.per_channel = cfg.per_channel and (channels is not None or not is_weight)
        self.signed = is_weight if cfg.signed == "auto" else cfg.signed == "signed"
        self.n, self.p = int_range(bits, self.signed)
        per_row = self.per_channel and is_weight
        self.s = nn.Parameter(torch.ones(channels) if per_row else torch.ones(()))
        self.g = 1.0

    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.cfg.signed == "auto" and not self.is_weight:
            self.signed = bool((x < 0).any())
            self.n, self.p = int_range(self.bits, self.signed)
        if self.per_channel and not self.is_weight:
            self.per_channel = x.dim() > 2  # the classifier's input keeps one step
            x = x.transpose(0, 1) if self.per_channel else x  # channels first
        if self.cfg.init == "mse":
            s = mse_step(x, self.n, self.p, self.per_channel)
        elif self.cfg.init == "max":
            s = (x.abs().flatten(1).amax(dim=1) if self.per_channel else x.abs().amax()) / self.p
        elif self.per_channel:
            s = 2 * x.abs().flatten(1).mean(dim=1) / math.sqrt(self.p)
        else:
            s = 2 * x.abs().mean() / math.sqrt(self.p)
        if self.s.shape != s.shape:  # an activation's channels, known from its first batch
            self.s = nn.Parameter(torch.empty_like(s))
        self.s.data.copy_(s.clamp_min(1e-8))
        numel = x[0].numel() if (self.per_channel or not self.is_weight) else x.numel()
        self.g = 1.0 / math.sqrt(numel * self.p) if self.cfg.grad_scale else 1.0
        self.ready = True

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.n, self.p = int_range(self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Always in float32, also for bf16 activations under autocast, so that codes are
        exact (bf16 holds 8 significant bits: x / s would round before `round`)."""
        self._check_ready()
        self._keep_positive()
        x = x.float()
        return lsq_quantize(x, self._view(self.s, x), self.n, self.p, self.g)

    def _keep_positive(self) -> None:
        """`keep_positive`: s = max(|s|, eps) (`keep_positive_`). Off (Esser et al. state no
        guard), a step that the optimiser drives below 0 maps every input of an unsigned
        quantizer to 0 (the classifier's input in W2A2 runs on the claims benchmark, which
        fell to chance and stayed there)."""
        if self.cfg.keep_positive:
            keep_positive_(self.s)

    def _view(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The step broadcast against x: per output channel (dim 0) of a weight, per
        channel (dim 1) of an activation, or one."""
        if self.per_channel and not self.is_weight:
            return s.view(1, -1, *([1] * (x.dim() - 2)))
        return channel_view(s, x, self.per_channel)

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        s = self._view(self.s, x)
        return (x.float() * s.reciprocal()).round_().clamp_(self.n, self.p)

    def grid(self, x: torch.Tensor) -> UniformGrid:
        return UniformGrid(self._view(self.s.detach(), x), self.n, self.p)

    def integer_form(self, x: torch.Tensor | None) -> IntegerForm:
        """Codes n..p on the step the forward pass uses (after `keep_positive`), zero point
        0; per output channel (axis 0) of a weight, per channel (axis 1) of an input."""
        s = self.s.detach().float()
        if self.cfg.keep_positive:
            s = kept_positive(s)
        axis = (0 if self.is_weight else 1) if self.per_channel else None
        return IntegerForm(s, self.n, self.p, axis)

    def live_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """n s and p s, whose gradient reaches s scaled by g (the value is exactly s's)."""
        s = self._view(self.s, x)
        s = s.detach() + (s * self.g - (s * self.g).detach())
        return s * self.n, s * self.p
