"""Fast paths: bf16 autocast keeps quantizer arithmetic exact; channels_last; compile."""

import math

import pytest
import torch

from oscbench.quant.lsq import LSQConfig, LSQQuantizer
from oscbench.registry import ConfigError
from oscbench.training.accel import compile_refused
from tests.conftest import build_config, fit
from tests.learned import above

CFG = LSQConfig(per_channel=False, init="lsq", grad_scale=True, signed="auto", keep_positive=False)


def test_lsq_codes_under_bf16_autocast_are_the_fp32_codes():
    torch.manual_seed(0)
    q = LSQQuantizer(CFG, 8, None, False)
    q.init_from(torch.rand(4096) * 3)
    x = (torch.rand(4096) * 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert out.dtype == torch.float32
    exact = torch.clamp(torch.round(x.float() / q.s.detach()), 0, 255)
    torch.testing.assert_close(out, exact * q.s.detach(), rtol=0, atol=0)
    assert torch.equal(q.to_int(x), exact)
    # bf16 arithmetic would have got codes wrong: the fp32 path is needed
    naive = torch.clamp(torch.round(x * q.s.detach().to(torch.bfloat16).reciprocal()), 0, 255)
    assert (naive.float() != exact).any()


def test_gradients_flow_to_bf16_inputs():
    q = LSQQuantizer(CFG, 4, None, False)
    q.init_from(torch.rand(64))
    x = torch.rand(64, dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and q.s.grad.dtype == torch.float32


@pytest.mark.learned
@pytest.mark.parametrize(
    ("method", "epochs"),
    [pytest.param(m, e, id=m) for m, e in (("lsq", 5), ("aoq", 10), ("lsq_freeze", 5))],
)
def test_bf16_channels_last_training_runs_and_learns(method, epochs):
    """At 4 bits, validation accuracy 97.2-97.9 % on every CPU path: LSQ and LSQ with
    freezing after 5 epochs, AOQ after 10 (after 5: 40.3, 42.4, 56.3 % on the native, avx2
    and default paths: its staged schedule is slow to start)."""
    spec, built = build_config(
        [
            f"method={method}",
            "bits=4",
            f"trainer.epochs={epochs}",
            "trainer.precision=bf16",
            "trainer.channels_last=always",
        ]
    )
    history = fit(spec, built)
    assert all(math.isfinite(h["train_loss"]) for h in history)
    above("validation accuracy (%)", history[-1]["val_acc"], 30)  # chance: 10 %
    conv = built.model[3]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
@pytest.mark.oldest
@pytest.mark.learned
def test_compiled_forward_trains_as_eager_does(tmp_path):
    """Fused kernels round differently, which flips some codes, so the two runs are not
    comparable number by number; both must learn digits alike. Where this torch's compiler
    is known to compute wrong gradients (torch 2.14's AVX2 kernels: `compile_refused`), the
    run is refused instead, with the fix."""
    if compile_refused(torch.device("cpu")):
        with pytest.raises(ConfigError, match="use trainer.compile=false"):
            build_config(["trainer.epochs=3", "trainer.compile=true"])
        return
    eager_spec, eager = build_config(["trainer.epochs=3"])
    comp_spec, comp = build_config(["trainer.epochs=3", "trainer.compile=true"])
    for name, history in (("eager", fit(eager_spec, eager)), ("compiled", fit(comp_spec, comp))):
        assert all(math.isfinite(h["train_loss"]) for h in history)
        above(f"{name}: validation accuracy (%)", history[-1]["val_acc"], 90)  # chance: 10 %


def _lsq(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from oscbench.quant.lsq import lsq_quantize

    return lsq_quantize(x, s, -8, 7, 0.01)


def _qema(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from oscbench.quant.qema import _QEMARound

    ema = x.detach() + 0.2  # moves some codes up a level
    return _QEMARound.apply(x, s, ema, -8, 7, 0.01, "nearest")


@pytest.mark.numeric
@pytest.mark.parametrize("quantize", [_lsq, _qema], ids=["lsq", "qema"])
def test_compiled_lsq_computes_what_eager_lsq_computes(quantize):
    """trainer.compile traces LSQ's autograd function (and Q-EMA's, which ends as LSQ's
    does) into the graph, where Inductor fuses it: the same codes and input gradient, bit
    for bit (each is one element's own arithmetic), and the step's gradient, a sum of
    n = 4096 terms g * grad * (code - x/s inside), within its rounding bound
    n * eps * sum |terms|, with |code - x/s inside| <= 8 + |x/s|. Under torch 2.11 the
    compiled gradients were all zero before LSQ's forward stopped writing into its
    intermediates when compiled (`oscbench.quant.lsq._save_and_scale`)."""
    x0 = torch.randn(8, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    go = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (quantize, torch.compile(quantize, fullgraph=True)):
        x = x0.clone().requires_grad_(True)
        s = torch.tensor(0.37, requires_grad=True)
        y = fn(x, s)
        y.backward(go)
        results.append((y.detach(), x.grad, s.grad))
    (y, gx, gs), (cy, cgx, cgs) = results
    assert torch.equal(cy, y) and torch.equal(cgx, gx)
    assert gx.abs().sum() > 0 and gs != 0
    terms = (go.abs() * (x0.abs() / 0.37 + 8)).sum() * 0.01
    bound = x0.numel() * torch.finfo(torch.float32).eps * terms
    assert abs(cgs - gs) <= bound, (cgs, gs, bound)
