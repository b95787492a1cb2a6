"""Q-Ramping: a longer update period, with accumulated gradients, for weights that oscillate.

Chen, Xi, Zhu, Chen, "Oscillation-Reduced MXFP4 Training for Vision Transformers"
(TetraJet), ICML 2025, arXiv:2502.20853; code thu-ml/TetraJet-MXFP4Training at bbe9bd67:
`quantization/Qoptimizers/adamw_bs_ramping.py` (`AdamW_BS_Ramping`,
`_single_tensor_adamwNew`), `quantization/Qoptimizers/Qengine_DeiT.py`
(`BSRamping_calib_update_period`), `engine.py` (calibration at the start of each epoch),
`scripts/Pretrain-TetraJet-Q-Ramping/*.sh` (alpha 16, beta 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from oscbench.oscillation.policy import POLICIES, Policy, Probe, RunContext
from oscbench.quant.base import QUANTIZED
from oscbench.quant.modules import quantized_layers
from oscbench.registry import ConfigError, check


@dataclass
class RampingConfig:
    alpha: float  # TetraJet's scripts: 16 (`--opt-ramping-alpha`)
    beta: float  # TetraJet's scripts: 5 (`--opt-ramping-beta`; argparse default 4)
    calibration_steps: int  # d_Q, d_w summed over this many steps (TetraJet: `calib_steps = 30`)
    max_period: int | None  # longest period; null = the steps of an epoch (TetraJet's `max_step`)
    eps: float  # added to d_w (TetraJet: `EPS = 1e-8`)

    def __post_init__(self) -> None:
        check(self.alpha > 0, "alpha", self.alpha, "> 0")
        check(self.beta >= 0, "beta", self.beta, ">= 0")
        check(self.calibration_steps >= 1, "calibration_steps", self.calibration_steps, ">= 1")
        check(
            self.max_period is None or self.max_period >= 1,
            "max_period",
            self.max_period,
            "null or >= 1",
        )
        check(self.eps > 0, "eps", self.eps, "> 0")


class RampState(nn.Module):
    """One weight tensor's ramping state, in buffers: the period, the steps and gradients
    accumulated since its last update, and the optimizer's moments for it (Adam: first
    and second; SGD: the momentum buffer)."""

    def __init__(self, weight: torch.Tensor, adam: bool) -> None:
        super().__init__()
        zeros = torch.zeros_like(weight, dtype=torch.float32)
        self.register_buffer("period", torch.ones_like(weight, dtype=torch.int32))
        self.register_buffer("step_acc", zeros.clone())
        self.register_buffer("grad_acc", zeros.clone())
        self.register_buffer("exp_avg", zeros.clone())
        if adam:
            self.register_buffer("exp_avg_sq", zeros.clone())


def periods(dq: torch.Tensor, dw: torch.Tensor, cfg: RampingConfig, longest: int) -> torch.Tensor:
    """floor((d_Q / alpha) / (d_w + eps)) beta + 1, at most `longest` (int32), as
    `BSRamping_calib_update_period` computes it."""
    ratio = torch.div(dq / cfg.alpha, dw + cfg.eps, rounding_mode="floor")
    return (ratio * cfg.beta + 1).clamp(max=longest).to(torch.int32)


@POLICIES.register("ramping", RampingConfig)
class Ramping(Policy):
    """At the start of every epoch (TetraJet: `step % len(data_loader) == 0`), a calibration:
    calibration_steps + 1 plain training steps on batches of their own (every period 1, the
    accumulators empty), after each of which d_w += |w - w_prev| and d_Q += |Q(w) - Q(w_prev)|
    per weight from the second on; then every step is undone (TetraJet saves and reloads
    the model and the optimizer) and each low-bit quantized weight gets the period
    `periods(d_Q, d_w)`. The accumulators keep what they held before the calibration (the
    reloaded optimizer state holds them) and the new period applies from the next step.

    Each optimizer step, for those weights (`optimizer_step`; the optimizer steps every
    other parameter as usual): step_acc += 1, grad_acc += grad; where step_acc is a
    multiple of the period, the mean gradient grad_acc / step_acc takes one update at the
    learning rate times step_acc, and the accumulators of those weights empty.

    - AdamW (TetraJet's optimizer): decoupled weight decay on every weight at every step;
      the moments of updated weights only; bias corrections by the optimizer's step count;
      as `_single_tensor_adamwNew`, but branch-free (no per-step host synchronisation)
      and without its check for non-finite gradients (their loss scaler skips such steps
      before the optimizer sees them; a diverging run stops at the epoch's loss check).
    - Adam (our transfer): the same, with torch.optim.Adam's weight decay, added to the
      mean gradient where it is applied, instead of the decoupled one.
    - SGD (our transfer, for the common recipe): where updated, g = mean gradient + weight
      decay x w, momentum buffer = momentum x buffer + g, and w -= lr x step_acc x
      (g + momentum x buffer with Nesterov, else the buffer).

    Which weights: the low-bit quantized layers' (not the 8-bit first and last, as
    TetraJet ramps its quantized linears only). Q(w) is the quantizer's forward, with the
    step's own grid. The state is buffers (saved with the run).
    """

    requires = frozenset({QUANTIZED})

    def __init__(self, cfg: RampingConfig, run: RunContext) -> None:
        super().__init__()
        self.cfg = cfg
        layers = [m for _, m in quantized_layers(run.model) if not m.is_first_or_last]
        if not layers:
            raise ConfigError("policy=ramping found no low-bit quantized layer to ramp")
        self.layers = layers
        self.longest = cfg.max_period or run.schedule.per_epoch
        self.adam = run.optimizer in ("adamw", "adam")
        self.states = nn.ModuleList(RampState(m.weight, self.adam) for m in layers)
        self.steps = 0  # Adam's step count, the same for every ramped weight
        self.calibrating = False

    def on_epoch_start(self, epoch: int, probe: Probe) -> None:
        cfg = self.cfg
        dq = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.layers]
        dw = [torch.zeros_like(d) for d in dq]
        last: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calibrating = True
        try:
            for i in probe(cfg.calibration_steps + 1, self):
                now = [self._measure(m) for m in self.layers]
                if i >= 1:
                    for (w, q), (w0, q0), a, b in zip(now, last, dq, dw, strict=True):
                        a.add_((q - q0).abs_())
                        b.add_((w - w0).abs_())
                last = now
        finally:
            self.calibrating = False
        for state, a, b in zip(self.states, dq, dw, strict=True):
            state.period.copy_(periods(a, b, cfg, self.longest))

    @staticmethod
    @torch.no_grad()
    def _measure(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        w = layer.quantizer_input().detach()
        return w.float().clone(), layer.weight_quantizer(w).detach().float()

    def optimizer_step(self, opt: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        grads = [m.weight.grad for m in self.layers]
        for m in self.layers:
            m.weight.grad = None  # the optimizer steps every other parameter
        step()
        group = next(g for g in opt.param_groups if g["name"] == "latent")
        with torch.no_grad():
            for m, state, grad in zip(self.layers, self.states, grads, strict=True):
                if grad is not None:
                    self._update(m.weight, grad, state, group)
        self.steps += 1

    def _update(self, w: torch.Tensor, grad: torch.Tensor, st: RampState, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if self.calibrating:  # plain steps: period 1, nothing accumulated
            st.period.fill_(1)
            st.step_acc.zero_()
            st.grad_acc.zero_()
        st.step_acc.add_(1)
        st.grad_acc.add_(grad)
        due = torch.remainder(st.step_acc, st.period).eq_(0).float()
        mean = st.grad_acc / st.step_acc
        if self.adam:
            beta1, beta2 = group["betas"]
            t = self.steps + 1
            if group["decoupled_weight_decay"]:  # AdamW (TetraJet's)
                w.mul_(1 - lr * wd)
            else:  # Adam: weight decay in the gradient, as torch.optim.Adam
                mean.add_(w, alpha=wd)
            st.exp_avg.add_(due * (1 - beta1) * (mean - st.exp_avg))
            st.exp_avg_sq.add_(due * (1 - beta2) * (mean * mean - st.exp_avg_sq))
            denom = (st.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            w.sub_(due * st.step_acc * (lr / (1 - beta1**t)) * st.exp_avg / denom)
        else:
            momentum = group["momentum"]
            g = mean.add_(w, alpha=wd)
            st.exp_avg.add_(due * (momentum * st.exp_avg + g - st.exp_avg))
            d = g + momentum * st.exp_avg if group["nesterov"] else st.exp_avg
            w.sub_(due * st.step_acc * lr * d)
        keep = 1 - due
        st.step_acc.mul_(keep)
        st.grad_acc.mul_(keep)

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = state["steps"]

    def metrics(self) -> dict[str, float]:
        """The periods the last calibration set: their mean, and the share above 1."""
        p = torch.cat([s.period.flatten() for s in self.states]).float()
        return {
            "ramping/mean_period": p.mean().item(),
            "ramping/ramped_share": (p > 1).float().mean().item(),
        }
