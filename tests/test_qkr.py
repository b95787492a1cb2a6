"""QKR (OFQ): x W_qk x^T with W_qk = W_q^T W_k per head, StatsQ per row; used by ofq on DeiT."""

import pytest
import timm
import torch

from oscbench.quant import QLinear
from oscbench.quant.qkr import QKRAttention
from oscbench.registry import ConfigError
from tests.conftest import build_config, fit

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
    attn = _attention()
    x = torch.randn(2, 65, 192)
    qkr = QKRAttention(attn, bits=8, act_bits=8, act_q=lambda *a: None)
    qkr.qk_quantizer.forward = lambda w: w  # full precision W_qk
    with torch.no_grad():
        attn.qkv.bias[:384] = 0  # OFQ drops the query and key biases
    torch.testing.assert_close(qkr(x), attn(x), rtol=1e-5, atol=1e-6)


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
        ["method=ofq", "bits=3", "trainer.epochs=1", "policy.cga.extra_epochs=0", *DEIT]
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
