"""The curvature probe: each quantized layer's Hessian trace, estimated by Hutch++ (Meyer,
Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021,
arXiv:2010.09649, Algorithm 1), at the epochs `probe.hessian_epochs` names.

WinQ, LOTION and CAGE tie oscillation to flat or saddle regions of the loss; the trace per
layer, beside the layer's oscillating share in the same epoch record, lets a study test it.
The Hessian is the training loss's with respect to one layer's latent weight, through the
quantizer's straight-through estimator (what the optimizer follows), in evaluation mode
(BatchNorm's running statistics, as PyHessian measures), on the same `batches` training
batches at every probed epoch. Products are `torch.autograd.functional.vhp` (v^T H, which is
H v for the symmetric Hessian, and the trace of H^T is H's in any case; torch's `hvp` takes
a double-backward trick at about twice the cost): torch.func's transforms refuse the
quantizers' autograd Functions (they define `forward(ctx, ...)`, not `setup_context`).
The random sign vectors come from a generator of the probe's own, so a probed run trains
exactly as an unprobed one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from oscbench.data.base import Data
from oscbench.quant.modules import quantized_layers
from oscbench.registry import check

HESSIAN_STREAM = 1 << 21  # the probe's training batches: an epoch seed of their own


@dataclass
class ProbeConfig:
    """`probe:` in conf/config.yaml."""

    hessian_epochs: list[int]  # after these epochs (1-based), each layer's Hessian trace
    hessian_matvecs: int  # Hutch++'s Hessian-vector products per layer (a multiple of 3)
    hessian_batches: int  # training batches the loss sums over
    seed: int  # the sign vectors' generator

    def __post_init__(self) -> None:
        check(
            self.hessian_matvecs >= 3 and self.hessian_matvecs % 3 == 0,
            "hessian_matvecs",
            self.hessian_matvecs,
            "a multiple of 3, at least 3",
        )
        check(self.hessian_batches >= 1, "hessian_batches", self.hessian_batches, ">= 1")
        for e in self.hessian_epochs:
            check(isinstance(e, int) and e >= 1, "hessian_epochs", e, "epochs from 1 on")


def hutchpp(
    matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, matvecs: int, gen: torch.Generator
) -> float:
    """tr(A) for the symmetric A behind `matvec` with `matvecs` products (Algorithm 1, k =
    matvecs / 3): Q an orthonormal basis of A S, then tr(Q^T A Q) + tr(G'^T A G') / k with
    G' = (I - Q Q^T) G; S and G random signs (d x k). Exact when rank(A) <= k."""
    k = matvecs // 3

    def signs() -> torch.Tensor:
        return torch.randint(0, 2, (dim, k), generator=gen).mul_(2).sub_(1).double()

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        return torch.stack([matvec(v) for v in vectors.T], dim=1)

    s, g = signs(), signs()
    q, _ = torch.linalg.qr(apply(s))
    top = (q * apply(q)).sum()
    g = g - q @ (q.T @ g)
    rest = (g * apply(g)).sum() / k
    return float(top + rest)


def traces(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    matvecs: int,
    gen: torch.Generator,
) -> dict[str, float]:
    """Each quantized layer's Hessian trace of the mean cross-entropy over `batches`, by
    `hutchpp` (the model in evaluation mode meanwhile)."""
    count = sum(len(y) for _, y in batches)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, layer in quantized_layers(model):
            w = layer.weight.detach()

            def loss(weight: torch.Tensor, key: str = f"{name}.weight") -> torch.Tensor:
                total = 0.0
                for x, y in batches:
                    logits = functional_call(model, {key: weight}, (x,), strict=False)
                    total = total + nn.functional.cross_entropy(logits, y, reduction="sum")
                return total / count

            def product(v: torch.Tensor, w: torch.Tensor = w, loss=loss) -> torch.Tensor:  # noqa: ANN001
                _, product = torch.autograd.functional.vhp(loss, w, v.to(w.dtype).view_as(w))
                return product.reshape(-1).double()

            out[name] = hutchpp(product, w.numel(), matvecs, gen)
    finally:
        model.train(was_training)
    return out


def layer_traces(model: nn.Module, data: Data, cfg: ProbeConfig, batch_size: int) -> dict:
    """`traces` on the probe's first `hessian_batches` training batches (the same at every
    probed epoch), with sign vectors from `cfg.seed`."""
    batches = list(
        itertools.islice(data.train_batches(HESSIAN_STREAM, batch_size), cfg.hessian_batches)
    )
    return traces(model, batches, cfg.hessian_matvecs, torch.Generator().manual_seed(cfg.seed))
