"""The quantizer interface every weight or activation quantizer implements."""

from __future__ import annotations

import torch
from torch import nn


class Quantizer(nn.Module):
    """Fake quantizer: `forward(x)` returns x on the grid with straight-through gradients.

    Policies and the oscillation tracker see a quantizer only through `to_int` (integer
    codes), `levels`, `thresholds` and `step`. A quantizer whose scale comes from data is
    set up by `init_from(x)` once (weights at swap time, activations on a calibration
    batch); `ready` says whether that happened. Non-tensor state (`ready`, data-dependent
    constants) travels in the module's extra state, so `load_state_dict` restores it.
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

    def levels(self) -> torch.Tensor:
        """Real values of the grid points, shape (levels,) or (channels, levels)."""
        raise NotImplementedError

    def thresholds(self) -> torch.Tensor:
        """Decision thresholds between consecutive levels, shape like `levels()` minus one."""
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """Distance between neighbouring thresholds, per tensor or per output channel."""
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
