"""Query-key reparameterisation, QKR (Liu, Liu, Cheng, ICML 2023, "Oscillation-free
Quantization for Low-bit Vision Transformers" (OFQ), arXiv:2302.02210, Sec. 4.2; code:
nbasyl/OFQ, `src/quantization/modules/attention.py`: `QAttention_qkreparam`).

timm's fused qkv projection is split. Per head h, W_qk,h = W_q,h^T W_k,h (C x C) is
quantized with StatsQ per row; the intermediate W_qk,h x_q^T is quantized with its own
activation quantizer (OFQ's `quan_a_qkx_fn`), and the logits are
x_q Q(W_qk,h x_q^T) * head_dim^-0.5, so the query and key activations are never quantized on
their own. The value projection is an ordinary linear layer (quantized like every other);
the values and the softmax output (unsigned) are quantized with the activation quantizer.
As in OFQ, the query and key biases are dropped: x W_qk x^T has no place for them. W_qk is
derived from W_q and W_k every forward, so it is not tracked and the freezing and CGA
policies do not act on it (they act on the v and output projections).

OFQ quantizes the activations here per channel, with learnable shifts before and after
each quantizer (`LearnableBias`); oscbench uses the run's activation quantizer (LSQ, one
step per tensor) for these as for every other activation, so that only the weight method
differs between methods.
"""

from __future__ import annotations

import torch
from torch import nn

from oscbench.quant.base import Quantizer
from oscbench.quant.modules import swap_module
from oscbench.quant.statsq import StatsQConfig, StatsQQuantizer
from oscbench.registry import ConfigError


class QKRAttention(nn.Module):
    def __init__(self, attn: nn.Module, bits: int, act_bits: int, act_q) -> None:  # noqa: ANN001
        """`attn`: a timm `Attention` block."""
        super().__init__()
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise ConfigError("qkr: attention with q/k normalisation cannot be reparameterised")
        if getattr(attn, "gate", None) is not None:
            raise ConfigError("qkr: gated attention cannot be reparameterised; use qkr=never")
        c = attn.qkv.in_features
        w = attn.qkv.weight.detach()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.q_weight = nn.Parameter(w[:c].clone())
        self.k_weight = nn.Parameter(w[c : 2 * c].clone())
        self.v = nn.Linear(c, c, bias=attn.qkv.bias is not None, device=w.device, dtype=w.dtype)
        self.v.weight.data.copy_(w[2 * c :])
        if attn.qkv.bias is not None:
            self.v.bias.data.copy_(attn.qkv.bias.detach()[2 * c :])
        self.proj, self.norm = attn.proj, attn.norm
        self.qk_quantizer = StatsQQuantizer(StatsQConfig(), bits, None, True)
        self.qk_quantizer.init_from(self.q_weight)
        self.input_quantizer: Quantizer | None = act_q(act_bits, None, False)
        self.qkx_quantizer: Quantizer | None = act_q(act_bits, None, False)
        self.value_quantizer: Quantizer | None = act_q(act_bits, None, False)
        self.attn_quantizer: Quantizer | None = act_q(act_bits, None, False)

    def w_qk(self) -> torch.Tensor:
        """(heads, C, C): W_q,h^T W_k,h for each head."""
        c, h, d = self.q_weight.shape[1], self.num_heads, self.head_dim
        wq = self.q_weight.view(h, d, c)
        wk = self.k_weight.view(h, d, c)
        return wq.transpose(1, 2) @ wk

    @staticmethod
    def _act(q: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
        if q is None:
            return x
        if not q.ready:
            q.init_from(x)
        return q(x)

    def logits(self, xq: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, N): x_q Q(W_qk x_q^T) * head_dim^-0.5 for quantized inputs x_q."""
        c = xq.shape[-1]
        wqk = self.w_qk()
        wqk = self.qk_quantizer(wqk.reshape(-1, c)).view_as(wqk)  # StatsQ per row
        qkx = self._act(self.qkx_quantizer, wqk @ xq.unsqueeze(1).transpose(-2, -1))  # B,H,C,N
        return xq.unsqueeze(1) @ qkx * self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, c = x.shape
        xq = self._act(self.input_quantizer, x)
        logits = self.logits(xq)
        if is_causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            logits = logits.masked_fill(causal, float("-inf"))
        if attn_mask is not None:
            logits = logits + attn_mask
        attn = self._act(self.attn_quantizer, logits.softmax(dim=-1))
        v = self.v(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = (attn @ self._act(self.value_quantizer, v)).transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(out))


def _attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from timm.layers import Attention  # timm is slow to import: only attention models need it

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def apply_qkr(model: nn.Module, bits: int, act_bits: int, act_q) -> int:  # noqa: ANN001
    """Replace every timm attention block by its QKR form; returns how many."""
    found = _attention_blocks(model)
    for name, attn in found:
        swap_module(model, name, QKRAttention(attn, bits, act_bits, act_q))
    return len(found)


def has_attention(model: nn.Module) -> bool:
    return bool(_attention_blocks(model))


def has_window_attention(model: nn.Module) -> bool:
    """Swin's window attention: a relative position bias per window inside shifted windows,
    which QKR here (OFQ's form for global attention, DeiT) does not reparameterise."""
    from timm.models.swin_transformer import WindowAttention

    return any(isinstance(m, WindowAttention) for m in model.modules())
