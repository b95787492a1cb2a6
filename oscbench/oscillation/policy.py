"""The policy interface: hooks the training loop calls around each optimizer step.

A method is one quantizer plus zero or more policies (`policy:` in the config, several
allowed). A policy plugin is one module that defines a `Policy` subclass and registers it:

    @POLICIES.register("freeze", FreezeConfig)
    class Freeze(Policy):
        requires = frozenset({QUANTIZED, FIXED_GRID})
        def __init__(self, cfg: FreezeConfig, run: RunContext)

plus `conf/policy/<name>.yaml`. A policy is a module: its buffers and its extra state are
its own, saved and restored with the run. It sees quantizers only through the `Quantizer`
interface and layers through `QuantizedLayer`'s (oscbench.quant), and reads the
oscillation tracker the run hands it (`run.tracker`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.tracker import OscillationTracker
from oscbench.registry import Registry


@dataclass
class Schedule:
    """A run's optimizer steps: `main` in the main epochs, `total` with the extra epochs
    (trainer.extra_epochs), `per_epoch`."""

    total: int
    main: int
    per_epoch: int


@dataclass
class RunContext:
    """What a policy is built from: the quantized model, the tracker (None in full
    precision), the run's weight bits, its schedule, its optimizer's name (sgd, adamw;
    the toys' adam) and the images each optimizer step averages its gradient over."""

    model: nn.Module
    tracker: OscillationTracker | None
    bits: int
    schedule: Schedule
    optimizer: str
    batch_size: int = 1


# probe(n, policy): n plain training steps, undone afterwards (Policy.on_epoch_start)
Probe = Callable[[int, "Policy"], Iterator[int]]


class Policy(nn.Module):
    """Base class; every hook is optional. `requires`: the quantizer capabilities the policy
    needs (oscbench.quant.base), checked with the configuration before any training, as is
    `not_on_folded` (with `bn_fold`)."""

    requires: frozenset[str] = frozenset()
    # why the policy cannot act on weights with BatchNorm folded in (bn_fold), or None
    not_on_folded: str | None = None

    def on_epoch_start(self, epoch: int, probe: Probe) -> None:
        """Before the first step of epoch `epoch` (0-based; also when a run resumes there).
        `probe(n, self)` runs n training steps on batches of their own (a stream apart from
        the epochs'), with this policy alone (no tracker, no other policy), yielding after
        each; when it ends, the model, the optimizer, this policy's state and the random
        state are put back as they were: a measurement that leaves no trace."""

    def on_step_start(self, step: int, total: int) -> None:
        """Before the forward pass of optimizer step `step` (0-based) of `total`; the
        tracker holds the codes this forward will use."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss, or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """After backward, before the optimizer step (e.g. gradient masking)."""

    def optimizer_step(self, opt: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        """Wraps the optimizer step: `step()` runs it (with the wrappers of the policies after
        this one). A policy may surround it or take some parameters out of it and update them
        itself. The optimizer's groups are named (`group["name"]`): "latent" (the quantized
        layers' weights), "other", "no_decay" (trainer.no_weight_decay's), and "quantizer"
        (quantizer parameters)."""
        step()

    def on_step_end(self, model: nn.Module) -> None:
        """After the optimizer step, before the tracker reads the new codes (e.g. putting
        back weights the step must not move, so that the tracker never counts them)."""

    def metrics(self) -> dict[str, float]:
        """Schedule values and loss terms for the epoch record (called once per epoch)."""
        return {}


POLICIES: Registry[Policy] = Registry("policy")


def build_policies(components, run: RunContext) -> list[Policy]:  # noqa: ANN001
    """Build validated `Component`s (see oscbench.launch.config) into policies."""
    return [POLICIES.get(c.name).build(c.options, run) for c in components]


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
