"""The bin regulariser of VVTQ: dampening plus the variance of the weights inside each bin.

Huang, Shen, Dong, Cheng, "Quantization Variation: A New Perspective on Training
Transformers with Low-Bit Precision", TMLR 2024, arXiv:2307.00331; code
HuangOwen/Quantization-Variation at b9349f80: `util_loss.py` (`BinReg`,
`BinReg.dampening_loss`, `CosineTempDecay`), `train_VVTQ.py` (`--reg`: the schedule, and
the term added to the loss), `quantization/lsq_layer.py` (`get_quant_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, EpochMean, Policy, RunContext, delayed_cosine
from oscbench.quant.base import QUANTIZED
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check


@dataclass
class BinRegConfig:
    lambda_start: float  # VVTQ: 0 (`CosineTempDecay(temp_range=(0, 0.01))`)
    lambda_end: float  # VVTQ: 0.01
    start: float  # lambda_start before this share of training (VVTQ: 0.25), then cosine
    per: str  # epoch: lambda evaluated at the epoch index, as VVTQ's loop does | step
    aggregation: str  # dampening term over a layer: mean (VVTQ) | kernel_mean | sum
    detach_scale: bool  # false: the clipping bounds carry the step's gradient, as in VVTQ

    def __post_init__(self) -> None:
        check(self.lambda_start >= 0, "lambda_start", self.lambda_start, ">= 0")
        check(self.lambda_end >= 0, "lambda_end", self.lambda_end, ">= 0")
        check(0 <= self.start < 1, "start", self.start, "0 <= x < 1")
        check(self.per in ("epoch", "step"), "per", self.per, "epoch, step")
        check(
            self.aggregation in ("mean", "kernel_mean", "sum"),
            "aggregation",
            self.aggregation,
            "mean, kernel_mean, sum",
        )


class _BinTerm(torch.autograd.Function):
    """agg((w_q - c)^2) + sum over bins k with n_k > 1 of var_k(c), the unbiased variance
    of the clipped weights c = clamp(w, lo, hi) whose code is k; one pass each way.

    The variance of a bin does not change when a constant is taken off its weights, so it
    is computed on v = c - r with r constant per bin and within about half a step of c:
    r = w_q with one step per tensor (w_q depends on the code only), else code x (mean
    step). That keeps var_k = a_k (sum_k v^2 - n_k mu_k^2) well conditioned (a_k =
    1/(n_k - 1), 0 for a bin of one; mu_k the mean of v in bin k). sum_k a_k sum_k v^2 is
    one dot product with a_k gathered per weight, so only n_k and sum_k v are counted per
    bin. The gradient with respect to c is 2 a_k (v - mu_k) + 2 (c - w_q) / divisor (the
    means' own gradient cancels: sum_k (v - mu_k) = 0), passed to w inside [lo, hi] and to
    lo and hi beyond them, as `torch.clamp`'s gradient does."""

    @staticmethod
    def forward(ctx, w, lo, hi, wq, code, centre, bins: int, divisor: int):  # noqa: ANN001, ANN205
        c = torch.clamp_min(w, lo).clamp_max_(hi)  # clamp(w, lo, hi): 6x slower on a CPU
        e = (c - wq).reshape(-1)
        v = e if centre is None else (c - centre).reshape(-1)
        # Per-bin sums by index_add_, not bincount, whose CUDA kernel reads the largest code
        # on the host (a synchronisation every step); the same sums in the same order on the
        # CPU, and deterministic on CUDA under torch.use_deterministic_algorithms. The counts
        # are summed in float64: exact, as bincount's integers were.
        ones = v.new_ones((), dtype=torch.float64).expand(len(v))
        count = v.new_zeros(bins, dtype=torch.float64).index_add_(0, code, ones).to(c.dtype)
        mean = v.new_zeros(bins).index_add_(0, code, v) / count.clamp(min=1)
        a = torch.where(count > 1, 1 / (count - 1).clamp(min=1), 0.0)
        a_v = torch.index_select(a, 0, code).mul_(v)
        variance = torch.dot(a_v, v) - torch.dot(a * count * mean, mean)
        ctx.save_for_backward(w, c, lo, hi, e, a_v, code, a * mean)
        ctx.divisor = divisor
        return torch.dot(e, e) / divisor + variance

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        w, c, lo, hi, e, a_v, index, a_mean = ctx.saved_tensors
        g = a_v.sub_(torch.index_select(a_mean, 0, index)).add_(e, alpha=1 / ctx.divisor)
        g = g.mul_(2 * grad).view_as(w)
        side = torch.sub(w, c).sign_()  # -1 below lo, 1 above hi, 0 inside
        below = g * side.clamp(max=0)  # -g below lo, else 0
        above = g * side.clamp_(min=0)  # g above hi, else 0
        grad_lo = below.sum_to_size(lo.shape).neg_() if ctx.needs_input_grad[1] else None
        grad_hi = above.sum_to_size(hi.shape) if ctx.needs_input_grad[2] else None
        return g.add_(below).sub_(above), grad_lo, grad_hi, None, None, None, None, None


def _divisor(w: torch.Tensor, how: str) -> int:
    if how == "kernel_mean":  # sum over output channels, then the mean over the rest
        return w.numel() // w.shape[0]
    return 1 if how == "sum" else w.numel()


@POLICIES.register("binreg", BinRegConfig)
class BinReg(Policy):
    """L += lambda(t) sum over the quantized layers of
    agg((w_q - c)^2) + sum_k var({c_i : code_i = k}),
    with c = clip(w, s n, s p) the clipped latent weight, w_q the step's quantized weight
    (detached: its target), the variance unbiased (`torch.var`) and taken over the bins
    that hold more than one weight (VVTQ: `numel > 1`). Every quantized layer counts, the
    8-bit first and last ones too (VVTQ iterates over every quantized module).

    As in VVTQ's `get_quant_weight`, c = clamp(w / s, n, p) s keeps the step's gradient
    (scaled by LSQ's g): it reaches s through the clipped weights, which the end bins'
    variance pulls towards their bin's mean (`Quantizer.live_bounds`; `detach_scale: true`
    detaches it). lambda(t): VVTQ evaluates `CosineTempDecay(t_max=epochs,
    temp_range=(0, 0.01), rel_decay_start=0.25)` at the epoch index, so lambda_start before
    epoch `start` x epochs, then a cosine towards lambda_end, which the last epoch nearly
    reaches (`per: step` evaluates it at every step instead).

    Bins are the quantizer's codes (`to_int`), where VVTQ compares (w_q / s) with each
    integer k in floats; a product divided by its factor can miss k by an ulp, which would
    drop a weight from its bin there and never here.
    """

    requires = frozenset({QUANTIZED})

    def __init__(self, cfg: BinRegConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [m for _, m in quantized_layers(run.model)]
        self.schedule = run.schedule
        self.lam = 0.0
        self.loss = EpochMean()

    def on_step_start(self, step: int, total: int) -> None:
        cfg = self.cfg
        if cfg.per == "epoch":
            t, horizon = step // self.schedule.per_epoch, self.schedule.main
            horizon //= self.schedule.per_epoch
        else:
            t, horizon = step, total
        self.lam = delayed_cosine(
            t, horizon, cfg.start, cfg.lambda_start, cfg.lambda_end, before=cfg.lambda_start
        )

    def term(self, layer: nn.Module) -> torch.Tensor:
        """One layer's regulariser, without lambda."""
        q, w = layer.weight_quantizer, layer.quantizer_input()
        lo, hi = q.bounds(w) if self.cfg.detach_scale else q.live_bounds(w)
        grid = q.grid(w)
        bins, divisor = grid.p - grid.n + 1, _divisor(w, self.cfg.aggregation)
        with torch.no_grad():
            code = q.to_int(w).float()
            centre = None if grid.step.numel() == 1 else code * grid.step.mean()  # None: w_q
            idx = code.sub_(grid.n).reshape(-1).int()  # index_add_'s index: int32 or int64
            # a weight gone NaN (diverged training) has no code: any bin keeps index_add_ in
            # range, the term is NaN, and the loop stops with its own error on the NaN loss
            idx.clamp_(0, bins - 1)
        wq = layer.last_quantized_weight
        return _BinTerm.apply(w, lo, hi, wq, idx, centre, bins, divisor)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        loss = self.lam * sum(self.term(layer) for layer in self.layers)
        self.loss.add(loss)
        return loss

    def metrics(self) -> dict[str, float]:
        return {"binreg/lambda": self.lam, "binreg/loss": self.loss.pop()}
