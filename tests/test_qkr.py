"""QKR (OFQ): x W_qk x^T with W_qk = W_q^T W_k per head, StatsQ per row; used by ofq on DeiT."""

import pytest
import timm
import torch

from oscbench.quant.modules import QLinear
from oscbench.quant.qkr import QKRAttention
from oscbench.registry import ConfigError
from tests.bounds import assert_within, gamma, unit_roundoff
from tests.conftest import build_config, fit

pytestmark = pytest.mark.numeric  # rerun in CI under other CPU code paths

DEIT = [
    "model=deit_tiny",
    "model.img_size=16",
    "model.patch_size=4",
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.train_size=16",
    "dataset.test_size=8",
    "trainer.batch_size=8",
]


def _attention():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
    return model.blocks[0].attn


def test_reparameterisation_is_exact_in_full_precision():
    """In full precision QKR computes timm's attention, up to rounding: in float64 (random
    weights make attention ill-conditioned, and float32's bound would say nothing) the
    difference stays within the error bound of the two orders of evaluation."""
    attn = _attention().double()
    attn.fused_attn = False  # the plain formula, whose rounding the bound below follows
    with torch.no_grad():
        attn.qkv.bias[:384] = 0  # OFQ drops the query and key biases
    x = torch.randn(2, 65, 192, dtype=torch.float64)
    qkr = QKRAttention(attn, bits=8, act_bits=8, act_q=lambda *a: None)
    qkr.qk_quantizer.forward = lambda w: w  # full precision W_qk
    with torch.no_grad():
        ours, ref = qkr(x), attn(x)
        assert_within(ours, ref, _attention_bound(attn, x))


def _attention_bound(attn, x):
    """How far two float64 evaluations of attention(x) can differ when one computes the
    logits as x (W_qk x^T) and the other as (x W_q^T)(x W_k^T)^T, and each rounds the rest
    its own way: running bounds from the magnitudes (Higham, Ch. 3: |fl(AB) - AB| <=
    gamma_n |A||B|, compounding over a chain of products)."""
    h, d, n = attn.num_heads, attn.head_dim, x.shape[1]
    c = x.shape[-1]
    u, g = unit_roundoff(torch.float64), lambda k: gamma(k, torch.float64)
    x, w = x.double(), attn.qkv.weight.double()
    bias = attn.qkv.bias.double()
    wq, wk, wv = w.view(3, h, d, c).unbind(0)
    ax = x.abs().unsqueeze(1)  # B, 1, N, C
    logit_mag = ax @ (wq.abs().transpose(1, 2) @ wk.abs()) @ ax.transpose(-2, -1) * attn.scale
    q, k = x.unsqueeze(1) @ wq.transpose(1, 2), x.unsqueeze(1) @ wk.transpose(1, 2)
    logits = q @ k.transpose(-2, -1) * attn.scale
    err_logits = 2 * g(2 * c + d + 2) * logit_mag  # both sides, + the scale products
    delta = err_logits.amax(-1, keepdim=True)
    spread = logits.amax(-1, keepdim=True) - logits.amin(-1, keepdim=True)
    probs = logits.softmax(-1)
    # softmax of logits perturbed by <= delta moves each p by <= p (e^(2 delta) - 1); each
    # side's own rounding: exp (2u), the max subtracted (u per unit of spread), sum, divide
    err_probs = probs * (torch.expm1(2 * delta) + 2 * (g(n) + 4 * u + u * spread))
    v = x.unsqueeze(1) @ wv.transpose(1, 2) + bias.view(3, h, 1, d)[2]
    err_v = 2 * g(c + 1) * (ax @ wv.abs().transpose(1, 2) + bias.view(3, h, 1, d)[2].abs())
    pv = probs @ v
    err_pv = err_probs @ (v.abs() + err_v) + probs @ err_v + 2 * g(n) * (probs @ v.abs())
    merge = lambda t: t.transpose(1, 2).reshape(x.shape[0], n, c)  # noqa: E731
    wp, bp = attn.proj.weight.double(), attn.proj.bias.double()
    return merge(err_pv) @ wp.abs().T + 2 * g(c + 1) * (merge(pv).abs() @ wp.abs().T + bp.abs())


def test_w_qk_is_quantized_per_row_with_statsq_and_trains_w_q_and_w_k():
    qkr = QKRAttention(_attention(), bits=2, act_bits=4, act_q=lambda *a: None)
    seen = {}
    original = qkr.qk_quantizer.forward
    qkr.qk_quantizer.forward = lambda w: seen.setdefault("out", original(w))
    qkr(torch.randn(2, 17, 192)).sum().backward()
    wqk = qkr.w_qk().detach().reshape(-1, 192)
    m = wqk.abs().mean(1, keepdim=True)
    levels = seen["out"].detach() / m
    assert torch.isin(levels.round(decimals=4), torch.tensor([-1.5, -0.5, 0.5, 1.5])).all()
    assert qkr.q_weight.grad.abs().sum() > 0 and qkr.k_weight.grad.abs().sum() > 0


def test_ofq_on_deit_uses_qkr_and_trains():
    spec, built = build_config(
        ["method=ofq", "bits=3", "trainer.epochs=1", "trainer.extra_epochs=0", *DEIT]
    )
    blocks = built.model.blocks
    assert all(isinstance(b.attn, QKRAttention) for b in blocks)
    assert isinstance(blocks[0].attn.v, QLinear) and isinstance(blocks[0].attn.proj, QLinear)
    assert not any(n.endswith("qkv") for n, _ in built.model.named_modules())
    history = fit(spec, built)
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    assert blocks[0].attn.attn_quantizer.signed is False  # softmax output: unsigned LSQ


def test_qkr_is_refused_without_attention_and_skipped_by_default():
    with pytest.raises(ConfigError, match="model=cnn_small has none"):
        build_config(["method=ofq", "qkr=always"])
    _, built = build_config(["method=lsq", *DEIT])  # qkr=never unless a preset says otherwise
    assert not any(isinstance(m, QKRAttention) for m in built.model.modules())
