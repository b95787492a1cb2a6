"""The quantizer interface every weight or activation quantizer implements."""

from __future__ import annotations

import torch
from torch import nn


class Quantizer(nn.Module):
    """Fake quantizer: `forward(x)` returns x on the grid with straight-through gradients.

    Policies and the oscillation tracker see a quantizer only through `to_int` (integer
    codes), `levels`, `thresholds`, `step`, `threshold_distance` and `code_centre`; each
    takes the tensor being quantized, since some grids (StatsQ) are statistics of it.
    A quantizer whose scale comes from data is set up by `init_from(x)` once (weights at
    swap time, activations on a calibration batch); `ready` says whether that happened.
    Non-tensor state (`ready`, data-dependent constants) travels in the module's extra
    state, so `load_state_dict` restores it.
    """

    bits: int
    signed: bool
    per_channel: bool
    learnable_params: tuple[str, ...] = ()

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.ready = False

    def init_from(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer code of each element of x (no gradient)."""
        raise NotImplementedError

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Real values of the grid points for tensor x, shape (L,) or (channels, L)."""
        raise NotImplementedError

    def thresholds(self, x: torch.Tensor) -> torch.Tensor:
        """Decision thresholds between consecutive levels, shape like `levels` minus one."""
        raise NotImplementedError

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Distance between neighbouring thresholds for x, broadcastable against x."""
        raise NotImplementedError

    def threshold_distance(self, x: torch.Tensor) -> torch.Tensor:
        """|x - nearest threshold| per element (beyond the grid: to the outermost one)."""
        raise NotImplementedError

    def code_centre(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A latent value for each code that `to_int` maps back to that code (the middle of
        its bin), for policies that pin weights; shaped like x."""
        raise NotImplementedError

    def get_extra_state(self) -> dict:
        return {"ready": self.ready}

    def set_extra_state(self, state: dict) -> None:
        self.ready = state["ready"]

    def _check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError(
                f"{type(self).__name__} used before init_from(); "
                "call oscbench.quant.calibrate(model, batch) after quantize_model"
            )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={self.per_channel}"


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(n, p): the smallest and largest integer code of a uniform grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def channel_view(s: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Reshape a per-channel step (C,) to broadcast over x's output-channel dim 0."""
    return s.view(-1, *([1] * (x.dim() - 1))) if per_channel else s


def uniform_threshold_distance(
    x: torch.Tensor, step: torch.Tensor, offset: float, kmin: int, kmax: int
) -> torch.Tensor:
    """Distance of x to the nearest threshold of a uniform set step * (k + offset),
    k = kmin..kmax; `step` broadcasts against x."""
    t = x / step - offset
    return (t - torch.clamp(torch.round(t), kmin, kmax)).abs() * step


def grid_bounds(q: Quantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest level of q's grid for w (detached), broadcastable against w."""
    lv = q.levels(w).detach()
    per_channel = lv.dim() == 2
    return channel_view(lv[..., 0], w, per_channel), channel_view(lv[..., -1], w, per_channel)


def clip_to_grid(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """w clamped to [lowest, highest level] of q's grid (detached bounds)."""
    return torch.clamp(w, *grid_bounds(q, w))


def straight_through(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, the identity gradient to x in the backward pass.
    Written as value + (x - x), not x + (value - x), so the output is exactly `value`."""
    return value.detach() + (x - x.detach())
