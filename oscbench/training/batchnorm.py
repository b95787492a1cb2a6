"""Batch norm over the global batch of every rank (`trainer.sync_bn`), and folded batch
norm's switch to running statistics (`bn_fold.freeze_epoch`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn

from oscbench.oscillation.policy import Policy, Probe
from oscbench.quant.fold import QConvBn2d
from oscbench.quant.modules import swap_module


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of every rank:
    per channel, the sum of x and the count, then the sum of (x - mean)^2, are added up
    over the ranks with torch.distributed.nn's all_reduce, which carries gradients, so that
    each rank normalises and back-propagates as one process on the whole batch would. For
    the CPU (gloo), where torch's SyncBatchNorm refuses to run; on CUDA that one is used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, 2, 3]
        shape = (1, c, 1, 1)
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / c)]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        # two passes, as the one-process kernel: sum((x - mean)^2), not sum(x^2) - mean^2
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / n  # biased, to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                m = 1.0 / self.num_batches_tracked.item() if m is None else m
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1), m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` over the global batch: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere (same parameters and statistics)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
            )
            new.load_state_dict(m.state_dict())
            swap_module(model, name, new)
    return model


class FreezeBNStats(Policy):
    """`bn_fold.freeze_epoch`: from that epoch on (also when a run resumes past it), every
    folded BatchNorm uses its running statistics (`QConvBn2d.freeze_bn_stats`). Built by the
    run, not a `policy:` of the config."""

    def __init__(self, model: nn.Module, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self.layers = [m for m in model.modules() if isinstance(m, QConvBn2d)]

    def on_epoch_start(self, epoch: int, probe: Probe) -> None:
        if epoch >= self.epoch:
            for layer in self.layers:
                layer.freeze_bn_stats()
