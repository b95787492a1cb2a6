"""The policy interface: hooks the training loop calls around each optimizer step.

A method is one quantizer plus zero or more policies (`policy:` in the config, several
allowed). Policies see quantizers only through the `Quantizer` interface and may keep
state in buffers of their own, saved with the run.
"""

from __future__ import annotations

import torch
from torch import nn

from oscbench.registry import Registry


class Policy:
    """Base class; every hook is optional."""

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Called once after the model is quantized and calibrated."""

    def on_step_start(self, step: int, total: int) -> None:
        """Before the forward pass of optimizer step `step` (0-based) of `total`."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss, or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """After backward, before the optimizer step (e.g. gradient masking)."""

    def on_step_end(self, model: nn.Module) -> None:
        """After the optimizer step (e.g. restoring frozen weights)."""

    def metrics(self) -> dict[str, float]:
        """Schedule values and loss terms for the epoch record."""
        return {}


POLICIES: Registry[Policy] = Registry("policy")


def build_policies(components, model: nn.Module) -> list[Policy]:  # noqa: ANN001
    """Build validated `Component`s (see oscbench.config) into policies."""
    return [POLICIES.get(c.name).build(c.options, model=model) for c in components]
