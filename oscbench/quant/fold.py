"""BatchNorm folded into the quantized convolution before it (`bn_fold.enabled`), as every
integer backend folds it: the weight that is quantized, tracked and exported is
W gamma / sqrt(running_var + eps), so a code moves when the BN statistics do.

Follows PyTorch's `torch.ao.nn.intrinsic.qat.ConvBn2d` (torch/ao/nn/intrinsic/qat/modules/
conv_fused.py: `_ConvBnNd._forward_approximate`, `freeze_bn_stats`, `train`), which is also
the reference its tests compare against: the conv runs on the quantized folded weight with a
zero bias, its output is divided by the scale factor again and the conv's own bias added, and
the BatchNorm normalises that: in training with the batch's statistics (the correction of the
running ones), and once frozen (`bn_fold.freeze_epoch`) or in evaluation with its running
statistics, which makes the layer exactly conv(x, Q(W_fold)) + b_fold.
"""

from __future__ import annotations

import torch
from torch import nn

from oscbench.quant.modules import QConv2d, swap_module
from oscbench.registry import ConfigError


class QConvBn2d(QConv2d):
    """A `QConv2d` owning the BatchNorm2d that followed it (`bn`); its weight quantizer sees
    the folded weight (`quantizer_input`). `freeze_bn_stats` keeps the BatchNorm in
    evaluation mode from then on, whatever mode the model is put in."""

    bn: nn.BatchNorm2d
    freeze_bn: bool

    @classmethod
    def fold(cls, layer: QConv2d, bn: nn.BatchNorm2d) -> QConvBn2d:
        """`layer` with `bn` folded in, sharing their parameters; its weight quantizer is set
        up again from the folded weight."""
        new = cls.__new__(cls)
        new.__dict__ = layer.__dict__.copy()
        new._modules = dict(layer._modules)
        new.bn = bn
        new.freeze_bn = False
        new.weight_quantizer.init_from(new.quantizer_input().detach())
        return new

    def scale_factor(self) -> torch.Tensor:
        """gamma / sqrt(running_var + eps), per output channel."""
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def quantizer_input(self, factor: torch.Tensor | None = None) -> torch.Tensor:
        factor = self.scale_factor() if factor is None else factor
        return self.weight * factor.reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ConvBn2d's `_forward_approximate`: one scale factor, used twice (as there, so that
        its gradients add up in the same order)."""
        factor = self.scale_factor()
        wq = self.quantized_weight(self.quantizer_input(factor))
        zero = torch.zeros(self.out_channels, device=wq.device, dtype=x.dtype)
        y = self._conv_forward(self._quantize_input(x), wq, zero) / factor.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self.bn(y)

    def freeze_bn_stats(self) -> None:
        self.freeze_bn = True
        self.bn.train(False)

    def train(self, mode: bool = True) -> QConvBn2d:
        super().train(mode)
        if self.freeze_bn:
            self.bn.train(False)
        return self


def _bypass(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left where a folded BatchNorm was: nothing, or timm's `BatchNormAct2d`'s
    dropout and activation, which it applies after normalising."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm.layers.BatchNormAct2d
        return nn.Sequential(bn.drop, bn.act)
    raise ConfigError(
        f"bn_fold: {type(bn).__name__} is a BatchNorm2d that does more than normalise, which "
        "oscbench cannot fold; use bn_fold.enabled=false for this model"
    )


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batchnorm) names where a BatchNorm2d's input is exactly a Conv2d's output in a
    forward pass of `x` (in evaluation mode: nothing changes)."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # held: no id is reused meanwhile
    pairs: list[tuple[str, str]] = []

    def conv_out(name: str):  # noqa: ANN202
        return lambda m, i, o: outputs.__setitem__(id(o), (name, o))

    def bn_in(name: str):  # noqa: ANN202
        def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
            if id(i[0]) in outputs:
                pairs.append((outputs[id(i[0])][0], name))

        return hook

    hooks = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(conv_out(name)))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(bn_in(name)))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pairs


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> list[str]:
    """Fold each pair's BatchNorm into its conv where the conv is quantized (`QConv2d`);
    returns the folded convs' names."""
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if type(conv) is not QConv2d:  # left in full precision (first_last=fp)
            continue
        swap_module(model, bn_name, _bypass(bn))
        swap_module(model, conv_name, QConvBn2d.fold(conv, bn))
        folded.append(conv_name)
    return folded
