"""The curvature probe (oscbench/training/hessian.py): Hutch++ against known traces, per layer
against the explicit Hessian, and a run's records with the traces beside the oscillating shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oscbench.launch.config import Component
from oscbench.quant.lsq import LSQConfig
from oscbench.quant.modules import QuantPlan, quantize_model, quantizer_factory
from oscbench.training.hessian import hutchpp, traces
from tests.bounds import gamma
from tests.conftest import run_config

pytestmark = pytest.mark.numeric


def test_hutchpp_is_exact_for_a_rank_below_its_sketch():
    """rank(A) = 6 <= k = 8 (24 products): Q spans A's range, the residual term is zero and
    tr(Q^T A Q) = tr(A) up to rounding. In float64: the d-term dot products, the d x k
    products and the QR's loss of orthogonality (a few d eps) each cost at most gamma(4d)
    of sum |lambda| per basis vector."""
    gen = torch.Generator().manual_seed(0)
    d = 200
    u, _ = torch.linalg.qr(torch.randn(d, 6, generator=gen, dtype=torch.float64))
    lam = torch.tensor([50.0, -20.0, 7.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    a = (u * lam) @ u.T
    est = hutchpp(lambda v: a @ v, d, 24, torch.Generator().manual_seed(1))
    bound = gamma(4 * d, torch.float64) * 9 * lam.abs().sum().item()
    assert abs(est - lam.sum().item()) <= bound


def test_hutchpp_estimates_a_full_rank_trace_within_its_variance():
    """A diagonal A with a decaying spectrum, d = 300, 30 products: over 200 seeds the mean
    estimate is unbiased within 4 standard errors of the seeds' own spread."""
    d = 300
    diag = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
    runs = torch.tensor(
        [hutchpp(lambda v: diag * v, d, 30, torch.Generator().manual_seed(s)) for s in range(200)]
    )
    err = runs.mean() - diag.sum()
    assert err.abs() <= 4 * runs.std() / 200**0.5
    assert runs.std() < 0.1 * diag.sum()  # the sketch takes the large eigenvalues exactly


def _tiny(bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    lsq = LSQConfig(
        per_channel=False, init="lsq", grad_scale=True, signed="auto", keep_positive=False
    )
    quantize_model(
        model,
        quantizer_factory(Component("lsq", lsq)),
        lambda *a: None,
        QuantPlan(bits, bits, None),
    )
    return model


def test_each_layers_trace_is_its_explicit_hessians_through_the_straight_through_estimator():
    """Layers of 12 and 6 weights with k = 12 (36 products): Hutch++ is exact, so each trace
    equals that of the explicit Hessian (torch.autograd.functional.hessian) of the same loss,
    to rounding: each Hessian entry is a sum over the 64 images (both ways, in other orders)
    and the trace one over d^2 products with the basis, so gamma(64 d^2) of the Hessian's
    absolute sum in float32."""
    model = _tiny()
    x = torch.randn(64, 4)
    y = torch.randint(0, 2, (64,))
    got = traces(model, [(x[:32], y[:32]), (x[32:], y[32:])], 36, torch.Generator().manual_seed(2))
    assert model.training  # put back as it was
    model.eval()
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        w0 = layer.weight.detach().clone()

        def loss(w: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            saved = layer.weight
            del layer.weight
            layer.weight = w
            try:
                return nn.functional.cross_entropy(model(x), y)
            finally:
                layer.weight = saved

        h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
        d = w0.numel()
        assert abs(got[name] - h.trace().item()) <= gamma(64 * d * d) * h.abs().sum()
        assert h.abs().sum() > 0


def test_a_probed_run_records_each_layers_trace_at_the_chosen_epochs(tmp_path):
    """The traces sit in the epoch records the probe names, with the layers' oscillating
    shares of the same epoch; training is as without the probe, bit for bit."""
    args = ["bits=2", "trainer.epochs=3", "logger=none", "device=cpu"]
    from oscbench.records.record import load_results

    run_config([*args, "probe.hessian_epochs=[1,3]", "probe.hessian_matvecs=6"], tmp_path / "a")
    run_config(args, tmp_path / "b")
    probed, plain = load_results(tmp_path / "a"), load_results(tmp_path / "b")
    history = probed["history"]
    assert [("hessian_trace" in h) for h in history] == [True, False, True]
    layers = history[0]["osc"]["layers"]
    assert set(layers) <= set(history[0]["hessian_trace"])
    assert all(isinstance(v, float) for v in history[2]["hessian_trace"].values())
    for a, b in zip(history, plain["history"], strict=True):
        a = {k: v for k, v in a.items() if not k.startswith("hessian")}
        assert a == b
