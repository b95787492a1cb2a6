"""The quantizer interface, the grids quantizers describe (uniform, or a set of levels:
PARQ's LSBQ), the quantizer registry, the capabilities that policies ask of a quantizer,
and how a quantizer's levels map to the integers of a deployed model (`Quantizer.deploy`,
`IntegerForm`, `ThresholdForm`).

A quantizer plugin is one module that defines a `Quantizer` subclass and registers it:

    @QUANTIZERS.register("lsq", LSQConfig)
    class LSQQuantizer(Quantizer):
        def __init__(self, cfg: LSQConfig, bits: int, channels: int | None, is_weight: bool)

(every quantizer takes these four arguments; `channels` is the number of output channels
of a weight, None for activations), plus `conf/quantizer/<name>.yaml` (and
`conf/act_quantizer/<name>.yaml` if it quantizes activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.registry import Entry, Registry

# What a quantizer can do, and what policies may require (Policy.requires):
QUANTIZED = "quantized"  # quantizes weights during training (all but the activation-only ones)
FULL_PRECISION = "full_precision"  # trains in full precision (quantizer: none)
FIXED_GRID = "fixed_grid"  # its grid does not move with the weights it quantizes
ACTIVATIONS = "activations"  # can quantize activations as well as weights
DECOUPLED = "decoupled_thresholds"  # thresholds and levels have steps of their own (AOQ)
PROXIMAL = "proximal"  # no straight-through estimator: a policy's proximal map sets the weights

# (what a policy needing it does, what a quantizer lacking it does), for error messages
CAPABILITIES = {
    QUANTIZED: ("acts on quantized weights", "trains in full precision"),
    FULL_PRECISION: (
        "trains in full precision and quantizes after training",
        "quantizes the weights during training",
    ),
    FIXED_GRID: ("pins weights to codes of a fixed grid", "recomputes its grid from the weights"),
    ACTIVATIONS: ("quantizes activations", "quantizes weights only"),
    DECOUPLED: (
        "schedules the thresholds' and the levels' steps apart",
        "has one step for thresholds and levels",
    ),
    PROXIMAL: (
        "maps the weights onto the quantizer's levels itself",
        "rounds the weights in its forward pass (a straight-through estimator)",
    ),
}


# How a quantizer's levels map to integers (Quantizer.deploy; the report's "deployable")
UNIFORM = "yes"  # level = scale (code - zero point): QuantizeLinear/DequantizeLinear at b bits
EXTRA_BIT = "at b+1 bits"  # mid-rise levels (k + 1/2) s: the odd integer 2k + 1 on a step s / 2
LOOKUP = "lookup"  # learned thresholds (LTQ: compared) or uneven levels (LSBQ: a table)


class NotDeployable(ValueError):
    """A quantizer or run that has no integer model; says why."""


@dataclass
class IntegerForm:
    """A quantizer's levels as integers: level = scale (code - zero_point) + offset, for the
    codes qmin..qmax; `scale` is one value or one per index of `axis`. `offset` (LSQ+'s
    real-valued one) is a float subtraction before QuantizeLinear and an addition after
    DequantizeLinear, which a deployment compiler folds into the neighbouring layers'
    biases."""

    scale: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    zero_point: int = 0
    offset: float | None = None

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        """The bits its codes need."""
        top = max(self.qmax + 1, -self.qmin) if self.signed else self.qmax + 1
        return math.ceil(math.log2(max(top, 2))) + int(self.signed)


@dataclass
class ThresholdForm:
    """An input quantizer whose codes come from learned thresholds, not a rounding (LOOKUP
    inputs: LTQ): the code of x is the number of `edges` below x * `scale_in` (a
    multi-threshold), and its level is `levels`' (a uniform IntegerForm)."""

    scale_in: torch.Tensor
    edges: torch.Tensor
    levels: IntegerForm


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(n, p): the smallest and largest integer code of a uniform grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def channel_view(s: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Reshape a per-channel step (C,) to broadcast over x's output-channel dim 0."""
    return s.view(-1, *([1] * (x.dim() - 1))) if per_channel else s


STEP_EPS = torch.finfo(torch.float32).eps  # the smallest step `keep_positive` allows


def keep_positive_(step: torch.Tensor) -> None:
    """A learned step set to max(|step|, eps), eps = float32's, in place through `.data` (no
    autograd version bump), as torch.ao's `_LearnableFakeQuantize` does before its fused op
    (the quantizers' `keep_positive`)."""
    step.data.abs_().clamp_(min=STEP_EPS)


def kept_positive(step: torch.Tensor) -> torch.Tensor:
    """The value `keep_positive_` leaves, without changing `step`."""
    return step.abs().clamp(min=STEP_EPS)


def straight_through(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, the identity gradient to x in the backward pass.
    Written as value + (x - x), not x + (value - x), so the output is exactly `value`."""
    return value.detach() + (x - x.detach())


@dataclass
class UniformGrid:
    """Levels step * (k + offset) for the integer codes k = n..p, and decision thresholds
    halfway between neighbouring levels. `offset` 0 puts a level at zero (LSQ, round to
    nearest), 0.5 makes a mid-rise grid without one (StatsQ, AOQ). `step` is detached and
    broadcasts against the tensor being quantized (a scalar, or one per output channel)."""

    step: torch.Tensor
    n: int
    p: int
    offset: float = 0.0

    def _codes(self, first: int, last: int) -> torch.Tensor:
        return torch.arange(first, last + 1, device=self.step.device, dtype=self.step.dtype)

    def _rows(self) -> torch.Tensor:
        return self.step.reshape(-1, 1) if self.step.dim() else self.step

    def levels(self) -> torch.Tensor:
        """Shape (L,), or (channels, L) for a per-channel step."""
        return self._rows() * (self._codes(self.n, self.p) + self.offset)

    def thresholds(self) -> torch.Tensor:
        """Shape like `levels` less one."""
        return self._rows() * (self._codes(self.n, self.p - 1) + self.offset + 0.5)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest level, broadcastable against the quantized tensor."""
        return self.step * (self.n + self.offset), self.step * (self.p + self.offset)

    def code_centre(self, codes: torch.Tensor) -> torch.Tensor:
        """The level of each code: a value that rounds back to the code."""
        return self.step * (codes + self.offset)

    def threshold_distance(self, x: torch.Tensor) -> torch.Tensor:
        """|x - nearest threshold| (beyond the grid: to the outermost one). Thresholds lie
        at step * (j + f) with f = 0 or 0.5, j over a shifted code range."""
        shift = int(self.offset + 0.5)  # thresholds at step * (j + frac), j from n + shift
        frac = self.offset + 0.5 - shift
        t = x.detach() / self.step - frac
        j = torch.clamp(torch.round(t), self.n + shift, self.p - 1 + shift)
        return (t - j).abs() * self.step


def bucket(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """torch.bucketize(x, edges) (right=False): against one sorted edges (E,), or row by row
    against one per row (C, E) for x (C, K)."""
    if edges.dim() == 1:
        return torch.bucketize(x, edges)
    return torch.searchsorted(edges.contiguous(), x.contiguous())


def take(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values[idx] for one set (L,), row by row for one per row (C, L)."""
    return values[idx] if values.dim() == 1 else values.gather(1, idx)


@dataclass
class LevelGrid:
    """Sorted levels that need not be evenly spaced (PARQ's LSBQ levels, sums of ±v_i): one
    set `values` (L,) for the whole tensor, or one per output channel (C, L), for a tensor of
    `dims` dimensions. Level i has the code n + i; the thresholds lie halfway between
    neighbours, where rounding to the nearest level decides. `step` is the mean spacing
    (last - first) / (L - 1), the uniform grid's step where the levels are evenly spaced."""

    values: torch.Tensor
    n: int
    dims: int

    @property
    def p(self) -> int:
        return self.n + self.values.shape[-1] - 1

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        """A value per row (C,) shaped to broadcast over the tensor's dim 0."""
        return t.view(-1, *([1] * (self.dims - 1))) if self.values.dim() == 2 else t

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.values.dim() == 2 else x.reshape(-1)

    @property
    def step(self) -> torch.Tensor:
        first, last = self.values[..., 0], self.values[..., -1]
        return self._view((last - first) / (self.values.shape[-1] - 1))

    def levels(self) -> torch.Tensor:
        return self.values

    def thresholds(self) -> torch.Tensor:
        return (self.values[..., :-1] + self.values[..., 1:]) / 2

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._view(self.values[..., 0]), self._view(self.values[..., -1])

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The index of each element's nearest level, shaped like x (a tie: the lower)."""
        return bucket(self._rows(x.detach()), self.thresholds()).view(x.shape)

    def code_centre(self, codes: torch.Tensor) -> torch.Tensor:
        return take(self.values, self._rows(codes - self.n).long()).view(codes.shape)

    def threshold_distance(self, x: torch.Tensor) -> torch.Tensor:
        t, rows = self.thresholds(), self._rows(x.detach())
        i = bucket(rows, t)
        below = take(t, (i - 1).clamp_(min=0))
        above = take(t, i.clamp_(max=t.shape[-1] - 1))
        return torch.minimum((rows - below).abs(), (rows - above).abs()).view(x.shape)


class Quantizer(nn.Module):
    """Fake quantizer: `forward(x)` returns x on the grid with straight-through gradients.

    What policies, the tracker and the evaluation read of a quantizer (its interface):
    `to_int(x)` the integer codes the forward pass uses; `grid(x)` its `UniformGrid` (or
    `LevelGrid`) for tensor x (some grids are statistics of x), from which `levels`,
    `thresholds`, `step`, `bounds`, `threshold_distance` and `code_centre` follow;
    `after_step(x)`, the loop's call after each optimizer step. A quantizer whose scale
    comes from data is set up by `init_from(x)` once (weights at swap time, activations on
    a calibration batch); `ready` says whether that happened. Non-tensor state (`ready`, and
    the attributes a subclass names in `extra_state`) travels in the module's extra state,
    so `load_state_dict` restores it.

    Declarations read by the configuration check (class attributes): `bit_range`,
    `capabilities`, `bit_note`, said when `bits` is out of range, and `driven_by`, the
    policy that puts the weights on its levels where the quantizer's own forward does not
    (PARQ's proximal map). For export, `deploy`
    (UNIFORM, EXTRA_BIT or LOOKUP) says how its levels map to integers, and
    `integer_form(x)` gives that map for tensor x (activations: for any input), the one the
    forward pass computes levels with, so that scale * (code - zero_point) is bit for bit
    the fake-quantized value. A LOOKUP input quantizer gives its codes' `threshold_form()`; a
    LOOKUP weight quantizer's levels are its `grid(w)`, a `LevelGrid` (a table).
    """

    deploy: str  # every quantizer declares it (one whose options decide: `deploy_for(options)`)
    bit_range: range = range(2, 9)
    bit_note: str = ""
    capabilities: frozenset[str] = frozenset({QUANTIZED})
    driven_by: str | None = None  # the policy a run with this weight quantizer must have
    extra_state: tuple[str, ...] = ()  # attributes saved with the state dict, besides `ready`
    uneven: bool = False  # its levels are not evenly spaced: `grid` is a LevelGrid
    bits: int
    signed: bool
    per_channel: bool

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.ready = False

    def init_from(self, x: torch.Tensor) -> None:
        self.ready = True  # a quantizer whose scale is a statistic of x has nothing to set

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer code of each element of x (no gradient)."""
        raise NotImplementedError

    def after_step(self, x: torch.Tensor) -> None:
        """Weight quantizers: called by the training loop once after every optimizer step
        with the weight, after the policies' `on_step_end` and before the tracker reads the
        codes; for state that follows the weight from step to step (an EMA of it)."""

    def grid(self, x: torch.Tensor) -> UniformGrid | LevelGrid:
        """The grid on which x is quantized."""
        raise NotImplementedError

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Real values of the grid points for tensor x, shape (L,) or (channels, L)."""
        return self.grid(x).levels()

    def thresholds(self, x: torch.Tensor) -> torch.Tensor:
        """Decision thresholds between consecutive levels, shape like `levels` minus one."""
        return self.grid(x).thresholds()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Distance between neighbouring thresholds for x, broadcastable against x."""
        return self.grid(x).step

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest level for x (detached), broadcastable against x."""
        return self.grid(x).bounds()

    def live_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`bounds(x)` with the gradient the quantizer's forward gives its learned scale
        through clipping (LSQ: n and p times the step gradient scale g); detached where
        the scale is not learned (the default)."""
        return self.bounds(x)

    def threshold_distance(self, x: torch.Tensor) -> torch.Tensor:
        """|x - nearest threshold| per element (beyond the grid: to the outermost one)."""
        return self.grid(x).threshold_distance(x)

    def code_centre(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The middle of each code's bin on x's grid, shaped like x: where policies pin
        weights. On a fixed grid (FIXED_GRID), `to_int` maps it back to the code."""
        return self.grid(x).code_centre(codes)

    def integer_form(self, x: torch.Tensor | None) -> IntegerForm:
        """How x's levels map to integers (weights: x is the weight; activations: None)."""
        raise NotDeployable(f"{type(self).__name__} declares no integer form ({self.deploy})")

    def threshold_form(self) -> ThresholdForm:
        """How an input quantizer's codes come from learned thresholds (LOOKUP inputs)."""
        raise NotDeployable(f"{type(self).__name__} declares no threshold form ({self.deploy})")

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> torch.Tensor:
        """A weight's integer codes in `integer_form(w)`: `to_int`'s (on a LOOKUP grid, the
        index of the level in the table, shifted by the grid's first code), or on a mid-rise
        grid (EXTRA_BIT) the odd integers 2 k + 1."""
        k = self.to_int(w)
        return 2 * k + 1 if self.deploy == EXTRA_BIT else k

    def get_extra_state(self) -> dict:
        return {"ready": self.ready, **{k: getattr(self, k) for k in self.extra_state}}

    def set_extra_state(self, state: dict) -> None:
        self.ready = state["ready"]
        for k in self.extra_state:
            setattr(self, k, state[k])

    def _check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError(
                f"{type(self).__name__} used before init_from(); "
                "call oscbench.quant.modules.calibrate(model, batch) after quantize_model"
            )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={self.per_channel}"


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
QUANTIZERS.add(Entry("none", None, None))  # quantizer: none: every layer stays in full precision


def capabilities(name: str) -> frozenset[str]:
    """What quantizer `name` can do (quantizer=none: train in full precision)."""
    entry = QUANTIZERS.get(name)
    if entry.build is None:
        return frozenset({FULL_PRECISION})
    return entry.declares("capabilities", frozenset())


def deployability(config: dict) -> str:
    """How a run's levels map to integers (`Quantizer.deploy`): the least deployable of its
    weight and input quantizers'; `fp` for full precision (PTQ: weights rounded to nearest
    on a uniform grid)."""
    if config.get("ptq"):
        return UNIFORM
    if config["quantizer"]["name"] == "none":
        return "fp"
    parts = [config["quantizer"], config["act_quantizer"]]
    kinds = [_deploy(part) for part in parts if part["name"] != "none"]
    return max(kinds, key=[UNIFORM, EXTRA_BIT, LOOKUP].index)


def _deploy(options: dict) -> str:
    """A configured quantizer's `deploy`: its class's, or where the options decide it, its
    `deploy_for(options)`."""
    entry = QUANTIZERS.get(options["name"])
    rule = entry.declares("deploy_for", None)
    return rule(options) if rule else entry.declares("deploy", LOOKUP)


def clip_to_grid(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """w clamped to [lowest, highest level] of q's grid for w."""
    return torch.clamp(w, *q.bounds(w))
