"""The policy interface: hooks the training loop calls around each optimizer step.

A method is one quantizer plus zero or more policies (`policy:` in the config, several
allowed). Policies see quantizers only through the `Quantizer` interface and may keep
state in buffers of their own, saved with the run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oscbench.registry import Registry


class Policy:
    """Base class; every hook is optional. Builders take (options, model, bits)."""

    extra_epochs: int = 0  # epochs this policy adds after the main run (CGA, as OFQ does)
    phase_lr: float | None = None  # constant learning rate during those extra epochs

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        """Called once after the model is quantized, calibrated and given trackers;
        `total_steps` includes every policy's extra epochs."""

    def on_step_start(self, step: int, total: int) -> None:
        """Before the forward pass of optimizer step `step` (0-based) of `total`; the
        trackers hold the codes this forward will use."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss, or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """After backward, before the optimizer step (e.g. gradient masking)."""

    def on_step_end(self, model: nn.Module) -> None:
        """After the optimizer step, before the trackers read the new codes (e.g. putting
        back weights the step must not move, so that the trackers never count them)."""

    def metrics(self) -> dict[str, float]:
        """Schedule values and loss terms for the epoch record (called once per epoch)."""
        return {}

    def state_dict(self) -> dict:
        """Python-side state a resume needs (tensors belong in module buffers instead)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


POLICIES: Registry[Policy] = Registry("policy")


def build_policies(components, model: nn.Module, bits: int) -> list[Policy]:  # noqa: ANN001
    """Build validated `Component`s (see oscbench.config) into policies."""
    return [POLICIES.get(c.name).build(c.options, model=model, bits=bits) for c in components]


def delayed_cosine(
    t: int, total: int, begin: float, start: float, end: float, before: float
) -> float:
    """Nagel et al.'s schedule of the dampening weight and the freezing threshold
    (oscillations-qat, `utils.CosineTempDecay` with the handlers in `utils/qat_utils.py`),
    on their iteration counter t = 1..total (ignite's, which starts at 1): `before` while
    t < begin * total, then a cosine from `start` to `end`, which it reaches at t = total."""
    first = begin * total
    if t < first:
        return before
    progress = min((t - first) / max(total - first, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


class EpochMean:
    """Mean of a per-step scalar over an epoch, kept on device (no host sync per step)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.n = 0

    def add(self, value: torch.Tensor | float) -> None:
        self.total = self.total + (value.detach() if isinstance(value, torch.Tensor) else value)
        self.n += 1

    def pop(self) -> float:
        out = float(self.total) / self.n if self.n else 0.0
        self.total, self.n = 0.0, 0
        return out
